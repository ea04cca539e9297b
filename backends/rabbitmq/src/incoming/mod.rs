//! The incoming side: publishing events to partition queues, the consumer
//! group that owns the partitions, settling deliveries, dead letters.
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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use fanout_backend::{
    partition_for, BackendError, ConsumeOptions, DeadLetter, DeadLetterAction, DeadLetterSelection,
    IncomingDelivery, IncomingEvent, OrderingKey, Settle,
};
use futures::stream::{self, BoxStream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Acker, BasicProperties, Channel, Confirmation, Consumer};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::error::{bounded, within};
use crate::session::{next_id, Session};
use crate::topology::{
    partition_key, ss, H_ATTEMPTS, H_ORDERING_KEY, H_PARTITION, H_REASON, MEMBERS_KEY,
};
use crate::{lock, Inner, QueueType};

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
    BackendError::Unavailable(what.to_owned())
}

// ----- publishing --------------------------------------------------------

pub(crate) async fn publish(inner: &Arc<Inner>, event: IncomingEvent) -> Result<(), BackendError> {
    let message_id = ShortString::try_new(event.id.clone())
        .map_err(|_| BackendError::Invalid("event id longer than 255 bytes".into()))?;
    let p = partition_for(&event.ordering_key, inner.config.partitions);
    let session = inner.current()?;
    let mut headers = FieldTable::default();
    headers.insert(
        ss(H_ORDERING_KEY),
        AMQPValue::LongString(LongString::from(event.ordering_key.as_str())),
    );
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message_id)
        .with_headers(headers);
    let exchange = inner.names.incoming_exchange();
    // One channel per partition (modulo the pool): publishes of one
    // ordering key share a channel, so even concurrent ones reach the queue
    // in the order they were issued. Many publishes pipeline on a channel,
    // each awaiting its own confirm.
    let confirmation = bounded(inner.timeout(), "publish incoming", async {
        let ch = session.incoming_pub.get(u64::from(p)).await?;
        ch.basic_publish(
            ss(&exchange),
            ss(&partition_key(p)),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &event.payload,
            props,
        )
        .await?
        .await
    })
    .await;
    match confirmation {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => {
            inner.request_redeclare();
            Err(unavailable(
                "incoming event unroutable: its partition queue is missing; declaring it again",
            ))
        }
        Ok(Confirmation::Nack(_)) => Err(unavailable(
            "the broker did not accept the incoming event (nack)",
        )),
        Ok(Confirmation::NotRequested) => Err(unavailable("publisher confirms are off")),
        Err(e) => {
            inner.hint_lost();
            Err(e)
        }
    }
}

// ----- consuming ---------------------------------------------------------

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

fn to_delivery(
    inner: &Arc<Inner>,
    shared: &Arc<MemberShared>,
    partition: u32,
    slot: u64,
    delivery: Delivery,
) -> IncomingDelivery {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let ordering_key = header_str(&headers, H_ORDERING_KEY).unwrap_or_default();
    let floor = if delivery.redelivered { 2 } else { 1 };
    let attempt = match inner.config.queue_type {
        // The broker's own counter: every earlier return (reject, lost
        // channel) of this message.
        QueueType::Quorum => header_u64(&headers, "x-delivery-count")
            .map(|c| u32::try_from(c.saturating_add(1)).unwrap_or(u32::MAX))
            .unwrap_or(floor),
        // No broker counter: only the redelivered flag.
        QueueType::Classic => floor,
    };
    let event = IncomingEvent {
        id,
        ordering_key: OrderingKey::from_raw(ordering_key),
        payload: Bytes::from(delivery.data),
    };
    let settle = RabbitSettle {
        inner: Arc::downgrade(inner),
        shared: shared.clone(),
        partition,
        slot,
        acker: delivery.acker,
        attempt,
        event: event.clone(),
    };
    IncomingDelivery::new(event, partition, attempt, Box::new(settle))
}

/// Settles one delivery on the channel it came from.
struct RabbitSettle {
    inner: Weak<Inner>,
    shared: Arc<MemberShared>,
    partition: u32,
    slot: u64,
    acker: Acker,
    attempt: u32,
    event: IncomingEvent,
}

