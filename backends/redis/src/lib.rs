//! [`FanoutBackend`] on Redis: the seed article's alternative to RabbitMQ
//! bindings, an explicit user → server routing table plus one Pub/Sub
//! channel per server, with Redis Streams for the incoming side.
//!
//! Parts:
//! - [`RedisConfig`] / [`RedisBackend::connect`]: one command connection
//!   (redis-rs `ConnectionManager`, reconnecting), every call bounded by
//!   `operation_timeout` and mapped to [`BackendError`];
//! - `outgoing`: the routing table, one RESP3 subscriber connection per
//!   registered server (reconnects with backoff, resubscribes, re-asserts its
//!   liveness and yields [`ServerEvent::RoutesLost`]), the publish script that
//!   looks up the servers and publishes to each in one round trip;
//! - `incoming`: `partitions` streams with one consumer group each; partition
//!   ownership by leases, spread evenly over the live consumers; take-over of
//!   pending entries in order before new reads; reject, dead-lettering;
//! - `janitor`: in every backend instance (every `liveness_ttl / 4`, one
//!   run per period per namespace under a lock): removes the routes of servers whose liveness expired,
//!   trims the incoming streams without touching unacked entries, forgets
//!   group consumers that are gone;
//! - `scripts`: the Lua scripts, each documented with its keys and replies
//!   and called through a typed wrapper next to it;
//! - `reply`: parsing of the nested replies (stream entries, XPENDING, the
//!   CLAIM and REDELIVER scripts).
//!
//! Keys and channels (all under the namespace `ns`, see `keys.rs`):
//!
//! | name | type | content |
//! | --- | --- | --- |
//! | `{ns}:route:{routing key}` | SET | server ids bound to the key (`alice`, `channel:general`) |
//! | `{ns}:server:{id}:keys` | SET | routing keys the server bound (for cleanup) |
//! | `{ns}:server:{id}:alive` | STRING, TTL `liveness_ttl` | token of the registration holding the id |
//! | `{ns}:servers` | SET | server ids that may own routes (walked by the janitor) |
//! | `{ns}:out:{id}` | Pub/Sub channel | frames `[key length: u8][routing key][payload]` |
//! | `{ns}:in:{p}` | STREAM, group `workers` | incoming events, fields `id`, `k` (ordering key), `p` (payload) |
//! | `{ns}:lease:{p}` | STRING, TTL `lease_ttl` | consumer token owning partition `p` |
//! | `{ns}:consumers` | ZSET | live consumer tokens scored by last heartbeat (ms, Redis clock) |
//! | `{ns}:dead` | STREAM | dead letters: the entry's fields plus `reason`, `attempts`, `partition`, `entry` |
//! | `{ns}:janitor` | STRING, TTL | which instance runs the janitor this period |
//!
//! Standalone Redis (optionally with replicas), or Redis Cluster
//! (`cluster = true`): on a cluster the names carry hash tags (`keys.rs`),
//! every script touches one slot, and a server's channel is a sharded
//! channel (`SSUBSCRIBE`/`SPUBLISH`), so a message crosses only the node that
//! owns the channel's slot instead of every node of the cluster.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fanout_backend::{
    BackendError, Capabilities, ConsumeOptions, DeadLetter, DeadLetterAction, DeadLetterSelection,
    FanoutBackend, IncomingDelivery, IncomingEvent, RouteKey, RouteOutcome, ServerId, ServerStream,
};
use futures::stream::BoxStream;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Client, IntoConnectionInfo, ProtocolVersion, RedisError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod conn;
mod incoming;
mod janitor;
mod keys;
mod outgoing;
mod reply;
mod scripts;

pub use janitor::JanitorReport;

use conn::Conn;
use keys::Keys;
use scripts::Scripts;

