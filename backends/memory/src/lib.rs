//! The in-process [`FanoutBackend`]: the reference semantics of the
//! contract, the zero-dependency default of `fanout serve`, and the fake
//! broker that links several in-process gateways in tests.
//!
//! Parts:
//! - the incoming side: `partitions` FIFO queues; each partition is owned by
//!   one consumer at a time and moves only when its owner holds nothing
//!   unsettled from it (or is gone);
//! - the outgoing side: a route table (key -> servers) and one bounded
//!   channel per registered server, so a slow gateway applies backpressure
//!   to the publisher instead of losing messages.
//!
//! Nothing survives the process: `durable_incoming` is false, and the
//! capabilities say so.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use fanout_backend::{
    partition_for, BackendError, Capabilities, ConsumeOptions, DeadLetter, DeadLetterAction,
    DeadLetterSelection, FanoutBackend, IncomingDelivery, IncomingEvent, OutgoingMessage, RouteKey,
    RouteOutcome, ServerEvent, ServerId, ServerStream, Settle,
};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::{mpsc, Notify};

/// Settings of a memory backend.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Number of incoming partitions (at least 1).
    pub partitions: u32,
    /// Most events queued on the incoming side; a publish beyond it fails
    /// with `Unavailable` rather than growing without bound.
    pub max_queued: usize,
    /// Capacity of each server's delivery channel; when full, publishers wait.
    pub server_buffer: usize,
    /// Dead letters kept for inspection. Beyond it the oldest goes, with an
    /// error logged and counted (`dead_letters_dropped`): the process's
    /// memory is the bound.
    pub max_dead_letters: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            partitions: 16,
            max_queued: 1_000_000,
            server_buffer: 65_536,
            max_dead_letters: 10_000,
        }
    }
}

/// The in-process backend. Cloning shares the same broker.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: MemoryConfig,
    state: Mutex<State>,
    /// Woken on every change a waiting consumer could care about.
    incoming_changed: Notify,
    /// Dead letters dropped because `max_dead_letters` was reached.
    dead_letters_dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    partitions: Vec<Partition>,
    queued: usize,
    consumers: BTreeSet<u64>,
    next_consumer: u64,
    next_seq: u64,
    dead: VecDeque<DeadLetter>,
    servers: HashMap<ServerId, Server>,
    routes: HashMap<RouteKey, HashSet<ServerId>>,
}

#[derive(Debug, Default)]
struct Partition {
    queue: VecDeque<Entry>,
    /// Delivered, not yet settled; in delivery (= publish) order.
    inflight: Vec<Entry>,
    owner: Option<u64>,
}

#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    event: IncomingEvent,
    deliveries: u32,
}

#[derive(Debug)]
struct Server {
    tx: mpsc::Sender<ServerEvent>,
    generation: u64,
    keys: HashSet<RouteKey>,
}