impl RabbitSettle {
    /// The delivery is no longer the application's: release its prefetch
    /// place and let a pending hand-over go on.
    fn finish(&self) {
        let mut st = lock(&self.shared.state);
        let counted = match st.slots.get_mut(&self.partition) {
            Some(s) if s.generation == self.slot => {
                s.unsettled = s.unsettled.saturating_sub(1);
                true
            }
            _ => false,
        };
        if counted {
            st.unsettled = st.unsettled.saturating_sub(1);
        }
        drop(st);
        self.shared.changed.notify_waiters();
    }

    fn inner(&self) -> Result<Arc<Inner>, BackendError> {
        self.inner.upgrade().ok_or(BackendError::Closed)
    }

    async fn dead_letter_now(&self, inner: &Arc<Inner>, reason: &str) -> Result<(), BackendError> {
        // Publish first, ack after the confirm: a crash in between leaves
        // the event in both places (it is delivered again and dead-lettered
        // a second time) rather than in neither.
        match publish_dead_letter(inner, &self.event, reason, self.attempt, self.partition).await {
            Ok(()) => {
                let r = bounded(
                    inner.timeout(),
                    "ack dead-lettered event",
                    self.acker.ack(BasicAckOptions::default()),
                )
                .await;
                self.finish();
                settled(r)
            }
            Err(e) => {
                // Give it back so that it is not stuck unsettled; it comes
                // back and will be dead-lettered then.
                let _ = bounded(
                    inner.timeout(),
                    "requeue",
                    self.acker.nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    }),
                )
                .await;
                self.finish();
                Err(e)
            }
        }
    }
}

/// An ack or nack the broker never got (its channel is gone: connection
/// loss, or the stream was dropped) means the event will come back.
fn settled(r: Result<bool, BackendError>) -> Result<(), BackendError> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(unavailable(
            "the delivery's channel is closed; the event will be delivered again",
        )),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(&self) -> Result<(), BackendError> {
        let inner = self.inner()?;
        let r = bounded(
            inner.timeout(),
            "ack",
            self.acker.ack(BasicAckOptions::default()),
        )
        .await;
        self.finish();
        settled(r)
    }

    async fn reject(&self) -> Result<(), BackendError> {
        let inner = self.inner()?;
        // Requeued at the head of its partition (both queue types put a
        // requeued message back in front of later ones).
        let r = bounded(
            inner.timeout(),
            "reject",
            self.acker.nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            }),
        )
        .await;
        self.finish();
        settled(r)
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BackendError> {
        let inner = self.inner()?;
        self.dead_letter_now(&inner, reason).await
    }
}

/// One consumer of the group: the task that owns its presence queue and
/// its partition subscriptions.
struct Member {
    inner: Weak<Inner>,
    shared: Arc<MemberShared>,
    tx: mpsc::Sender<Item>,
    /// Consumer tag prefix: `{consumer_name}.{member id}`.
    tag: String,
    prefetch: u16,
    /// The namespace's members exchange (presence messages).
    exchange: String,
}

/// One partition this member subscribes to.
struct LocalSlot {
    generation: u64,
    channel: Channel,
    pump: JoinHandle<()>,
}

enum Exit {
    /// The stream was dropped or the backend shut down.
    Stop,
    /// Start over (on the next session if this one died). `surface`: the
    /// application held deliveries that can no longer be settled, which
    /// the stream reports once as an `Err` item.
    Retry { error: BackendError, surface: bool },
}

impl Member {
    async fn run(self, mut stop: watch::Receiver<()>) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut sessions = inner.session.subscribe();
        let mut stopping = inner.stopping.subscribe();
        drop(inner);
        loop {
            // Wait for a live session.
            let session = loop {
                if *stopping.borrow() {
                    return;
                }
                let current = sessions.borrow_and_update().clone();
                if let Some(s) = current.filter(|s| s.alive()) {
                    break s;
                }
                tokio::select! {
                    r = stop.changed() => if r.is_err() { return },
                    r = sessions.changed() => if r.is_err() { return },
                    _ = stopping.changed() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
            };
            let exit = self
                .run_session(&session, &mut stop, &mut sessions, &mut stopping)
                .await;
            self.shared.clear();
            match exit {
                Exit::Stop => return,
                Exit::Retry { error, surface } => {
                    if surface {
                        tracing::warn!(member = %self.shared.id, error = %error, "consumer lost its partitions; unsettled events will be redelivered");
                        // Tell the application once; the stream goes on.
                        let _ = self.tx.try_send(Item::Error(error));
                    } else {
                        tracing::debug!(member = %self.shared.id, error = %error, "consumer restarts");
                    }
                    tokio::select! {
                        r = stop.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep(TICK) => {}
                    }
                }
            }
        }
    }