/// Settings of a Redis backend. Its `Debug` output hides the password of
/// the URL.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`; with `cluster`, a
    /// comma-separated list of seed nodes of the cluster (any live one is
    /// enough to find the others).
    pub url: String,
    /// Redis Cluster mode: hash-tagged key names, sharded Pub/Sub, every
    /// call routed by slot. A standalone Redis takes exactly one URL.
    pub cluster: bool,
    /// Replicas that must have an accepted event, a route or a lease before
    /// it counts (`WAIT`): with 1, losing a primary (its replica promoted)
    /// loses none of them. Replication is asynchronous otherwise, and a
    /// failover drops the primary's last writes. 0 waits for nothing (no
    /// replicas, or a single Redis); a cluster without replicas needs 0.
    pub wait_replicas: u32,
    /// Prefix of every key and channel (`{namespace}:...`): 1 to 64
    /// characters of `[A-Za-z0-9_-]`, so it can never contain a separator or
    /// a glob character.
    pub namespace: String,
    /// Number of incoming streams (at least 1). Every process of a
    /// deployment must agree on it: it decides the stream of each event.
    pub partitions: u32,
    /// Bound on every call to Redis; past it the call fails with
    /// `Unavailable`.
    pub operation_timeout: Duration,
    /// TTL of a gateway's liveness key, refreshed every third of it; the
    /// janitor runs every quarter of it. A gateway that dies without
    /// deregistering keeps its routes until the key expires and the next
    /// janitor run: at most `1.375 × liveness_ttl` plus one run.
    pub liveness_ttl: Duration,
    /// TTL of a partition lease and of a consumer's membership, renewed
    /// about ten times a second. A dead worker's partitions are taken over
    /// after it.
    pub lease_ttl: Duration,
    /// How long a pending entry of another consumer must have been idle
    /// before a new owner takes it over (protects a slow but living previous
    /// owner). A graceful hand-over marks entries as idle this long at once.
    pub claim_idle: Duration,
    /// Each incoming stream is trimmed once it holds more entries than
    /// this, and then only of entries that were delivered and acked: an
    /// unacked backlog is never trimmed. The dead-letter stream is never
    /// trimmed.
    pub max_stream_len: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            cluster: false,
            wait_replicas: 0,
            namespace: "fanout".to_owned(),
            partitions: 16,
            operation_timeout: Duration::from_secs(5),
            liveness_ttl: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(10),
            claim_idle: Duration::from_secs(10),
            max_stream_len: 100_000,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field(
                "url",
                &self
                    .urls()
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .field("cluster", &self.cluster)
            .field("wait_replicas", &self.wait_replicas)
            .field("namespace", &self.namespace)
            .field("partitions", &self.partitions)
            .field("operation_timeout", &self.operation_timeout)
            .field("liveness_ttl", &self.liveness_ttl)
            .field("lease_ttl", &self.lease_ttl)
            .field("claim_idle", &self.claim_idle)
            .field("max_stream_len", &self.max_stream_len)
            .finish()
    }
}

/// `redis://user:secret@host` -> `redis://user:***@host`, for logs.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://***@{host}")
            }
        }
        None => url.to_owned(),
    }
}

impl RedisConfig {
    /// The node URLs of `url`, split at commas, blanks trimmed.
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    fn validate(&self) -> Result<(), BackendError> {
        let urls = self.urls();
        if urls.is_empty() {
            return Err(BackendError::Invalid("no Redis URL given".into()));
        }
        if urls.len() > 1 && !self.cluster {
            return Err(BackendError::Invalid(
                format!(
                    "{} Redis URLs given, but a standalone Redis takes one; for Redis Cluster set \
                     cluster = true (FANOUT_REDIS__CLUSTER=true) and list the seed nodes",
                    urls.len()
                )
                .into(),
            ));
        }
        if !fanout_backend::is_valid_id(&self.namespace) {
            return Err(BackendError::Invalid(
                format!(
                    "namespace must be 1 to 64 characters of [A-Za-z0-9_-], got {:?}",
                    self.namespace
                )
                .into(),
            ));
        }
        if self.partitions == 0 {
            return Err(BackendError::Invalid(
                "partitions must be at least 1".into(),
            ));
        }
        if self.operation_timeout < Duration::from_millis(10) {
            return Err(BackendError::Invalid(
                "operation_timeout must be at least 10 ms".into(),
            ));
        }
        // Leases are renewed every 100 ms and reads stop a quarter of the TTL
        // before it runs out; below a second that leaves no room.
        for (name, ttl) in [
            ("liveness_ttl", self.liveness_ttl),
            ("lease_ttl", self.lease_ttl),
        ] {
            if ttl < Duration::from_secs(1) {
                return Err(BackendError::Invalid(
                    format!("{name} must be at least 1 s, got {ttl:?}").into(),
                ));
            }
        }
        Ok(())
    }
}