impl MemoryBackend {
    /// A new, empty broker.
    pub fn new(config: MemoryConfig) -> Self {
        let partitions = config.partitions.max(1) as usize;
        let state = State {
            partitions: (0..partitions).map(|_| Partition::default()).collect(),
            ..State::default()
        };
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                incoming_changed: Notify::new(),
                dead_letters_dropped: AtomicU64::new(0),
            }),
        }
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl Inner {
    /// A std mutex, not tokio's: it is never held across an await, and every
    /// critical section is a few map operations.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are still
        // consistent (each section finishes its writes before anything that
        // can panic), so recovering the guard is sound.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dead_letter(&self, st: &mut State, entry: Entry, reason: &str) {
        st.dead.push_back(DeadLetter {
            event: entry.event,
            reason: reason.to_owned(),
            attempts: entry.deliveries,
        });
        while st.dead.len() > self.config.max_dead_letters {
            if let Some(gone) = st.dead.pop_front() {
                self.dead_letters_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    event = %gone.event.id,
                    reason = %gone.reason,
                    bound = self.config.max_dead_letters,
                    "dead letters full: dropped the oldest (replay or drop them with `fanout dead-letters`)"
                );
            }
        }
    }

    /// The next delivery for `consumer`, if one of its partitions has one.
    fn take_next(
        &self,
        st: &mut State,
        consumer: u64,
        prefetch: usize,
        cursor: &mut usize,
    ) -> Option<(u32, Entry)> {
        let members: Vec<u64> = st.consumers.iter().copied().collect();
        let n = st.partitions.len();
        let unsettled: usize = st
            .partitions
            .iter()
            .filter(|p| p.owner == Some(consumer))
            .map(|p| p.inflight.len())
            .sum();
        if unsettled >= prefetch || members.is_empty() {
            return None;
        }
        for i in 0..n {
            let pi = (*cursor + i) % n;
            let desired = members[pi % members.len()];
            if desired != consumer {
                continue;
            }
            let p = &mut st.partitions[pi];
            // The partition changes hands only when its previous owner has
            // nothing unsettled, so its order survives rebalancing.
            if p.owner.is_some_and(|o| o != consumer) && !p.inflight.is_empty() {
                continue;
            }
            let Some(mut entry) = p.queue.pop_front() else {
                continue;
            };
            p.owner = Some(consumer);
            entry.deliveries += 1;
            p.inflight.push(entry.clone());
            *cursor = (pi + 1) % n;
            return Some((pi as u32, entry));
        }
        None
    }

    /// Settles one in-flight entry; `None` if it is no longer in flight
    /// (already settled, or requeued when its consumer left).
    fn remove_inflight(
        &self,
        st: &mut State,
        consumer: u64,
        partition: u32,
        seq: u64,
    ) -> Option<Entry> {
        let p = st.partitions.get_mut(partition as usize)?;
        if p.owner != Some(consumer) {
            return None;
        }
        let pos = p.inflight.iter().position(|e| e.seq == seq)?;
        Some(p.inflight.remove(pos))
    }

    fn leave(&self, consumer: u64) {
        let mut st = self.lock();
        st.consumers.remove(&consumer);
        for p in st
            .partitions
            .iter_mut()
            .filter(|p| p.owner == Some(consumer))
        {
            // Unsettled events go back in front, in their original order.
            for e in p.inflight.drain(..).rev() {
                p.queue.push_front(e);
            }
            p.owner = None;
        }
        drop(st);
        self.incoming_changed.notify_waiters();
    }
}

struct MemorySettle {
    inner: Weak<Inner>,
    consumer: u64,
    partition: u32,
    seq: u64,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(&self) -> Result<(), BackendError> {
        let inner = self.inner.upgrade().ok_or(BackendError::Closed)?;
        let mut st = inner.lock();
        if inner
            .remove_inflight(&mut st, self.consumer, self.partition, self.seq)
            .is_some()
        {
            st.queued -= 1;
        }
        drop(st);
        inner.incoming_changed.notify_waiters();
        Ok(())
    }

    async fn reject(&self) -> Result<(), BackendError> {
        let inner = self.inner.upgrade().ok_or(BackendError::Closed)?;
        let mut st = inner.lock();
        if let Some(e) = inner.remove_inflight(&mut st, self.consumer, self.partition, self.seq) {
            st.partitions[self.partition as usize].queue.push_front(e);
        }
        drop(st);
        inner.incoming_changed.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BackendError> {
        let inner = self.inner.upgrade().ok_or(BackendError::Closed)?;
        let mut st = inner.lock();
        if let Some(e) = inner.remove_inflight(&mut st, self.consumer, self.partition, self.seq) {
            st.queued -= 1;
            inner.dead_letter(&mut st, e, reason);
        }
        drop(st);
        inner.incoming_changed.notify_waiters();
        Ok(())
    }
}

/// Leaves the consumer group when the consumer's stream is dropped.
struct ConsumerGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        self.inner.leave(self.id);
    }
}

/// Deregisters a server when its stream is dropped, unless the id was
/// registered anew since.
struct ServerGuard {
    inner: Weak<Inner>,
    id: ServerId,
    generation: u64,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut st = inner.lock();
            if st
                .servers
                .get(&self.id)
                .is_some_and(|s| s.generation == self.generation)
            {
                remove_server(&mut st, &self.id);
            }
        }
    }
}

