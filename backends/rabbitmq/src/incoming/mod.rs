//! The incoming side: publishing events to partition queues, the consumer
//! group that owns the partitions, settling deliveries, dead letters.
//!
//! Files, split along the same lines as the Redis backend's `incoming`:
//! - `mod.rs`: a member's shared state and its stream of deliveries (what
//!   `consume_incoming` returns), which holds the prefetch bound;
//! - [`publish`]: publishing an event, confirmed by the broker;
//! - [`group`]: the consumer group: presence, partition assignment,
//!   subscriptions and hand-over;
//! - [`settle`]: ack, reject and dead-letter of one delivery, and its
//!   attempt count;
//! - [`dead_letter`]: publishing, listing, replaying and dropping dead
//!   letters.
//!
//! # Partition ownership
//!
//! Each partition queue has `x-single-active-consumer`: the broker delivers
//! to one consumer at a time and, when that consumer's channel closes,
//! requeues its unacked messages (in order, ahead of the rest) and activates
//! the next waiting consumer in the same step. That is the lock; it holds
//! across processes and survives crashes without any help from us.
//!
//! Who *should* hold which partition is decided by the members themselves:
//! every consumer stream (a "member") has a presence queue bound to the
//! namespace's members exchange, announces itself (`hello`), sends a
//! heartbeat every second and a `bye` when it leaves. Each member keeps the
//! set of live members (heard from within [`DEAD_AFTER`]), sorts their ids,
//! and subscribes to the partitions `p` with `members[p % n] == self`.
//! Views that disagree for a moment only cost a waiting consumer, never two
//! active ones: the broker's single-active-consumer rule is what is safe,
//! the view only balances.
//!
//! Handing a partition over (a member joined, so this one has too many):
//! the member stops handing the partition's deliveries to the application,
//! waits until every delivery it did hand out is settled, then closes the
//! partition's channel. The broker requeues what was prefetched but never
//! handed out, ahead of later events, and activates the new owner. Order is
//! kept because no two consumers ever hold unsettled deliveries of one
//! partition (the same approach as spring-amqp's fix for
//! spring-projects/spring-amqp#2482: cancelling and finishing the prefetch
//! lets another consumer start beyond it).
//!
//! A member that dies is noticed by the broker (its channels close: its
//! partitions are requeued and free) and by the others after
//! [`DEAD_AFTER`] without heartbeats, when they re-balance and subscribe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fanout_backend::{BackendError, ConsumeOptions, IncomingDelivery, IncomingEvent};
use futures::stream::{self, BoxStream, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};
use tokio::sync::{mpsc, watch, Notify};

use crate::error::bounded;
use crate::session::Session;
use crate::topology::{ss, H_ORDERING_KEY};
use crate::{lock, Inner};

mod dead_letter;
mod group;
mod publish;
mod settle;

pub(crate) use dead_letter::{dead_letters, resolve_dead_letters};
pub(crate) use publish::publish;

use group::Member;
use settle::to_delivery;

/// How often a member looks at its partitions (drains, re-balancing).
const TICK: Duration = Duration::from_millis(250);
/// How often a member announces that it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A member not heard from for this long is considered gone.
pub(crate) const DEAD_AFTER: Duration = Duration::from_millis(3500);
/// After joining, how long a member listens to the others' answers to its
/// `hello` before choosing partitions, so that it does not first take
/// everything and then hand most of it back.
const DISCOVERY: Duration = Duration::from_millis(300);
fn unavailable(what: &str) -> BackendError {
    BackendError::Unavailable(what.into())
}

/// What a member's partition consumers hand to its stream.
enum Item {
    Delivery {
        partition: u32,
        slot: u64,
        // Boxed: a lapin delivery is large, and the channel holds many.
        delivery: Box<Delivery>,
    },
    Error(BackendError),
}

/// Bookkeeping shared by a member's task, its stream and its deliveries.
struct MemberShared {
    id: String,
    prefetch: usize,
    state: Mutex<MemberState>,
    /// Woken on every settle and slot change.
    changed: Notify,
}

#[derive(Default)]
struct MemberState {
    /// Handed out and not yet settled, over all partitions.
    unsettled: usize,
    slots: HashMap<u32, SlotState>,
}

struct SlotState {
    /// Identifies one subscription of the partition: deliveries of an
    /// earlier one are never counted against a later one.
    generation: u64,
    /// Handing over: deliveries are no longer handed out.
    draining: bool,
    unsettled: usize,
}