/// Counters of one backend value, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisStats {
    /// Times a server's subscriber connection was lost and re-established.
    pub subscriber_reconnects: u64,
    /// Length of the last subscriber outage, from detection to
    /// resubscribed, in ms: messages published meanwhile were lost.
    pub last_subscriber_outage_ms: u64,
    /// `RoutesLost` events yielded to gateways.
    pub routes_lost: u64,
    /// Outgoing messages dropped because a server's stream buffer was full
    /// (the gateway did not keep up); each overflow is a route loss, so the
    /// gateway recovers them from the store.
    pub outgoing_dropped: u64,
    /// Times a server's stream overflowed (each yields one `RoutesLost`).
    pub outgoing_overflows: u64,
    /// Outgoing frames that could not be decoded and were skipped.
    pub outgoing_malformed: u64,
    /// Incoming events this value moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Stale servers whose routes this value's janitor removed.
    pub janitor_servers_cleaned: u64,
    /// Routes this value's janitor removed.
    pub janitor_routes_removed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub subscriber_reconnects: AtomicU64,
    pub last_subscriber_outage_ms: AtomicU64,
    pub routes_lost: AtomicU64,
    pub outgoing_dropped: AtomicU64,
    pub outgoing_overflows: AtomicU64,
    pub outgoing_malformed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub janitor_servers_cleaned: AtomicU64,
    pub janitor_routes_removed: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// The Redis backend. Dropping it stops its background tasks (consumers
/// hand their partitions over, subscriber connections close); `shutdown`
/// also removes the routes of its registered servers first.
pub struct RedisBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("namespace", &self.inner.config.namespace)
            .field("partitions", &self.inner.config.partitions)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// State shared by the backend value and its background tasks.
pub(crate) struct Inner {
    pub config: RedisConfig,
    pub keys: Keys,
    /// RESP2 client: the command connection and the consumers' blocking
    /// read connections.
    pub client: Client,
    /// RESP3 client: subscriber connections (Pub/Sub pushes arrive on a
    /// connection that still answers PING and CLIENT SETNAME).
    pub sub_client: Client,
    pub conn: Conn,
    pub scripts: Scripts,
    pub closed: AtomicBool,
    /// Cancelled on shutdown or drop; every background task watches it.
    pub cancel: CancellationToken,
    pub servers: Mutex<HashMap<ServerId, outgoing::LocalServer>>,
    pub generation: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub counters: Arc<Counters>,
    durable: bool,
    /// Identifies this backend value in the janitor lock.
    pub instance: String,
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<(), BackendError> {
        if self.closed.load(Ordering::Acquire) {
            Err(BackendError::Closed)
        } else {
            Ok(())
        }
    }