    async fn run_session(
        &self,
        session: &Arc<Session>,
        stop: &mut watch::Receiver<()>,
        sessions: &mut watch::Receiver<Option<Arc<Session>>>,
        stopping: &mut watch::Receiver<bool>,
    ) -> Exit {
        let Some(inner) = self.inner.upgrade() else {
            return Exit::Stop;
        };
        let (presence, mut heard) = match self.join(&inner, session).await {
            Ok(p) => p,
            Err(error) => {
                return Exit::Retry {
                    error,
                    surface: false,
                }
            }
        };
        drop(inner);
        let me = self.shared.id.clone();
        let mut view: HashMap<String, Instant> = HashMap::new();
        view.insert(me.clone(), Instant::now());
        let joined = Instant::now();
        let mut last_beat = Instant::now();
        let mut slots: HashMap<u32, LocalSlot> = HashMap::new();
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(u32, u64)>();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // Every handle of the backend is gone (dropped without
            // shutdown): leave.
            let mut leave = self.inner.strong_count() == 0;
            {
                let settled = self.shared.changed.notified();
                tokio::select! {
                    r = stop.changed() => if r.is_err() { leave = true },
                    _ = stopping.changed() => leave = true,
                    _ = sessions.changed() => {}
                    msg = heard.next() => match msg {
                        Some(Ok(d)) => self.on_presence(&presence, &d.data, &mut view).await,
                        Some(Err(_)) | None => {
                            let surface = self.held_deliveries();
                            self.release_all(&mut slots).await;
                            return Exit::Retry {
                                error: unavailable("presence queue consumer ended"),
                                surface,
                            };
                        }
                    },
                    Some((p, g)) = ended_rx.recv() => {
                        if slots.get(&p).is_some_and(|s| s.generation == g) {
                            slots.remove(&p);
                            self.shared.remove_slot(p, g);
                        }
                    }
                    _ = tick.tick() => {}
                    _ = settled => {}
                }
            }
            if leave || *stopping.borrow() {
                self.release_all(&mut slots).await;
                say(&presence, &self.exchange, "bye", &me).await;
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), presence.close(200, "bye".into()))
                        .await;
                return Exit::Stop;
            }
            let replaced = sessions
                .borrow()
                .as_ref()
                .is_none_or(|s| s.generation != session.generation);
            if replaced || !session.alive() {
                let surface = self.held_deliveries();
                self.release_all(&mut slots).await;
                return Exit::Retry {
                    error: unavailable("connection to RabbitMQ lost"),
                    surface,
                };
            }
            if last_beat.elapsed() >= HEARTBEAT {
                say(&presence, &self.exchange, "hb", &me).await;
                last_beat = Instant::now();
            }
            view.retain(|id, seen| *id == me || seen.elapsed() < DEAD_AFTER);
            if joined.elapsed() >= DISCOVERY {
                let Some(inner) = self.inner.upgrade() else {
                    self.release_all(&mut slots).await;
                    return Exit::Stop;
                };
                let wanted = assignment(&view, &me, inner.config.partitions);
                self.rebalance(&inner, session, &wanted, &mut slots, &ended_tx)
                    .await;
            }
            self.finish_handovers(&mut slots).await;
        }
    }

    /// Whether the application holds unsettled deliveries of this member.
    fn held_deliveries(&self) -> bool {
        lock(&self.shared.state).unsettled > 0
    }

    /// Declares this member's presence queue, binds it, starts hearing the
    /// others and says hello.
    async fn join(
        &self,
        inner: &Inner,
        session: &Session,
    ) -> Result<(Channel, Consumer), BackendError> {
        let queue = inner.names.member_queue(&self.shared.id);
        let exchange = inner.names.members_exchange();
        let (ch, consumer) = bounded(inner.timeout(), "join the consumer group", async {
            let ch = session.consume.create_channel().await?;
            // Exclusive and auto-delete: gone with the member's channel or
            // connection, so nothing of a dead member stays behind.
            ch.queue_declare(
                ss(&queue),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
            ch.queue_bind(
                ss(&queue),
                ss(&exchange),
                ss(MEMBERS_KEY),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let consumer = ch
                .basic_consume(
                    ss(&queue),
                    ss(&format!("{}.presence", self.tag)),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok((ch, consumer))
        })
        .await?;
        say(&ch, &self.exchange, "hello", &self.shared.id).await;
        Ok((ch, consumer))
    }

    async fn on_presence(&self, ch: &Channel, data: &[u8], view: &mut HashMap<String, Instant>) {
        let text = String::from_utf8_lossy(data);
        let Some((kind, id)) = text.split_once(' ') else {
            return;
        };
        if id == self.shared.id || id.is_empty() || id.len() > 64 {
            return;
        }
        match kind {
            "hello" => {
                view.insert(id.to_owned(), Instant::now());
                // Answer at once, so the newcomer knows us before it
                // chooses its partitions.
                say(ch, &self.exchange, "hb", &self.shared.id).await;
            }
            "hb" => {
                view.insert(id.to_owned(), Instant::now());
            }
            "bye" => {
                view.remove(id);
            }
            _ => {}
        }
    }

    /// Subscribes to wanted partitions it lacks and starts handing over the
    /// ones it holds but no longer wants.
    async fn rebalance(
        &self,
        inner: &Inner,
        session: &Session,
        wanted: &HashSet<u32>,
        slots: &mut HashMap<u32, LocalSlot>,
        ended: &mpsc::UnboundedSender<(u32, u64)>,
    ) {
        {
            let mut st = lock(&self.shared.state);
            for (p, slot) in st.slots.iter_mut() {
                // Wanted again while handing over: keep it after all.
                slot.draining = !wanted.contains(p);
            }
        }
        for &p in wanted {
            if slots.contains_key(&p) {
                continue;
            }
            match self.subscribe(inner, session, p, ended).await {
                Ok(slot) => {
                    slots.insert(p, slot);
                }
                Err(e) => {
                    // Retried on the next tick.
                    tracing::debug!(partition = p, error = %e, "cannot subscribe to partition yet");
                    break;
                }
            }
        }
    }

    async fn subscribe(
        &self,
        inner: &Inner,
        session: &Session,
        p: u32,
        ended: &mpsc::UnboundedSender<(u32, u64)>,
    ) -> Result<LocalSlot, BackendError> {
        let queue = inner.names.partition_queue(p);
        let tag = format!("{}.{p}", self.tag);
        let prefetch = self.prefetch;
        // One channel per partition: closing it is how the partition is
        // handed over (the broker requeues exactly that partition's
        // unacked messages and activates the next consumer).
        let (channel, consumer) = bounded(inner.timeout(), "subscribe to partition", async {
            let ch = session.consume.create_channel().await?;
            ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = ch
                .basic_consume(
                    ss(&queue),
                    ss(&tag),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok((ch, consumer))
        })
        .await?;
        let generation = next_id(&inner.ids);
        lock(&self.shared.state).slots.insert(
            p,
            SlotState {
                generation,
                draining: false,
                unsettled: 0,
            },
        );
        let pump = tokio::spawn(pump(
            consumer,
            p,
            generation,
            self.tx.clone(),
            ended.clone(),
        ));
        Ok(LocalSlot {
            generation,
            channel,
            pump,
        })
    }

    /// Closes the channels of partitions being handed over once nothing
    /// handed out from them is unsettled.
    async fn finish_handovers(&self, slots: &mut HashMap<u32, LocalSlot>) {
        let done: Vec<u32> = {
            let st = lock(&self.shared.state);
            slots
                .iter()
                .filter(|(p, local)| {
                    st.slots.get(p).is_some_and(|s| {
                        s.generation == local.generation && s.draining && s.unsettled == 0
                    })
                })
                .map(|(p, _)| *p)
                .collect()
        };
        for p in done {
            if let Some(slot) = slots.remove(&p) {
                close_slot(&slot).await;
                self.shared.remove_slot(p, slot.generation);
                tracing::debug!(member = %self.shared.id, partition = p, "partition handed over");
            }
        }
    }

    /// Leaves every partition at once (the stream is gone or the session
    /// died): whatever is unsettled goes back to its queue.
    async fn release_all(&self, slots: &mut HashMap<u32, LocalSlot>) {
        for (p, slot) in slots.drain() {
            close_slot(&slot).await;
            self.shared.remove_slot(p, slot.generation);
        }
    }
}

async fn close_slot(slot: &LocalSlot) {
    if slot.channel.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            slot.channel.close(200, "partition released".into()),
        )
        .await;
    }
    slot.pump.abort();
}

/// Forwards one partition subscription's deliveries to the member's stream.
async fn pump(
    mut consumer: Consumer,
    partition: u32,
    slot: u64,
    tx: mpsc::Sender<Item>,
    ended: mpsc::UnboundedSender<(u32, u64)>,
) {
    while let Some(delivery) = consumer.next().await {
        match delivery {
            Ok(delivery) => {
                let item = Item::Delivery {
                    partition,
                    slot,
                    delivery: Box::new(delivery),
                };
                if tx.send(item).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(partition, error = %e, "partition consumer ended");
                break;
            }
        }
    }
    let _ = ended.send((partition, slot));
}

/// The partitions `me` should own: members sorted by id, partition `p` to
/// member `p % n`. Every member computes the same answer from the same view.
fn assignment(view: &HashMap<String, Instant>, me: &str, partitions: u32) -> HashSet<u32> {
    let mut ids: Vec<&str> = view.keys().map(String::as_str).collect();
    ids.sort_unstable();
    let n = ids.len().max(1);
    (0..partitions)
        .filter(|p| ids.get(*p as usize % n).is_some_and(|id| *id == me))
        .collect()
}

/// Publishes one presence message on the member's channel (no confirms:
/// losing one is harmless, the next heartbeat repeats it).
async fn say(ch: &Channel, exchange: &str, kind: &str, id: &str) {
    let body = format!("{kind} {id}");
    let sent = tokio::time::timeout(
        Duration::from_secs(1),
        ch.basic_publish(
            ss(exchange),
            ss(MEMBERS_KEY),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(1),
        ),
    )
    .await;
    if let Ok(Err(e)) = sent {
        tracing::debug!(error = %e, "presence message not sent");
    }
}

// ----- dead letters ------------------------------------------------------

async fn publish_dead_letter(
    inner: &Arc<Inner>,
    event: &IncomingEvent,
    reason: &str,
    attempts: u32,
    partition: u32,
) -> Result<(), BackendError> {
    let session = inner.current()?;
    let message_id = ShortString::try_new(event.id.clone()).unwrap_or_else(|_| ss(""));
    let mut headers = FieldTable::default();
    headers.insert(
        ss(H_ORDERING_KEY),
        AMQPValue::LongString(LongString::from(event.ordering_key.as_str())),
    );
    headers.insert(
        ss(H_REASON),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert(ss(H_ATTEMPTS), AMQPValue::LongLongInt(i64::from(attempts)));
    headers.insert(
        ss(H_PARTITION),
        AMQPValue::LongLongInt(i64::from(partition)),
    );
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message_id)
        .with_headers(headers);
    let exchange = inner.names.dead_letter_exchange();
    let confirmation = bounded(inner.timeout(), "publish dead letter", async {
        let ch = session.incoming_pub.get(u64::from(partition)).await?;
        ch.basic_publish(
            ss(&exchange),
            ss(crate::topology::DEAD_KEY),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &event.payload,
            props,
        )
        .await?
        .await
    })
    .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => {
            inner.request_redeclare();
            Err(unavailable(
                "dead letter unroutable: the dead-letter queue is missing; declaring it again",
            ))
        }
        Confirmation::Nack(_) => Err(unavailable("the broker refused the dead letter (nack)")),
        Confirmation::NotRequested => Err(unavailable("publisher confirms are off")),
    }
}

