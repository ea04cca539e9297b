//! The consumer group: each member's presence, the partition assignment
//! every member computes from its view, the partition subscriptions and their
//! hand-over (see the module doc of `incoming`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use fanout_backend::BackendError;
use futures::stream::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::bounded;
use crate::session::{next_id, Session};
use crate::topology::{declare_private_queue, ss, MEMBERS_KEY};
use crate::{lock, Inner};

use super::{unavailable, Item, MemberShared, SlotState, DEAD_AFTER, DISCOVERY, HEARTBEAT, TICK};

/// One consumer of the group: the task that owns its presence queue and
/// its partition subscriptions.
pub(super) struct Member {
    pub(super) inner: Weak<Inner>,
    pub(super) shared: Arc<MemberShared>,
    pub(super) tx: mpsc::Sender<Item>,
    /// Consumer tag prefix: `{consumer_name}.{member id}`.
    pub(super) tag: String,
    pub(super) prefetch: u16,
    /// The namespace's members exchange (presence messages).
    pub(super) exchange: String,
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
    pub(super) async fn run(self, mut stop: watch::Receiver<()>) {
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
            // Gone with the member's channel or connection, so nothing of a
            // dead member stays behind.
            declare_private_queue(&ch, &queue).await?;
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