    /// A handle on the command connection (cheap: it is multiplexed).
    pub(crate) fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Waits until `wait_replicas` replicas have every write sent so far
    /// on the connection to the node of `key` (so: the write to `key` just
    /// made). Nothing to do with `wait_replicas = 0`.
    pub(crate) async fn replicated(&self, key: &str) -> Result<(), BackendError> {
        let want = self.config.wait_replicas;
        if want == 0 {
            return Ok(());
        }
        let limit = self.config.operation_timeout / 2;
        let mut wait = redis::cmd("WAIT");
        wait.arg(want).arg(limit.as_millis() as u64);
        let acked: i64 = match &self.conn {
            Conn::Cluster(c) => {
                // WAIT names no key: sent to the key's node, where the
                // write went, on the same connection.
                let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(keys::slot_of(key), SlotAddr::Master),
                ));
                let mut c = c.clone();
                let v = self.run(c.route_command(wait, node)).await?;
                redis::FromRedisValue::from_redis_value(v).map_err(|e| {
                    BackendError::Unavailable(format!("unexpected WAIT reply: {e}").into())
                })?
            }
            other => self.run(wait.query_async(&mut other.clone())).await?,
        };
        if acked < i64::from(want) {
            return Err(BackendError::Unavailable(
                format!(
                    "only {acked} of {want} replicas confirmed the write within {limit:?}; \
                     it could be lost if its primary failed now. A Redis without replicas \
                     needs redis.wait_replicas = 0"
                )
                .into(),
            ));
        }
        Ok(())
    }

    /// Whether this backend talks to a Redis Cluster.
    pub(crate) fn cluster(&self) -> bool {
        self.config.cluster
    }

    /// The URL of every primary of the cluster serving slots (a
    /// standalone Redis: its one URL), for what has to visit every node:
    /// SCAN.
    pub(crate) async fn node_urls(&self) -> Result<Vec<String>, BackendError> {
        node_urls(&self.conn, &self.config.url, self.config.operation_timeout).await
    }

    /// Runs one Redis call bounded by `operation_timeout`.
    pub(crate) async fn run<T>(
        &self,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, BackendError> {
        with_timeout(self.config.operation_timeout, fut).await
    }

    /// Runs one command on the command connection, bounded by
    /// `operation_timeout`.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, BackendError> {
        let mut conn = self.conn();
        self.run(cmd.query_async(&mut conn)).await
    }

    /// Spawns a background task that `shutdown` waits for.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(fut);
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    pub(crate) fn servers(&self) -> MutexGuard<'_, HashMap<ServerId, outgoing::LocalServer>> {
        lock(&self.servers)
    }
}

/// A std mutex, never held across an await; a panic while holding it
/// leaves maps that are still consistent, so the guard is recovered.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) async fn with_timeout<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map_error(e)),
        Err(_) => Err(BackendError::Unavailable(
            format!("Redis did not answer within {limit:?}").into(),
        )),
    }
}

/// Maps a redis-rs error, which stays the [`BackendError`]'s source:
/// connection trouble and server states that pass (loading, OOM, failover)
/// are `Unavailable`; permission and configuration errors, and server
/// errors a retry cannot fix (a script error, a wrong type), are `Refused`.
pub(crate) fn map_error(e: RedisError) -> BackendError {
    // The text is the error's own, as it always was: no context.
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return BackendError::unavailable("", e);
    }
    match e.code() {
        Some(
            "LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "CLUSTERDOWN" | "OOM",
        ) => BackendError::unavailable("", e),
        Some(_) => BackendError::refused("", e),
        None => match e.kind() {
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig => {
                BackendError::refused("", e)
            }
            _ => BackendError::unavailable("", e),
        },
    }
}

/// A random-enough number for backoff jitter, without another dependency.
pub(crate) fn jitter_fraction() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0
}