/// Reads up to `limit` dead letters without removing them: basic.get
/// without ack on a channel of its own, then closing that channel, which
/// puts every message back in its original place (the dead-letter queue is
/// classic for this reason). Readers are serialised, so two of them never
/// see halves of the queue.
pub(crate) async fn dead_letters(
    inner: &Arc<Inner>,
    limit: usize,
) -> Result<Vec<DeadLetter>, BackendError> {
    let selection = DeadLetterSelection { ids: None, limit };
    scan_dead_letters(inner, &selection, None).await
}

/// Replays or drops the selected dead letters: the same scan as
/// [`dead_letters`], acking (removing) each selected one after its replay
/// was confirmed; closing the channel puts the others back in order.
pub(crate) async fn resolve_dead_letters(
    inner: &Arc<Inner>,
    selection: &DeadLetterSelection,
    action: DeadLetterAction,
) -> Result<Vec<DeadLetter>, BackendError> {
    scan_dead_letters(inner, selection, Some(action)).await
}

async fn scan_dead_letters(
    inner: &Arc<Inner>,
    selection: &DeadLetterSelection,
    action: Option<DeadLetterAction>,
) -> Result<Vec<DeadLetter>, BackendError> {
    if selection.limit == 0 {
        return Ok(Vec::new());
    }
    let _reader = within(inner.timeout(), "read dead letters", async {
        Ok(inner.dead_read.lock().await)
    })
    .await?;
    let session = inner.current()?;
    let queue = inner.names.dead_letter_queue();
    let per_get = inner.timeout();
    let ch = bounded(per_get, "open channel", session.consume.create_channel()).await?;
    let mut out = Vec::new();
    let mut result = Ok(());
    while out.len() < selection.limit {
        let m = match bounded(
            per_get,
            "read dead letters",
            ch.basic_get(ss(&queue), BasicGetOptions { no_ack: false }),
        )
        .await
        {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let dead = parse_dead_letter(&m.delivery);
        if !selection.matches(&dead.event.id) {
            continue;
        }
        if let Some(action) = action {
            if action == DeadLetterAction::Replay {
                // Confirmed on the incoming side before it leaves the
                // dead letters: a crash in between leaves it in both.
                if let Err(e) = publish(inner, dead.event.clone()).await {
                    result = Err(e);
                    break;
                }
            }
            let acked = bounded(
                per_get,
                "remove dead letter",
                m.delivery.acker.ack(BasicAckOptions::default()),
            )
            .await;
            if let Err(e) = settled(acked) {
                result = Err(e);
                break;
            }
        }
        out.push(dead);
    }
    // Closing the channel requeues everything we took and did not ack, in
    // order.
    let _ = tokio::time::timeout(per_get, ch.close(200, "done".into())).await;
    result.map(|()| out)
}

fn parse_dead_letter(d: &Delivery) -> DeadLetter {
    let headers = d.properties.headers().clone().unwrap_or_default();
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let ordering_key = header_str(&headers, H_ORDERING_KEY).unwrap_or_default();
    // Our own dead letters say why; the broker's (quorum delivery limit,
    // after workers crashed on the event) carry x-first-death-reason.
    let (reason, attempts) = match header_str(&headers, H_REASON) {
        Some(r) => (
            r,
            header_u64(&headers, H_ATTEMPTS)
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(0),
        ),
        // A broker's own dead letter (a delivery limit set by policy, a
        // message TTL): what it says.
        None => match header_str(&headers, "x-first-death-reason") {
            Some(why) => (format!("dead-lettered by the broker: {why}"), 0),
            None => ("unknown".to_owned(), 0),
        },
    };
    DeadLetter {
        event: IncomingEvent {
            id,
            ordering_key: OrderingKey::from_raw(ordering_key),
            payload: Bytes::from(d.data.clone()),
        },
        reason,
        attempts,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_covers_every_partition_once_and_evenly() {
        let now = Instant::now();
        let view: HashMap<String, Instant> = ["b", "a", "c"]
            .iter()
            .map(|s| (s.to_string(), now))
            .collect();
        let mut seen = HashSet::new();
        for me in ["a", "b", "c"] {
            let mine = assignment(&view, me, 8);
            assert!((2..=3).contains(&mine.len()), "{me}: {mine:?}");
            for p in mine {
                assert!(seen.insert(p), "partition {p} twice");
            }
        }
        assert_eq!(seen.len(), 8);
    }
}