fn remove_server(st: &mut State, id: &ServerId) {
    if let Some(server) = st.servers.remove(id) {
        for key in server.keys {
            if let Some(set) = st.routes.get_mut(&key) {
                set.remove(id);
                if set.is_empty() {
                    st.routes.remove(&key);
                }
            }
        }
    }
}

#[async_trait]
impl FanoutBackend for MemoryBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "memory",
            durable_incoming: false,
            incoming_at_least_once: true,
            per_key_ordering: true,
            outgoing_at_least_once: true,
            explicit_routing_table: true,
            reports_unroutable: true,
        }
    }

    async fn health(&self) -> Result<(), BackendError> {
        if self.inner.lock().closed {
            return Err(BackendError::Closed);
        }
        Ok(())
    }

    async fn publish_incoming(&self, event: IncomingEvent) -> Result<(), BackendError> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(BackendError::Closed);
        }
        if st.queued >= self.inner.config.max_queued {
            return Err(BackendError::Unavailable(
                format!(
                    "incoming side is full ({} events waiting for workers)",
                    st.queued
                )
                .into(),
            ));
        }
        let partition = partition_for(&event.ordering_key, st.partitions.len() as u32);
        let seq = st.next_seq;
        st.next_seq += 1;
        st.queued += 1;
        st.partitions[partition as usize].queue.push_back(Entry {
            seq,
            event,
            deliveries: 0,
        });
        drop(st);
        self.inner.incoming_changed.notify_waiters();
        Ok(())
    }

    async fn consume_incoming(
        &self,
        options: ConsumeOptions,
    ) -> Result<BoxStream<'static, Result<IncomingDelivery, BackendError>>, BackendError> {
        let id = {
            let mut st = self.inner.lock();
            if st.closed {
                return Err(BackendError::Closed);
            }
            let id = st.next_consumer;
            st.next_consumer += 1;
            st.consumers.insert(id);
            id
        };
        self.inner.incoming_changed.notify_waiters();
        let guard = ConsumerGuard {
            inner: self.inner.clone(),
            id,
        };
        let prefetch = usize::from(options.prefetch.max(1));
        let stream = stream::unfold((guard, 0usize), move |(guard, mut cursor)| async move {
            loop {
                let inner = guard.inner.clone();
                let changed = inner.incoming_changed.notified();
                tokio::pin!(changed);
                // Registers interest before looking, so a change between the
                // look and the wait still wakes us.
                changed.as_mut().enable();
                {
                    let mut st = inner.lock();
                    if st.closed {
                        return None;
                    }
                    if let Some((partition, entry)) =
                        inner.take_next(&mut st, guard.id, prefetch, &mut cursor)
                    {
                        let settle = MemorySettle {
                            inner: Arc::downgrade(&inner),
                            consumer: guard.id,
                            partition,
                            seq: entry.seq,
                        };
                        let d = IncomingDelivery::new(
                            entry.event,
                            partition,
                            entry.deliveries,
                            Box::new(settle),
                        );
                        return Some((Ok(d), (guard, cursor)));
                    }
                }
                changed.await;
            }
        });
        Ok(stream.boxed())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BackendError> {
        Ok(self.inner.lock().dead.iter().take(limit).cloned().collect())
    }

    async fn resolve_dead_letters(
        &self,
        selection: &DeadLetterSelection,
        action: DeadLetterAction,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(BackendError::Closed);
        }
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(st.dead.len());
        for d in std::mem::take(&mut st.dead) {
            if taken.len() < selection.limit && selection.matches(&d.event.id) {
                taken.push(d);
            } else {
                kept.push_back(d);
            }
        }
        st.dead = kept;
        if action == DeadLetterAction::Replay {
            // One lock for the whole call: replayed events are queued
            // before anything published after it, as a confirmed publish is.
            for d in &taken {
                let partition = partition_for(&d.event.ordering_key, st.partitions.len() as u32);
                let seq = st.next_seq;
                st.next_seq += 1;
                st.queued += 1;
                st.partitions[partition as usize].queue.push_back(Entry {
                    seq,
                    event: d.event.clone(),
                    deliveries: 0,
                });
            }
        }
        drop(st);
        self.inner.incoming_changed.notify_waiters();
        Ok(taken)
    }

    async fn register_server(&self, server: &ServerId) -> Result<ServerStream, BackendError> {
        let (tx, rx) = mpsc::channel(self.inner.config.server_buffer.max(1));
        let generation = {
            let mut st = self.inner.lock();
            if st.closed {
                return Err(BackendError::Closed);
            }
            if st.servers.get(server).is_some_and(|s| !s.tx.is_closed()) {
                return Err(BackendError::Conflict(server.to_string().into()));
            }
            remove_server(&mut st, server);
            let generation = st.next_seq;
            st.next_seq += 1;
            st.servers.insert(
                server.clone(),
                Server {
                    tx,
                    generation,
                    keys: HashSet::new(),
                },
            );
            generation
        };
        let guard = ServerGuard {
            inner: Arc::downgrade(&self.inner),
            id: server.clone(),
            generation,
        };
        let stream = stream::unfold((rx, guard), |(mut rx, guard)| async move {
            rx.recv().await.map(|ev| (ev, (rx, guard)))
        });
        Ok(stream.boxed())
    }

    async fn deregister_server(&self, server: &ServerId) -> Result<(), BackendError> {
        remove_server(&mut self.inner.lock(), server);
        Ok(())
    }

    async fn bind(&self, server: &ServerId, key: &RouteKey) -> Result<(), BackendError> {
        let mut st = self.inner.lock();
        let s = st
            .servers
            .get_mut(server)
            .ok_or_else(|| BackendError::NotRegistered(server.to_string().into()))?;
        s.keys.insert(key.clone());
        st.routes
            .entry(key.clone())
            .or_default()
            .insert(server.clone());
        Ok(())
    }

    async fn unbind(&self, server: &ServerId, key: &RouteKey) -> Result<(), BackendError> {
        let mut st = self.inner.lock();
        if let Some(s) = st.servers.get_mut(server) {
            s.keys.remove(key);
        }
        if let Some(set) = st.routes.get_mut(key) {
            set.remove(server);
            if set.is_empty() {
                st.routes.remove(key);
            }
        }
        Ok(())
    }

    async fn publish_outgoing(
        &self,
        key: &RouteKey,
        payload: Bytes,
    ) -> Result<RouteOutcome, BackendError> {
        // A turn for the runtime now and then, as a network call would
        // give: an unroutable publish never waits otherwise, so a batch of
        // them (a 1,000-member channel creation publishes 2,000 entries)
        // held its thread and stalled every delivery behind it.
        tokio::task::coop::consume_budget().await;
        let targets: Vec<mpsc::Sender<ServerEvent>> = {
            let st = self.inner.lock();
            if st.closed {
                return Err(BackendError::Closed);
            }
            match st.routes.get(key) {
                None => return Ok(RouteOutcome::Unroutable),
                Some(servers) => servers
                    .iter()
                    .filter_map(|s| st.servers.get(s).map(|s| s.tx.clone()))
                    .collect(),
            }
        };
        let mut delivered = 0;
        for tx in targets {
            let msg = ServerEvent::Message(OutgoingMessage {
                key: key.clone(),
                payload: payload.clone(),
            });
            // A send fails only if the server went away meanwhile, which is
            // the same as it not being bound.
            if tx.send(msg).await.is_ok() {
                delivered += 1;
            }
        }
        Ok(if delivered == 0 {
            RouteOutcome::Unroutable
        } else {
            RouteOutcome::Routed {
                servers: Some(delivered),
            }
        })
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![(
            "dead_letters_dropped",
            self.inner.dead_letters_dropped.load(Ordering::Relaxed),
        )]
    }

    async fn shutdown(&self) -> Result<(), BackendError> {
        let mut st = self.inner.lock();
        st.closed = true;
        st.servers.clear();
        st.routes.clear();
        drop(st);
        self.inner.incoming_changed.notify_waiters();
        Ok(())
    }
}