impl RedisBackend {
    /// Connects, creates the consumer group of every incoming stream (from
    /// the start of the stream, so events published before any worker ran
    /// are delivered), and starts the janitor.
    pub async fn connect(config: RedisConfig) -> Result<Self, BackendError> {
        config.validate()?;
        let op = config.operation_timeout;
        let urls = config.urls();
        for url in &urls {
            url.into_connection_info()
                .map_err(|e| BackendError::invalid("bad Redis URL", e))?;
        }
        let info = urls[0]
            .into_connection_info()
            .map_err(|e| BackendError::invalid("bad Redis URL", e))?;
        let sub_info = info.clone().set_redis_settings(
            info.redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3),
        );
        let client = Client::open(info).map_err(map_error)?;
        let sub_client = Client::open(sub_info).map_err(map_error)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op))
            .set_response_timeout(Some(op))
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        let conn = if config.cluster {
            let cluster = ClusterClient::builder(urls.iter().map(|u| u.to_string()))
                .connection_timeout(op)
                .response_timeout(op)
                .retries(3)
                .min_retry_wait(50)
                .max_retry_wait(2000)
                .build()
                .map_err(|e| BackendError::invalid("bad Redis Cluster seeds", e))?;
            Conn::Cluster(with_timeout(op, cluster.get_async_connection()).await?)
        } else {
            Conn::Single(
                with_timeout(
                    op,
                    ConnectionManager::new_with_config(client.clone(), manager_config),
                )
                .await?,
            )
        };

        let keys = Keys::new(&config.namespace, config.partitions, config.cluster);
        let mut probe = conn.clone();
        // Accepted events survive a restart only if Redis writes an AOF; a
        // managed Redis may refuse CONFIG, in which case we cannot promise it.
        let appendonly: Result<Vec<String>, BackendError> = with_timeout(
            op,
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("appendonly")
                .query_async(&mut probe),
        )
        .await;
        let durable = matches!(appendonly, Ok(v) if v.get(1).is_some_and(|s| s == "yes"));

        let inner = Arc::new(Inner {
            keys,
            client,
            sub_client,
            conn,
            scripts: Scripts::new(),
            closed: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            servers: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            tasks: Mutex::new(Vec::new()),
            counters: Arc::new(Counters::default()),
            durable,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            config,
        });
        incoming::ensure_groups(&inner).await?;
        janitor::start(&inner);
        Ok(Self { inner })
    }

    /// The namespace every key of this backend lives under.
    pub fn namespace(&self) -> &str {
        &self.inner.config.namespace
    }

    /// Counters for metrics.
    pub fn stats(&self) -> RedisStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RedisStats {
            subscriber_reconnects: get(&c.subscriber_reconnects),
            last_subscriber_outage_ms: get(&c.last_subscriber_outage_ms),
            routes_lost: get(&c.routes_lost),
            outgoing_dropped: get(&c.outgoing_dropped),
            outgoing_overflows: get(&c.outgoing_overflows),
            outgoing_malformed: get(&c.outgoing_malformed),
            dead_lettered: get(&c.dead_lettered),
            janitor_servers_cleaned: get(&c.janitor_servers_cleaned),
            janitor_routes_removed: get(&c.janitor_routes_removed),
        }
    }

    /// How many route keys (`{ns}:route:*`) exist now: the size of the
    /// routing table, by SCAN (not KEYS, so it never blocks Redis).
    pub async fn route_key_count(&self) -> Result<usize, BackendError> {
        let pattern = format!("{}*", self.inner.keys.route_prefix());
        let mut n = 0;
        for url in self.inner.node_urls().await? {
            n += scan_with(
                &node(&url, self.inner.config.operation_timeout).await?,
                &pattern,
                self.inner.config.operation_timeout,
            )
            .await?
            .len();
        }
        Ok(n)
    }

    /// Runs the janitor once now, whoever holds the janitor lock: removes
    /// the routes of servers whose liveness expired, trims the streams,
    /// forgets departed group consumers.
    pub async fn run_janitor_once(&self) -> Result<JanitorReport, BackendError> {
        self.inner.check_open()?;
        janitor::run_once(&self.inner).await
    }

    /// Deletes every key of this backend's namespace (SCAN + UNLINK). For
    /// tests and for decommissioning a namespace; live gateways and workers
    /// of the namespace lose their state.
    pub async fn purge_namespace(&self) -> Result<u64, BackendError> {
        let timeout = self.inner.config.operation_timeout;
        let mut removed = 0;
        for url in self.inner.node_urls().await? {
            removed += purge(
                &node(&url, timeout).await?,
                &self.inner.config.namespace,
                timeout,
            )
            .await?;
        }
        Ok(removed)
    }

    /// Like [`RedisBackend::purge_namespace`] without a backend: connects
    /// to `url` (on a cluster, each of its primaries: a comma-separated
    /// seed list is accepted) and deletes every key under `{namespace}:`.
    pub async fn purge(url: &str, namespace: &str, timeout: Duration) -> Result<u64, BackendError> {
        if !fanout_backend::is_valid_id(namespace) {
            return Err(BackendError::Invalid(
                format!("not a namespace: {namespace:?}").into(),
            ));
        }
        let seed = url
            .split(',')
            .map(str::trim)
            .find(|u| !u.is_empty())
            .unwrap_or(url);
        let first = node(seed, timeout).await?;
        let mut removed = 0;
        for url in node_urls(&first, seed, timeout).await? {
            removed += purge(&node(&url, timeout).await?, namespace, timeout).await?;
        }
        Ok(removed)
    }
}