impl MemberShared {
    fn remove_slot(&self, partition: u32, generation: u64) {
        let mut st = lock(&self.state);
        if st
            .slots
            .get(&partition)
            .is_some_and(|s| s.generation == generation)
        {
            if let Some(s) = st.slots.remove(&partition) {
                st.unsettled = st.unsettled.saturating_sub(s.unsettled);
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    fn clear(&self) {
        let mut st = lock(&self.state);
        st.slots.clear();
        st.unsettled = 0;
        drop(st);
        self.changed.notify_waiters();
    }
}

pub(crate) fn consume(
    inner: &Arc<Inner>,
    options: ConsumeOptions,
) -> Result<BoxStream<'static, Result<IncomingDelivery, BackendError>>, BackendError> {
    inner.current()?;
    let prefetch = options.prefetch.max(1);
    let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let name: String = options
        .consumer_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(64)
        .collect();
    let shared = Arc::new(MemberShared {
        id: id.clone(),
        prefetch: usize::from(prefetch),
        state: Mutex::new(MemberState::default()),
        changed: Notify::new(),
    });
    // Small: the broker-side prefetch bounds what is in flight, this only
    // decouples the partition consumers from the stream.
    let (tx, rx) = mpsc::channel(usize::from(prefetch).max(16));
    let (stop_tx, stop_rx) = watch::channel(());
    let member = Member {
        inner: Arc::downgrade(inner),
        shared: shared.clone(),
        tx,
        tag: format!("{name}.{id}"),
        prefetch,
        exchange: inner.names.members_exchange(),
    };
    tokio::spawn(member.run(stop_rx));
    let state = StreamState {
        rx,
        shared,
        inner: Arc::downgrade(inner),
        _stop: stop_tx,
    };
    Ok(stream::unfold(state, next_delivery).boxed())
}

struct StreamState {
    rx: mpsc::Receiver<Item>,
    shared: Arc<MemberShared>,
    inner: Weak<Inner>,
    /// Dropped with the stream: tells the member task to leave.
    _stop: watch::Sender<()>,
}

async fn next_delivery(
    mut st: StreamState,
) -> Option<(Result<IncomingDelivery, BackendError>, StreamState)> {
    loop {
        // At most `prefetch` deliveries unsettled on this stream.
        loop {
            let changed = st.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if lock(&st.shared.state).unsettled < st.shared.prefetch {
                break;
            }
            changed.await;
        }
        match st.rx.recv().await? {
            Item::Error(e) => return Some((Err(e), st)),
            Item::Delivery {
                partition,
                slot,
                delivery,
            } => {
                let accepted = {
                    let mut state = lock(&st.shared.state);
                    match state.slots.get_mut(&partition) {
                        Some(s) if s.generation == slot && !s.draining => {
                            s.unsettled += 1;
                            state.unsettled += 1;
                            true
                        }
                        _ => false,
                    }
                };
                if !accepted {
                    // Its partition is being handed over (or was): the
                    // delivery stays unacked and goes back to the queue, in
                    // its place, when the partition's channel closes.
                    continue;
                }
                let inner = st.inner.upgrade()?;
                let d = to_delivery(&inner, &st.shared, partition, slot, *delivery);
                return Some((Ok(d), st));
            }
        }
    }
}

/// The properties an incoming event is published with, on its partition
/// queue and as a dead letter alike ([`read_event`] reads them back):
/// persistent, its id as message id, its ordering key in a header, plus
/// `extra` headers.
fn event_properties(
    event: &IncomingEvent,
    message_id: ShortString,
    extra: impl IntoIterator<Item = (&'static str, AMQPValue)>,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ss(H_ORDERING_KEY),
        AMQPValue::LongString(LongString::from(event.ordering_key.as_str())),
    );
    for (k, v) in extra {
        headers.insert(ss(k), v);
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message_id)
        .with_headers(headers)
}

/// What [`event_properties`] wrote, from a delivered message: its headers,
/// the event id and the ordering key.
fn read_event(d: &Delivery) -> (FieldTable, String, String) {
    let headers = d.properties.headers().clone().unwrap_or_default();
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let ordering_key = header_str(&headers, H_ORDERING_KEY).unwrap_or_default();
    (headers, id, ordering_key)
}

/// Publishes `payload` to `to` (exchange, routing key), mandatory (an
/// unroutable message comes back in the confirm), on the incoming publisher
/// channel of `partition`, and waits for the broker's confirm, all within
/// the operation timeout.
async fn publish_confirmed(
    inner: &Inner,
    session: &Session,
    what: &str,
    partition: u32,
    (exchange, routing_key): (&str, &str),
    payload: &[u8],
    props: BasicProperties,
) -> Result<Confirmation, BackendError> {
    bounded(inner.timeout(), what, async {
        let ch = session.incoming_pub.get(u64::from(partition)).await?;
        ch.basic_publish(
            ss(exchange),
            ss(routing_key),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload,
            props,
        )
        .await?
        .await
    })
    .await
}

fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn header_u64(headers: &FieldTable, key: &str) -> Option<u64> {
    match *headers.inner().get(key)? {
        AMQPValue::LongLongInt(v) => u64::try_from(v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(v)),
        AMQPValue::ShortInt(v) => u64::try_from(v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(v)),
        AMQPValue::ShortShortInt(v) => u64::try_from(v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(v)),
        AMQPValue::Timestamp(v) => Some(v),
        _ => None,
    }
}
