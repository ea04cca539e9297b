//! The incoming side: `partitions` Redis Streams with one consumer group
//! each, and partition ownership by leases.
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
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fanout_backend::{
    partition_for, BackendError, ConsumeOptions, DeadLetter, DeadLetterAction, DeadLetterSelection,
    IncomingDelivery, IncomingEvent, OrderingKey, Settle,
};
use futures::stream::{BoxStream, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::keys::GROUP;
use crate::{jitter_fraction, lock, with_timeout, Counters, Inner};

/// Longest a read blocks in Redis; also the longest the consumer task takes
/// to notice its stream was dropped or a rebalance is due while idle.
const READ_BLOCK: Duration = Duration::from_millis(100);
/// How often a consumer heartbeats, renews and acquires. Short, so a new
/// consumer gets its share within a few hundred ms.
const MAINTENANCE: Duration = Duration::from_millis(100);
/// Most pending entries claimed per take-over call.
const CLAIM_BATCH: usize = 100;
const ERROR_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A stream entry id, `ms-seq`, ordered like Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Creates the consumer group of every partition's stream (and the stream),
/// from id 0: events appended before the group existed are delivered too.
pub(crate) async fn ensure_groups(inner: &Inner) -> Result<(), BackendError> {
    for p in 0..inner.config.partitions {
        let mut conn = inner.conn();
        let created: Result<(), BackendError> = inner
            .run(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(inner.keys.stream(p))
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn),
            )
            .await;
        match created {
            Ok(()) => {}
            Err(BackendError::Refused(m)) if m.contains("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether Redis answered that a stream or its consumer group is missing.
fn is_nogroup(e: &BackendError) -> bool {
    matches!(e, BackendError::Refused(m) if m.contains("NOGROUP"))
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<&str> {
    as_bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_str(other).and_then(|s| s.parse().ok()),
    }
}

/// The fields of an entry (`[f1, v1, f2, v2, ...]`) as name → value.
fn fields(v: &Value) -> HashMap<&str, &Value> {
    let mut out = HashMap::new();
    if let Value::Array(items) = v {
        for pair in items.chunks(2) {
            if let [k, v] = pair {
                if let Some(k) = as_str(k) {
                    out.insert(k, v);
                }
            }
        }
    }
    out
}

/// An incoming event from an entry's fields; `None` if malformed.
fn event_from(f: &HashMap<&str, &Value>) -> Option<IncomingEvent> {
    Some(IncomingEvent {
        id: as_str(f.get("id")?)?.to_owned(),
        ordering_key: OrderingKey::from_raw(as_str(f.get("k")?)?),
        payload: Bytes::copy_from_slice(as_bytes(f.get("p")?)?),
    })
}

pub(crate) async fn dead_letters(
    inner: &Inner,
    limit: usize,
) -> Result<Vec<DeadLetter>, BackendError> {
    let all = DeadLetterSelection { ids: None, limit };
    Ok(read_dead(inner, &all)
        .await?
        .into_iter()
        .map(|(_, d)| d)
        .collect())
}

/// Dead letters read per round trip while scanning for a selection.
const DEAD_SCAN_PAGE: usize = 500;

/// The dead letters `selection` picks, oldest first, with their entry ids
/// in the dead-letter stream.
async fn read_dead(
    inner: &Inner,
    selection: &DeadLetterSelection,
) -> Result<Vec<(String, DeadLetter)>, BackendError> {
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    let mut conn = inner.conn();
    while out.len() < selection.limit {
        let page = if selection.ids.is_none() {
            (selection.limit - out.len()).min(DEAD_SCAN_PAGE)
        } else {
            DEAD_SCAN_PAGE
        };
        let reply: Value = inner
            .run(
                redis::cmd("XRANGE")
                    .arg(inner.keys.dead())
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(page)
                    .query_async(&mut conn),
            )
            .await?;
        let Value::Array(entries) = reply else { break };
        let n = entries.len();
        for entry in &entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(entry_id), Some(fv)) = (parts.first().and_then(as_str), parts.get(1)) else {
                continue;
            };
            start = format!("({entry_id}");
            let f = fields(fv);
            let Some(event) = event_from(&f) else {
                tracing::warn!(entry = entry_id, "skipped a malformed dead letter");
                continue;
            };
            if out.len() >= selection.limit || !selection.matches(&event.id) {
                continue;
            }
            let dead = DeadLetter {
                event,
                reason: f
                    .get("reason")
                    .and_then(|v| as_str(v))
                    .unwrap_or_default()
                    .to_owned(),
                attempts: f
                    .get("attempts")
                    .and_then(|v| as_int(v))
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0),
            };
            out.push((entry_id.to_owned(), dead));
        }
        if n < page {
            break;
        }
    }
    Ok(out)
}

/// Replays (the REPLAY script: out of the dead letters and into the
/// partition stream atomically) or drops (XDEL) the selected dead letters.
/// A dead letter another call removed meanwhile is skipped.
pub(crate) async fn resolve_dead_letters(
    inner: &Inner,
    selection: &DeadLetterSelection,
    action: DeadLetterAction,
) -> Result<Vec<DeadLetter>, BackendError> {
    let mut done = Vec::new();
    let mut conn = inner.conn();
    for (entry_id, dead) in read_dead(inner, selection).await? {
        let removed: i64 = match action {
            DeadLetterAction::Replay => {
                let partition = partition_for(&dead.event.ordering_key, inner.config.partitions);
                inner
                    .run(
                        inner
                            .scripts
                            .replay
                            .key(inner.keys.dead())
                            .key(inner.keys.stream(partition))
                            .arg(&entry_id)
                            .arg(&dead.event.id)
                            .arg(dead.event.ordering_key.as_str())
                            .arg(dead.event.payload.as_ref())
                            .invoke_async(&mut conn),
                    )
                    .await?
            }
            DeadLetterAction::Drop => {
                inner
                    .run(
                        redis::cmd("XDEL")
                            .arg(inner.keys.dead())
                            .arg(&entry_id)
                            .query_async(&mut conn),
                    )
                    .await?
            }
        };
        if removed > 0 {
            done.push(dead);
        }
    }
    Ok(done)
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

    /// Heartbeat, lease renewal and acquisition (the MAINTAIN script).
    async fn maintain(&mut self) -> Result<(), BackendError> {
        let started = Instant::now();
        self.next_maintenance = started + MAINTENANCE;
        let inner = self.inner.clone();
        let mut inv = inner.scripts.maintain.key(inner.keys.consumers());
        for p in 0..inner.config.partitions {
            inv.key(inner.keys.lease(p));
        }
        inv.arg(&self.token)
            .arg(inner.config.lease_ttl.as_millis() as u64);
        let mut conn = inner.conn();
        let statuses: Vec<i64> = inner.run(inv.invoke_async(&mut conn)).await?;
        // The renewal happened after `started`, so the leases last at least
        // until `started + lease_ttl`; stop reading well before.
        let margin = inner.config.lease_ttl / 4 + READ_BLOCK;
        self.lease_valid_until = Some(started + inner.config.lease_ttl.saturating_sub(margin));
        for (p, status) in statuses.into_iter().enumerate() {
            let p = p as u32;
            match status {
                1..=3 => {
                    let releasing = status == 2;
                    match self.held.get_mut(&p) {
                        Some(part) => part.releasing = releasing,
                        None => {
                            self.held.insert(
                                p,
                                Part {
                                    phase: Phase::Claiming {
                                        start: "-".to_owned(),
                                        retry_at: Instant::now(),
                                    },
                                    releasing,
                                    ready: VecDeque::new(),
                                },
                            );
                            lock(&self.shared.parts).entry(p).or_default();
                            tracing::debug!(consumer = %self.token, partition = p, "partition acquired");
                        }
                    }
                }
                _ => {
                    if self.held.remove(&p).is_some() {
                        // Our lease expired and someone else may own it now:
                        // whatever we buffered stays pending on us and is
                        // taken over by the next owner.
                        lock(&self.shared.parts).remove(&p);
                        tracing::warn!(consumer = %self.token, partition = p, "partition lease lost");
                    }
                }
            }
        }
        Ok(())
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

    /// Releases partitions that are no longer desired and have nothing
    /// unsettled or buffered.
    async fn release_drained(&mut self) -> Result<bool, BackendError> {
        let drained: Vec<u32> = {
            let parts = lock(&self.shared.parts);
            self.held
                .iter()
                .filter(|(p, part)| {
                    part.releasing
                        && part.ready.is_empty()
                        && parts
                            .get(p)
                            .is_none_or(|s| s.inflight.is_empty() && s.redeliver.is_empty())
                })
                .map(|(p, _)| *p)
                .collect()
        };
        for &p in &drained {
            let inner = self.inner.clone();
            let mut conn = inner.conn();
            let _: i64 = inner
                .run(
                    inner
                        .scripts
                        .release
                        .key(inner.keys.stream(p))
                        .key(inner.keys.lease(p))
                        .arg(GROUP)
                        .arg(&self.token)
                        .arg(inner.config.claim_idle.as_millis() as u64)
                        .invoke_async(&mut conn),
                )
                .await?;
            self.held.remove(&p);
            lock(&self.shared.parts).remove(&p);
            tracing::debug!(consumer = %self.token, partition = p, "partition released");
        }
        Ok(!drained.is_empty())
    }

    /// Yields buffered entries and redeliveries while permits last, the
    /// lowest id of each partition first, partitions in turn.
    async fn deliver(&mut self) -> Result<bool, BackendError> {
        let mut progress = false;
        loop {
            // A closed stream would drop each delivery at once and queue it
            // again, bumping its count each time: stop, the task is leaving.
            if self.tx.is_closed()
                || self.shared.permits.available_permits() == 0
                || self.held.is_empty()
            {
                return Ok(progress);
            }
            let order: Vec<u32> = {
                let (after, before): (Vec<u32>, Vec<u32>) =
                    self.held.keys().partition(|&&p| p >= self.cursor);
                after.into_iter().chain(before).collect()
            };
            let mut did = false;
            for p in order {
                let next_redeliver = lock(&self.shared.parts)
                    .get(&p)
                    .and_then(|s| s.redeliver.first().copied());
                let Some(part) = self.held.get(&p) else {
                    continue;
                };
                let next_ready = part.ready.front().map(|e| e.id);
                match (next_redeliver, next_ready) {
                    (Some(r), f) if f.is_none_or(|f| r < f) => {
                        if let Some(s) = lock(&self.shared.parts).get_mut(&p) {
                            s.redeliver.remove(&r);
                        }
                        if let Err(e) = self.redeliver(p, r).await {
                            // Keep it for the next try.
                            if let Some(s) = lock(&self.shared.parts).get_mut(&p) {
                                s.redeliver.insert(r);
                            }
                            return Err(e);
                        }
                    }
                    (_, Some(_)) => {
                        let entry = self
                            .held
                            .get_mut(&p)
                            .and_then(|part| part.ready.pop_front());
                        if let Some(entry) = entry {
                            self.send(p, entry);
                        }
                    }
                    _ => continue,
                }
                self.cursor = p + 1;
                did = true;
                break;
            }
            if !did {
                return Ok(progress);
            }
            progress = true;
        }
    }

    /// Delivers again one entry this consumer holds (the REDELIVER script).
    async fn redeliver(&mut self, p: u32, id: EntryId) -> Result<(), BackendError> {
        let inner = self.inner.clone();
        let mut conn = inner.conn();
        let reply: Value = inner
            .run(
                inner
                    .scripts
                    .redeliver
                    .key(inner.keys.stream(p))
                    .arg(GROUP)
                    .arg(&self.token)
                    .arg(id.to_string())
                    .invoke_async(&mut conn),
            )
            .await?;
        let Value::Array(parts) = reply else {
            return Ok(());
        };
        // `gone`: acked meanwhile, or now another consumer's.
        if parts.first().and_then(as_str) == Some("ok") {
            let f = parts.get(1).map(fields).unwrap_or_default();
            let attempt = parts
                .get(2)
                .and_then(as_int)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(1);
            match event_from(&f) {
                Some(event) => self.send(p, Entry { id, event, attempt }),
                None => self.malformed(p, id).await,
            }
        }
        Ok(())
    }

    /// Takes over pending entries of newly acquired partitions (the CLAIM
    /// script), in order, as far as permits allow.
    async fn claim(&mut self) -> Result<bool, BackendError> {
        if !self.lease_valid(Duration::ZERO) {
            return Ok(false);
        }
        let now = Instant::now();
        let due: Vec<(u32, String)> = self
            .held
            .iter()
            .filter_map(|(p, part)| match &part.phase {
                Phase::Claiming { start, retry_at } if !part.releasing && *retry_at <= now => {
                    Some((*p, start.clone()))
                }
                _ => None,
            })
            .collect();
        let mut progress = false;
        for (p, start) in due {
            let permits = self.shared.permits.available_permits();
            if permits == 0 || self.tx.is_closed() {
                break;
            }
            let inner = self.inner.clone();
            let mut conn = inner.conn();
            let reply: Value = inner
                .run(
                    inner
                        .scripts
                        .claim
                        .key(inner.keys.stream(p))
                        .arg(GROUP)
                        .arg(&self.token)
                        .arg(inner.config.claim_idle.as_millis() as u64)
                        .arg(permits.min(CLAIM_BATCH))
                        .arg(&start)
                        .invoke_async(&mut conn),
                )
                .await?;
            let Value::Array(parts) = reply else {
                continue;
            };
            let status = parts.first().and_then(as_str).unwrap_or("done").to_owned();
            let last = parts.get(1).and_then(as_str).unwrap_or("").to_owned();
            let mut claimed = Vec::new();
            if let Some(Value::Array(entries)) = parts.get(2) {
                for e in entries {
                    let Value::Array(e) = e else { continue };
                    let (Some(id), Some(f), attempt) = (
                        e.first().and_then(as_str).and_then(EntryId::parse),
                        e.get(1).map(fields),
                        e.get(2)
                            .and_then(as_int)
                            .and_then(|n| u32::try_from(n).ok())
                            .unwrap_or(2),
                    ) else {
                        continue;
                    };
                    match event_from(&f) {
                        Some(event) => claimed.push(Entry { id, event, attempt }),
                        None => self.malformed(p, id).await,
                    }
                }
            }
            if !claimed.is_empty() {
                tracing::info!(consumer = %self.token, partition = p, claimed = claimed.len(), "took over pending entries");
            }
            for entry in claimed {
                self.send(p, entry);
            }
            let next_start = if last.is_empty() {
                start
            } else {
                format!("({last}")
            };
            let poll = (self.inner.config.claim_idle / 10)
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            if let Some(part) = self.held.get_mut(&p) {
                part.phase = match status.as_str() {
                    "more" => Phase::Claiming {
                        start: next_start,
                        retry_at: Instant::now(),
                    },
                    "wait" => Phase::Claiming {
                        start: next_start,
                        retry_at: Instant::now() + poll,
                    },
                    _ => Phase::Reading,
                };
            }
            progress = true;
        }
        Ok(progress)
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
        let mut conn = match self.read_conn.take() {
            Some(c) => c,
            None => open_read_connection(&self.inner).await?,
        };
        // COUNT applies per stream; spreading the permits keeps the buffers
        // near `prefetch` in total.
        let count = permits.div_ceil(partitions.len()).max(1);
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
        for &p in &partitions {
            cmd.arg(self.inner.keys.stream(p));
        }
        for _ in &partitions {
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
        let by_key: HashMap<String, u32> = partitions
            .iter()
            .map(|&p| (self.inner.keys.stream(p), p))
            .collect();
        let mut got = 0usize;
        if let Value::Array(streams) = reply {
            for s in &streams {
                let Value::Array(kv) = s else { continue };
                let (Some(key), Some(Value::Array(entries))) =
                    (kv.first().and_then(as_str), kv.get(1))
                else {
                    continue;
                };
                let Some(&p) = by_key.get(key) else { continue };
                for e in entries {
                    let Value::Array(e) = e else { continue };
                    let Some(id) = e.first().and_then(as_str).and_then(EntryId::parse) else {
                        continue;
                    };
                    let f = e.get(1).map(fields).unwrap_or_default();
                    match event_from(&f) {
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
        Ok(if got > 0 {
            Step::Progress
        } else if block {
            Step::Waited
        } else {
            Step::Idle
        })
    }

    /// After a failed read: entries pending on us that we do not know about
    /// are queued for redelivery (their count goes up: Redis did deliver
    /// them once).
    async fn resync_pending(&mut self) -> Result<(), BackendError> {
        let partitions: Vec<u32> = self.held.keys().copied().collect();
        for p in partitions {
            let inner = self.inner.clone();
            let mut conn = inner.conn();
            let pending: Value = inner
                .run(
                    redis::cmd("XPENDING")
                        .arg(inner.keys.stream(p))
                        .arg(GROUP)
                        .arg("-")
                        .arg("+")
                        .arg(1000)
                        .arg(&self.token)
                        .query_async(&mut conn),
                )
                .await?;
            let Value::Array(rows) = pending else {
                continue;
            };
            let buffered: BTreeSet<EntryId> = self
                .held
                .get(&p)
                .map(|part| part.ready.iter().map(|e| e.id).collect())
                .unwrap_or_default();
            let mut parts = lock(&self.shared.parts);
            let Some(s) = parts.get_mut(&p) else { continue };
            for row in &rows {
                let Value::Array(row) = row else { continue };
                let Some(id) = row.first().and_then(as_str).and_then(EntryId::parse) else {
                    continue;
                };
                if !s.inflight.contains(&id) && !buffered.contains(&id) {
                    s.redeliver.insert(id);
                }
            }
        }
        self.resync = false;
        Ok(())
    }

    /// An entry this backend did not write (or a corrupted one): nothing a
    /// worker can process, so it goes to the dead-letter stream at once.
    async fn malformed(&self, p: u32, id: EntryId) {
        tracing::warn!(partition = p, entry = %id, "malformed incoming entry; dead-lettering it");
        let inner = &self.inner;
        let mut conn = inner.conn();
        let result: Result<String, BackendError> = inner
            .run(
                inner
                    .scripts
                    .settle
                    .key(inner.keys.stream(p))
                    .key(inner.keys.dead())
                    .arg(GROUP)
                    .arg(&self.token)
                    .arg(id.to_string())
                    .arg("dead")
                    .arg("malformed entry")
                    .arg(p)
                    .invoke_async(&mut conn),
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not dead-letter a malformed entry");
        }
    }

    /// Yields one delivery; it holds a permit until settled.
    fn send(&mut self, p: u32, entry: Entry) {
        let permit = match self.shared.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Callers check the permits first; if none is left, keep the
                // entry for later rather than exceed the prefetch.
                if let Some(part) = self.held.get_mut(&p) {
                    part.ready.push_front(entry);
                }
                return;
            }
        };
        if let Some(s) = lock(&self.shared.parts).get_mut(&p) {
            s.inflight.insert(entry.id);
        }
        let settle = RedisSettle {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            token: self.token.clone(),
            partition: p,
            id: entry.id,
            settled: AtomicBool::new(false),
            permit: Mutex::new(Some(permit)),
        };
        let delivery = IncomingDelivery::new(entry.event, p, entry.attempt, Box::new(settle));
        // If the stream is gone, the delivery drops here and its settle
        // queues it for redelivery; the task then leaves and hands over.
        let _ = self.tx.send(Ok(delivery));
    }

    /// Leaves the group: hands over every pending entry and lease at once,
    /// so the next owner does not wait for leases to expire.
    async fn leave(&mut self) {
        let inner = self.inner.clone();
        let mut inv = inner.scripts.leave.key(inner.keys.consumers());
        for p in 0..inner.config.partitions {
            inv.key(inner.keys.stream(p)).key(inner.keys.lease(p));
        }
        inv.arg(GROUP)
            .arg(&self.token)
            .arg(inner.config.claim_idle.as_millis() as u64);
        let mut conn = inner.conn();
        let left: Result<i64, BackendError> = inner.run(inv.invoke_async(&mut conn)).await;
        if let Err(e) = left {
            tracing::warn!(consumer = %self.token, error = %e, "could not leave the group; leases expire after lease_ttl");
        }
        self.held.clear();
    }
}

/// Settles one delivery. Every path ends in [`RedisSettle::finish`], which
/// updates the task's bookkeeping, frees the permit and wakes the task.
struct RedisSettle {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    token: String,
    partition: u32,
    id: EntryId,
    settled: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl RedisSettle {
    /// `requeue`: the entry is still ours in Redis and must be delivered
    /// again (rejected, or the settle failed).
    fn finish(&self, requeue: bool) {
        if let Some(s) = lock(&self.shared.parts).get_mut(&self.partition) {
            s.inflight.remove(&self.id);
            if requeue {
                s.redeliver.insert(self.id);
            }
        }
        // Freed before the wake-up, so the woken task sees the permit.
        drop(lock(&self.permit).take());
        self.shared.wake.notify_one();
    }

    fn first_settle(&self) -> Result<(), BackendError> {
        if self.settled.swap(true, Ordering::AcqRel) {
            // IncomingDelivery consumes itself on settle, so this is only
            // reachable through a second settle of the same Settle object.
            return Err(BackendError::Invalid("delivery already settled".into()));
        }
        Ok(())
    }

    async fn run_settle(&self, mode: &str, reason: &str) -> Result<String, BackendError> {
        let inner = &self.inner;
        let mut conn = inner.conn();
        inner
            .run(
                inner
                    .scripts
                    .settle
                    .key(inner.keys.stream(self.partition))
                    .key(inner.keys.dead())
                    .arg(GROUP)
                    .arg(&self.token)
                    .arg(self.id.to_string())
                    .arg(mode)
                    .arg(reason)
                    .arg(self.partition)
                    .invoke_async(&mut conn),
            )
            .await
    }
}

#[async_trait]
impl Settle for RedisSettle {
    async fn ack(&self) -> Result<(), BackendError> {
        self.first_settle()?;
        if let Err(e) = self.inner.check_open() {
            self.finish(false);
            return Err(e);
        }
        let mut conn = self.inner.conn();
        let acked: Result<i64, BackendError> = self
            .inner
            .run(
                redis::cmd("XACK")
                    .arg(self.inner.keys.stream(self.partition))
                    .arg(GROUP)
                    .arg(self.id.to_string())
                    .query_async(&mut conn),
            )
            .await;
        // Removed from the in-flight set only after the XACK landed, so a
        // partition is never released with an ack still on its way.
        self.finish(acked.is_err());
        acked.map(|_| ())
    }

    async fn reject(&self) -> Result<(), BackendError> {
        self.first_settle()?;
        if let Err(e) = self.inner.check_open() {
            self.finish(false);
            return Err(e);
        }
        match self.run_settle("reject", "").await {
            Ok(outcome) => {
                self.finish(outcome == "requeue");
                Ok(())
            }
            Err(e) => {
                self.finish(true);
                Err(e)
            }
        }
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BackendError> {
        self.first_settle()?;
        if let Err(e) = self.inner.check_open() {
            self.finish(false);
            return Err(e);
        }
        match self.run_settle("dead", reason).await {
            Ok(outcome) => {
                if outcome == "dead" {
                    Counters::bump(&self.inner.counters.dead_lettered, 1);
                }
                self.finish(false);
                Ok(())
            }
            Err(e) => {
                self.finish(true);
                Err(e)
            }
        }
    }
}

impl Drop for RedisSettle {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            // Neither acked, rejected nor dead-lettered: deliver it again
            // (the task's redelivery bumps its count), and if the consumer
            // stream is gone, the hand-over passes it to the next owner.
            tracing::warn!(partition = self.partition, entry = %self.id, "delivery dropped unsettled; it will be delivered again");
            self.finish(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_like_redis() {
        let a = EntryId::parse("1700000000000-2").expect("id");
        let b = EntryId::parse("1700000000000-10").expect("id");
        let c = EntryId::parse("1700000000001-0").expect("id");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert_eq!(EntryId::parse("x-1"), None);
        assert_eq!(EntryId::parse("12"), None);
    }
}