/// A plain connection to one node, for what must visit each node itself.
async fn node(
    url: &str,
    timeout: Duration,
) -> Result<redis::aio::MultiplexedConnection, BackendError> {
    let client = Client::open(url).map_err(map_error)?;
    with_timeout(timeout, client.get_multiplexed_async_connection()).await
}

/// The URLs of the primaries serving slots if `conn` reaches a cluster
/// node, else `url` itself (a standalone Redis answers `CLUSTER NODES`
/// with an error).
async fn node_urls<C>(conn: &C, url: &str, timeout: Duration) -> Result<Vec<String>, BackendError>
where
    C: redis::aio::ConnectionLike + Clone + Send,
{
    let seed = url
        .split(',')
        .map(str::trim)
        .find(|u| !u.is_empty())
        .unwrap_or(url);
    let mut c = conn.clone();
    match with_timeout(
        timeout,
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut c),
    )
    .await
    {
        Ok(nodes) => {
            let primaries = conn::primaries(&nodes);
            if primaries.is_empty() {
                return Err(BackendError::Unavailable(
                    "the Redis Cluster has no primary serving slots (is it still forming?)".into(),
                ));
            }
            Ok(primaries.iter().map(|a| conn::node_url(seed, a)).collect())
        }
        // Not a cluster: "ERR This instance has cluster support disabled".
        Err(BackendError::Refused(_)) => Ok(vec![seed.to_owned()]),
        Err(e) => Err(e),
    }
}

async fn scan_with<C>(
    conn: &C,
    pattern: &str,
    timeout: Duration,
) -> Result<Vec<String>, BackendError>
where
    C: redis::aio::ConnectionLike + Clone + Send,
{
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let mut c = conn.clone();
        let (next, batch): (u64, Vec<String>) = with_timeout(
            timeout,
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c),
        )
        .await?;
        out.extend(batch);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// Deletes every key of a namespace on one node. Key by key: on a
/// cluster node the keys are in different slots, which one UNLINK refuses.
async fn purge<C>(conn: &C, namespace: &str, timeout: Duration) -> Result<u64, BackendError>
where
    C: redis::aio::ConnectionLike + Clone + Send,
{
    let all = scan_with(conn, &format!("{namespace}:*"), timeout).await?;
    let mut removed = 0u64;
    for chunk in all.chunks(500) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("UNLINK").arg(key);
        }
        let mut c = conn.clone();
        let n: Vec<u64> = with_timeout(timeout, pipe.query_async(&mut c)).await?;
        removed += n.iter().sum::<u64>();
    }
    Ok(removed)
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        // Background tasks hold the shared state; without this they would
        // outlive the last handle.
        self.inner.cancel.cancel();
    }
}

