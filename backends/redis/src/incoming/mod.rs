//! The incoming side: `partitions` Redis Streams with one consumer group
//! each, and partition ownership by leases.
//!
//! Files, split along the same lines as the RabbitMQ backend's `incoming`:
//! - `mod.rs`: a consumer's state, its task's loop and its reads of new
//!   entries (what `consume_incoming` starts);
//! - [`publish`]: appending an event to its partition stream;
//! - [`group`]: the consumer group: the streams' groups, membership and
//!   leases (maintenance), take-over of a new partition's pending entries,
//!   release and leaving;
//! - [`settle`]: ack, reject and dead-letter of one delivery, and the
//!   redelivery of what a consumer still holds (with its attempt count);
//! - [`dead_letter`]: listing, replaying and dropping dead letters, and
//!   dead-lettering malformed entries.
//!

//!
//! Each `consume_incoming` stream is one consumer with a unique token (its
//! consumer name in the groups and the value of its leases) and one
//! background task that does all of its Redis I/O in sequence:
//!
//! - **maintenance** (every 100 ms, one script): heartbeat in the consumers
//!   ZSET, renewal of its leases, acquisition of the free partitions it is
//!   *desired* to own. Live consumers sorted by token; partition `p` is
//!   desired by the consumer at index `p mod n`, which spreads partitions
//!   evenly. A consumer that owns a partition it is no longer desired for
//!   (another consumer joined) stops reading it, lets its unsettled
//!   deliveries drain, and only then releases it, so the next owner starts
//!   exactly where it stopped;
//! - **take-over** of a newly acquired partition: the pending entries other
//!   consumers left (a crashed or departed owner) are claimed oldest first
//!   and delivered before anything new; an entry younger than `claim_idle`
//!   stops the take-over until it ages or is acked (its owner may still be
//!   alive), so order is never broken by skipping it;
//! - **reading** new entries with one `XREADGROUP ... >` over every owned
//!   partition, blocking at most 100 ms on a connection of its own (a
//!   blocking command would stall a shared multiplexed connection);
//! - **redelivery** of entries this consumer still holds: rejected ones,
//!   deliveries dropped unsettled, settles that failed. Per partition the
//!   lowest entry id known locally is always delivered next, so a rejected
//!   entry comes back before later ones.
//!
//! A consumer reads only while its last successful maintenance is recent
//! (a quarter of `lease_ttl` plus the read's block time short of expiry),
//! so a consumer cut off from Redis stops reading before another consumer
//! can take its partitions. Its unsettled entries stay in its pending list
//! and are taken over by the next owner: at-least-once, in order.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout_backend::{BackendError, ConsumeOptions, IncomingDelivery, IncomingEvent};
use futures::stream::{BoxStream, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::keys::GROUP;
use crate::reply::{self, EntryId, ReadEntry};
use crate::{jitter_fraction, with_timeout, Inner};

mod dead_letter;
mod group;
mod publish;
mod settle;

pub(crate) use dead_letter::{dead_letters, resolve_dead_letters};
pub(crate) use group::ensure_groups;
pub(crate) use publish::{append, publish};

/// Longest a read blocks in Redis; also the longest the consumer task takes
/// to notice its stream was dropped or a rebalance is due while idle.
const READ_BLOCK: Duration = Duration::from_millis(100);
/// On a cluster, how long an idle consumer waits between polls of its
/// streams. A blocking read takes one stream per command there (streams of
/// different slots cannot be read together), and one connection blocked on
/// one stream would hold back the others; so an idle consumer polls, and a
/// new event waits at most this long. Under load every poll returns
/// entries and nobody waits.
const CLUSTER_POLL: Duration = Duration::from_millis(10);
/// How often a consumer heartbeats, renews and acquires. Short, so a new
/// consumer gets its share within a few hundred ms.
const MAINTENANCE: Duration = Duration::from_millis(100);
/// Most pending entries claimed per take-over call.
const CLAIM_BATCH: usize = 100;
const ERROR_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Whether Redis answered that a stream or its consumer group is missing.
fn is_nogroup(e: &BackendError) -> bool {
    matches!(e, BackendError::Refused(m) if m.contains("NOGROUP"))
}

/// Bookkeeping shared between a consumer task and its deliveries' settles.
#[derive(Debug, Default)]
struct PartShared {
    /// Delivered on the stream, not yet settled.
    inflight: BTreeSet<EntryId>,
    /// Held by this consumer in Redis and to be delivered again.
    redeliver: BTreeSet<EntryId>,
}

#[derive(Debug)]
struct Shared {
    parts: Mutex<HashMap<u32, PartShared>>,
    /// Wakes the task: a settle freed a permit or queued a redelivery.
    wake: Notify,
    /// `prefetch` permits; each delivery holds one until settled.
    permits: Arc<Semaphore>,
}

/// A delivery not yet yielded, read from Redis into the partition's buffer.
#[derive(Debug)]
struct Entry {
    id: EntryId,
    event: IncomingEvent,
    attempt: u32,
}

#[derive(Debug)]
enum Phase {
    /// Taking over other consumers' pending entries, from `start`.
    Claiming { start: String, retry_at: Instant },
    /// Reading new entries.
    Reading,
}

#[derive(Debug)]
struct Part {
    phase: Phase,
    /// Owned but no longer desired: read nothing new, release once drained.
    releasing: bool,
    /// Read from Redis (so pending on this consumer) but not yet yielded.
    ready: VecDeque<Entry>,
}

type Tx = mpsc::UnboundedSender<Result<IncomingDelivery, BackendError>>;

pub(crate) async fn start(
    inner: Arc<Inner>,
    options: ConsumeOptions,
) -> Result<BoxStream<'static, Result<IncomingDelivery, BackendError>>, BackendError> {
    inner.check_open()?;
    let name: String = options
        .consumer_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(48)
        .collect();
    let token = format!(
        "{}-{}",
        if name.is_empty() { "worker" } else { &name },
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let read_conn = open_read_connection(&inner).await?;
    let prefetch = usize::from(options.prefetch.max(1));
    let shared = Arc::new(Shared {
        parts: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        permits: Arc::new(Semaphore::new(prefetch)),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let consumer = Consumer {
        inner: inner.clone(),
        token,
        shared,
        tx,
        read_conn: Some(read_conn),
        held: BTreeMap::new(),
        lease_valid_until: None,
        next_maintenance: Instant::now(),
        cursor: 0,
        resync: false,
    };
    inner.spawn(consumer.run());
    Ok(UnboundedReceiverStream::new(rx).boxed())
}

/// A connection of the consumer's own for blocking reads.
async fn open_read_connection(inner: &Inner) -> Result<MultiplexedConnection, BackendError> {
    let op = inner.config.operation_timeout;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(op))
        .set_response_timeout(Some(op + READ_BLOCK));
    inner
        .run(
            inner
                .client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
}

/// What one step of the consumer loop did.
enum Step {
    /// Delivered or changed something: go again at once.
    Progress,
    /// Blocked in Redis for a while already: go again at once.
    Waited,
    /// Nothing to do: wait for a settle, a timer or shutdown.
    Idle,
}

struct Consumer {
    inner: Arc<Inner>,
    token: String,
    shared: Arc<Shared>,
    tx: Tx,
    read_conn: Option<MultiplexedConnection>,
    /// Partitions whose lease this consumer holds.
    held: BTreeMap<u32, Part>,
    /// Reads are allowed until then (see the module doc).
    lease_valid_until: Option<Instant>,
    next_maintenance: Instant,
    /// Round-robin start over partitions, so one busy partition does not
    /// starve the others.
    cursor: u32,
    /// A read failed: entries may have landed in our pending list unseen.
    resync: bool,
}

impl Consumer {
    async fn run(mut self) {
        let cancel = self.inner.cancel.clone();
        let mut backoff = ERROR_BACKOFF_MIN;
        let mut maintenance_failing = false;
        loop {
            if cancel.is_cancelled() || self.tx.is_closed() {
                break;
            }
            if Instant::now() >= self.next_maintenance {
                match self.maintain().await {
                    Ok(()) => maintenance_failing = false,
                    // Every 100 ms during an outage: warn once, then quietly.
                    Err(e) if !maintenance_failing => {
                        maintenance_failing = true;
                        tracing::warn!(consumer = %self.token, error = %e, "consumer maintenance failed; reads stop before the leases run out");
                    }
                    Err(e) => {
                        tracing::debug!(consumer = %self.token, error = %e, "consumer maintenance failed")
                    }
                }
            }
            match self.step().await {
                Ok(Step::Progress | Step::Waited) => backoff = ERROR_BACKOFF_MIN,
                Ok(Step::Idle) => {
                    backoff = ERROR_BACKOFF_MIN;
                    let until = self.next_wake();
                    tokio::select! {
                        _ = self.shared.wake.notified() => {}
                        _ = tokio::time::sleep_until(until) => {}
                        _ = self.tx.closed() => {}
                        _ = cancel.cancelled() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(consumer = %self.token, error = %e, "consumer step failed; retrying");
                    if is_nogroup(&e) {
                        // The stream or its group vanished (Redis restarted
                        // without persistence, or an operator deleted it).
                        if let Err(e) = ensure_groups(&self.inner).await {
                            tracing::warn!(error = %e, "could not recreate the consumer groups");
                        }
                    }
                    let sleep = backoff.mul_f64(0.5 + 0.5 * jitter_fraction());
                    tokio::select! {
                        _ = tokio::time::sleep(sleep) => {}
                        _ = self.tx.closed() => {}
                        _ = cancel.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                }
            }
        }
        self.leave().await;
    }

    fn next_wake(&self) -> Instant {
        let mut at = self.next_maintenance;
        for part in self.held.values() {
            if let Phase::Claiming { retry_at, .. } = part.phase {
                at = at.min(retry_at);
            }
        }
        at
    }

    fn lease_valid(&self, horizon: Duration) -> bool {
        self.lease_valid_until
            .is_some_and(|until| Instant::now() + horizon < until)
    }

    async fn step(&mut self) -> Result<Step, BackendError> {
        let mut progress = self.release_drained().await?;
        progress |= self.deliver().await?;
        progress |= self.claim().await?;
        if self.resync {
            self.resync_pending().await?;
            progress = true;
        }
        if progress {
            // Do not block: there may be more to deliver right away.
            self.read(false).await?;
            return Ok(Step::Progress);
        }
        self.read(true).await
    }

    /// Reads new entries of every partition in the reading phase into their
    /// buffers. `block`: wait in Redis up to [`READ_BLOCK`] for entries.
    async fn read(&mut self, block: bool) -> Result<Step, BackendError> {
        let permits = self.shared.permits.available_permits();
        let partitions: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, part)| matches!(part.phase, Phase::Reading) && !part.releasing)
            .map(|(p, _)| *p)
            .collect();
        // A closed stream means the consumer is leaving: reading now would
        // only park entries on it (and bump their counts on take-over).
        if permits == 0
            || partitions.is_empty()
            || self.tx.is_closed()
            || !self.lease_valid(READ_BLOCK)
        {
            return Ok(Step::Idle);
        }
        // COUNT applies per stream; spreading the permits keeps the buffers
        // near `prefetch` in total.
        let count = permits.div_ceil(partitions.len()).max(1);
        let replies = if self.inner.cluster() {
            self.poll_each(&partitions, count).await?
        } else {
            vec![self.read_all(&partitions, count, block).await?]
        };
        let by_key: HashMap<String, u32> = partitions
            .iter()
            .map(|&p| (self.inner.keys.stream(p), p))
            .collect();
        let mut got = 0usize;
        for reply in &replies {
            for (key, entries) in reply::read_group(reply) {
                let Some(&p) = by_key.get(key) else { continue };
                for ReadEntry { id, event } in entries {
                    match event {
                        Some(event) => {
                            if let Some(part) = self.held.get_mut(&p) {
                                part.ready.push_back(Entry {
                                    id,
                                    event,
                                    attempt: 1,
                                });
                                got += 1;
                            }
                        }
                        None => self.malformed(p, id).await,
                    }
                }
            }
        }
        if got == 0 && block && self.inner.cluster() {
            tokio::time::sleep(CLUSTER_POLL).await;
        }
        Ok(if got > 0 {
            Step::Progress
        } else if block {
            Step::Waited
        } else {
            Step::Idle
        })
    }

    /// On a cluster: one non-blocking `XREADGROUP` per stream, all at once
    /// on the cluster connection (each goes to its stream's node).
    async fn poll_each(
        &mut self,
        partitions: &[u32],
        count: usize,
    ) -> Result<Vec<Value>, BackendError> {
        let op = self.inner.config.operation_timeout;
        let reads = partitions.iter().map(|&p| {
            let mut conn = self.inner.conn();
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&self.token)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(self.inner.keys.stream(p))
                .arg(">");
            async move { with_timeout(op, cmd.query_async::<Value>(&mut conn)).await }
        });
        match futures::future::try_join_all(reads).await {
            Ok(v) => Ok(v),
            Err(e) => {
                // Entries may have been delivered to us without our seeing
                // them.
                self.resync = true;
                Err(e)
            }
        }
    }

    /// On a standalone Redis: one `XREADGROUP` over every stream, blocking
    /// on the consumer's own connection.
    async fn read_all(
        &mut self,
        partitions: &[u32],
        count: usize,
        block: bool,
    ) -> Result<Value, BackendError> {
        let mut conn = match self.read_conn.take() {
            Some(c) => c,
            None => open_read_connection(&self.inner).await?,
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.token)
            .arg("COUNT")
            .arg(count);
        if block {
            cmd.arg("BLOCK").arg(READ_BLOCK.as_millis() as u64);
        }
        cmd.arg("STREAMS");
        for &p in partitions {
            cmd.arg(self.inner.keys.stream(p));
        }
        for _ in partitions {
            cmd.arg(">");
        }
        let limit = self.inner.config.operation_timeout + READ_BLOCK;
        let reply: Value = match with_timeout(limit, cmd.query_async(&mut conn)).await {
            Ok(v) => v,
            Err(e) => {
                // The connection may be broken, and entries may have been
                // delivered to us without our seeing them.
                self.resync = true;
                if is_nogroup(&e) {
                    // A server error: the connection itself is fine.
                    self.read_conn = Some(conn);
                }
                return Err(e);
            }
        };
        self.read_conn = Some(conn);
        Ok(reply)
    }
}