#[async_trait]
impl FanoutBackend for RedisBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "redis",
            durable_incoming: self.inner.durable,
            incoming_at_least_once: true,
            per_key_ordering: true,
            // Pub/Sub drops what is published while a subscriber reconnects
            // or when its buffer overflows.
            outgoing_at_least_once: false,
            explicit_routing_table: true,
            reports_unroutable: true,
        }
    }

    async fn health(&self) -> Result<(), BackendError> {
        self.inner.check_open()?;
        let limit = self
            .inner
            .config
            .operation_timeout
            .min(Duration::from_secs(2));
        let mut conn = self.inner.conn();
        let _: String = with_timeout(limit, redis::cmd("PING").query_async(&mut conn)).await?;
        Ok(())
    }

    async fn publish_incoming(&self, event: IncomingEvent) -> Result<(), BackendError> {
        incoming::publish(&self.inner, event).await
    }

    async fn consume_incoming(
        &self,
        options: ConsumeOptions,
    ) -> Result<BoxStream<'static, Result<IncomingDelivery, BackendError>>, BackendError> {
        incoming::start(self.inner.clone(), options).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BackendError> {
        self.inner.check_open()?;
        incoming::dead_letters(&self.inner, limit).await
    }

    async fn resolve_dead_letters(
        &self,
        selection: &DeadLetterSelection,
        action: DeadLetterAction,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        self.inner.check_open()?;
        incoming::resolve_dead_letters(&self.inner, selection, action).await
    }

    async fn register_server(&self, server: &ServerId) -> Result<ServerStream, BackendError> {
        outgoing::register(&self.inner, server).await
    }

    async fn deregister_server(&self, server: &ServerId) -> Result<(), BackendError> {
        outgoing::deregister(&self.inner, server).await
    }

    async fn bind(&self, server: &ServerId, key: &RouteKey) -> Result<(), BackendError> {
        outgoing::bind(&self.inner, server, key).await
    }

    async fn unbind(&self, server: &ServerId, key: &RouteKey) -> Result<(), BackendError> {
        outgoing::unbind(&self.inner, server, key).await
    }

    async fn publish_outgoing(
        &self,
        key: &RouteKey,
        payload: Bytes,
    ) -> Result<RouteOutcome, BackendError> {
        outgoing::publish(&self.inner, key, &payload).await
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats();
        vec![
            ("outgoing_dropped", s.outgoing_dropped),
            ("outgoing_overflows", s.outgoing_overflows),
            ("outgoing_malformed", s.outgoing_malformed),
            ("subscriber_reconnects", s.subscriber_reconnects),
            ("routes_lost", s.routes_lost),
            ("dead_lettered", s.dead_lettered),
            ("janitor_servers_cleaned", s.janitor_servers_cleaned),
            ("janitor_routes_removed", s.janitor_routes_removed),
        ]
    }

    async fn shutdown(&self) -> Result<(), BackendError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Routes first, while everything else still runs: a graceful stop
        // must not leave stale routes for the janitor.
        let servers: Vec<(ServerId, outgoing::LocalServer)> =
            self.inner.servers().drain().collect();
        for (id, server) in servers {
            server.cancel.cancel();
            if let Err(e) = outgoing::remove_routes(&self.inner, &id, &server.token).await {
                tracing::warn!(server = %id, error = %e, "could not remove routes on shutdown; the janitor will");
            }
        }
        // Consumers hand their partitions over, subscribers close, the
        // janitor stops.
        self.inner.cancel.cancel();
        let tasks: Vec<JoinHandle<()>> = lock(&self.inner.tasks).drain(..).collect();
        let deadline = tokio::time::Instant::now() + self.inner.config.operation_timeout;
        for t in tasks {
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                tracing::warn!("a background task did not stop in time");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let c = RedisConfig {
            url: "redis://app:s3cret@redis.internal:6379/0".into(),
            ..RedisConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("redis://app:***@redis.internal:6379/0"),
            "{shown}"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://tok@h:1"), "redis://***@h:1");
    }

    #[test]
    fn config_is_validated() {
        let ok = RedisConfig::default();
        assert!(ok.validate().is_ok());
        for bad in [
            RedisConfig {
                namespace: "a:b".into(),
                ..RedisConfig::default()
            },
            RedisConfig {
                namespace: "a*".into(),
                ..RedisConfig::default()
            },
            RedisConfig {
                partitions: 0,
                ..RedisConfig::default()
            },
            RedisConfig {
                lease_ttl: Duration::from_millis(500),
                ..RedisConfig::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(BackendError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn errors_map_to_what_a_retry_can_fix() {
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(map_error(io).is_temporary());
    }
}
