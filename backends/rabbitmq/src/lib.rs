//! [`FanoutBackend`] on RabbitMQ (lapin): the seed article's design, with
//! its defects fixed. Broker bindings are the source of truth for which
//! gateway holds which user or channel.
//!
//! # Topology
//!
//! Every name starts with the configured namespace `ns`:
//!
//! ```text
//!  gateways ──publish (persistent, confirm, mandatory, key = partition)──▶ ns.incoming (direct)
//!                                                                      │  key "0".."N-1"
//!                                               ┌──────────────────────┴──────────────┐
//!                                               ▼                                     ▼
//!                          ns.in.0 … ns.in.{N-1}  (durable, quorum|classic, single-active-consumer,
//!                                               │   delivery limit 10^9 on quorum, DLX = ns.dlx)
//!            one worker at a time per partition ▼
//!                                            workers ──dead_letter()──▶ ns.dlx ──"dead"──▶ ns.dead
//!                                               │
//!          publish (mandatory, confirm, key = user id | channel:{id})
//!                                               ▼
//!                                         ns.outgoing (direct)
//!                        bindings: key ──▶ ns.gw.{server}   (one exclusive, auto-delete queue per gateway)
//!                                               ▼
//!                                            gateways
//!
//!  ns.members (direct) ──"m"──▶ ns.member.{id}   (one exclusive presence queue per consumer: heartbeats)
//! ```
//!
//! # Parts
//!
//! - [`RabbitMqConfig`], [`QueueType`]: settings;
//! - `session`: the two connections (publishing, consuming) to one node,
//!   with their long-lived channel pools, and the supervisor that replaces
//!   them after a loss (on another node of a cluster), re-declares the
//!   topology and the gateways' queues;
//! - `nodes`: the node URLs of a cluster (`url` is a comma-separated list),
//!   their validation and redaction, and which node to try next;
//! - `incoming`: publishing events, the consumer group (partition ownership
//!   over single-active-consumer queues, balanced by presence heartbeats),
//!   settling, dead letters;
//! - `outgoing`: gateway registration, bindings, publishing to keys;
//! - `topology`: names and declarations; `error`: mapping into
//!   [`BackendError`] and the deadline on every broker call.
//!
//! # Choices
//!
//! - Partition ownership: `x-single-active-consumer` on every partition
//!   queue is the lock (the broker requeues and hands over atomically when
//!   a consumer's channel closes); consumers balance themselves by presence
//!   heartbeats and hand a partition over only once nothing they handed out
//!   from it is unsettled. Exclusive consumers were rejected: quorum queues
//!   on 3.10 do not enforce them.
//! - Attempts: the quorum queue's `x-delivery-count`, informational only;
//!   nothing is dead-lettered by a count (the worker decides, by what the
//!   error says about the event). Classic queues only tell "redelivered".
//! - Dead letters are read with `basic.get` and given back by closing the
//!   reading channel (a classic queue restores their order; a quorum queue
//!   does if the scan took all of them, so it does).
//! - On a cluster, the partition and dead-letter queues are quorum queues
//!   whose leaders are balanced over the nodes; a backend uses one node at a
//!   time and moves to another when it loses it.
//! - No lapin auto-recovery: exclusive gateway queues die with their
//!   connection, so recovery must re-declare them and tell each gateway
//!   (`RoutesLost`); the supervisor rebuilds the whole session instead.
//!
//! See `docs/backends/rabbitmq.md` for the guarantees and the failure
//! behaviour.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use fanout_backend::{
    BackendError, Capabilities, ConsumeOptions, DeadLetter, DeadLetterAction, DeadLetterSelection,
    FanoutBackend, IncomingDelivery, IncomingEvent, RouteKey, RouteOutcome, ServerId, ServerStream,
};
use futures::stream::BoxStream;
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

mod error;
mod incoming;
mod nodes;
mod outgoing;
mod session;
mod topology;

use error::{bounded, within};
use session::Session;
use topology::{ss, Names};

/// The queue type of the incoming partition queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Classic (mirrored or not) queues: cheaper, not replicated.
    Classic,
    /// Quorum (Raft-replicated) queues, with a delivery limit no event
    /// reaches: the broker never dead-letters on its own.
    #[default]
    Quorum,
}

/// Settings of a RabbitMQ backend. Its `Debug` output hides the password
/// of every URL.
#[derive(Clone)]
pub struct RabbitMqConfig {
    /// AMQP URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`, or a
    /// comma-separated list of them: the nodes of one cluster. The backend
    /// connects to one live node (a random one first, so processes spread
    /// over the cluster) and moves to another when it loses it. Each URL
    /// must start with `amqp://` or `amqps://`; a comma in a password is
    /// written `%2C`. Add `?heartbeat=10` to notice a silently dead broker
    /// within seconds.
    pub url: String,
    /// Prefix of every exchange and queue name: 1 to 100 characters of
    /// `[A-Za-z0-9_.-]`.
    pub namespace: String,
    /// Number of incoming partitions (queues). Changing it re-maps ordering
    /// keys: drain the incoming side first.
    pub partitions: u32,
    /// Type of the partition queues. Fixed once the queues exist.
    pub queue_type: QueueType,
    /// Prefetch of each gateway's queue: messages in flight to one gateway
    /// before the broker waits for acks.
    pub server_prefetch: u16,
    /// Bound on every broker call; past it the call fails `Unavailable`.
    pub operation_timeout: Duration,
    /// `x-expires` on the namespace's durable queues; with it, exchanges
    /// are auto-delete too, so an idle namespace vanishes from the broker.
    /// For tests and throw-away deployments; `None` in production.
    pub queue_expiry: Option<Duration>,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            namespace: "fanout".to_owned(),
            partitions: 16,
            queue_type: QueueType::Quorum,
            server_prefetch: 1000,
            operation_timeout: Duration::from_secs(5),
            queue_expiry: None,
        }
    }
}

impl std::fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &nodes::redact_list(&self.url))
            .field("namespace", &self.namespace)
            .field("partitions", &self.partitions)
            .field("queue_type", &self.queue_type)
            .field("server_prefetch", &self.server_prefetch)
            .field("operation_timeout", &self.operation_timeout)
            .field("queue_expiry", &self.queue_expiry)
            .finish()
    }
}

impl RabbitMqConfig {
    /// The node URLs of [`RabbitMqConfig::url`], validated: one, or the
    /// comma-separated nodes of a cluster, in the order given.
    pub fn node_urls(&self) -> Result<Vec<String>, BackendError> {
        nodes::parse(&self.url)
    }

    fn validate(&self) -> Result<Vec<String>, BackendError> {
        let urls = self.node_urls()?;
        let ns_ok = !self.namespace.is_empty()
            && self.namespace.len() <= 100
            && self
                .namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ns_ok {
            return Err(BackendError::Invalid(
                format!(
                    "namespace must be 1 to 100 characters of [A-Za-z0-9_.-], got {:?}",
                    self.namespace
                )
                .into(),
            ));
        }
        if self.partitions == 0 || self.partitions > 10_000 {
            return Err(BackendError::Invalid(
                format!("partitions must be 1 to 10000, got {}", self.partitions).into(),
            ));
        }
        if self.server_prefetch == 0 {
            return Err(BackendError::Invalid(
                "server_prefetch must be at least 1".into(),
            ));
        }
        if self.operation_timeout.is_zero() {
            return Err(BackendError::Invalid(
                "operation_timeout must be positive".into(),
            ));
        }
        Ok(urls)
    }
}

/// The RabbitMQ backend. Cloning shares the connections.
#[derive(Debug, Clone)]
pub struct RabbitMqBackend {
    inner: Arc<Inner>,
}

/// State shared by the backend handle and its background tasks (which hold
/// it weakly, so dropping every handle ends them).
pub(crate) struct Inner {
    pub(crate) config: RabbitMqConfig,
    pub(crate) names: Names,
    /// The node URLs (`config.url` split), and where the next connection
    /// attempt starts among them.
    pub(crate) nodes: Vec<String>,
    pub(crate) cursor: nodes::Cursor,
    /// What earlier versions declared differently (`topology::declare`).
    pub(crate) legacy: topology::Legacy,
    /// Random per backend value: connection names, member ids.
    instance: String,
    /// The live session, or `None` while reconnecting (calls then fail fast).
    pub(crate) session: watch::Sender<Option<Arc<Session>>>,
    closed: AtomicBool,
    /// Set to `true` by `shutdown`; background tasks watch it.
    pub(crate) stopping: watch::Sender<bool>,
    /// Generations of sessions, attachments and partition slots.
    pub(crate) ids: AtomicU64,
    pub(crate) servers: Mutex<HashMap<ServerId, outgoing::ServerEntry>>,
    /// Serialises registration, deregistration and the re-attachment of
    /// gateway queues after a reconnect.
    pub(crate) registration: tokio::sync::Mutex<()>,
    /// Classic queues only: deliveries per event id seen by this process.
    pub(crate) unroutable: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    /// Gateway queues whose consumer ended without this process stopping
    /// it (connection loss, queue deleted, channel error).
    pub(crate) queues_lost: AtomicU64,
    /// Serialises `dead_letters` readers (each takes and gives back).
    pub(crate) dead_read: tokio::sync::Mutex<()>,
    /// Poked by calls that met a broken connection, so the supervisor looks
    /// at once instead of at its next poll.
    lost_hint: Notify,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Set by `delete_namespace`: the supervisor then stops re-declaring
    /// an ephemeral namespace.
    deleted: AtomicBool,
    /// Set by a call that found part of the topology missing (an
    /// unroutable incoming event): the supervisor declares it again.
    redeclare: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMq")
            .field("namespace", &self.config.namespace)
            .field("instance", &self.instance)
            .field("session", &*self.session.borrow())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How often the supervisor checks that both connections are open.
const SUPERVISOR_POLL: Duration = Duration::from_millis(200);
/// Least time between two probes of a connection that looks open while
/// calls on it fail.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Reconnection backoff: doubles from the first to the last value.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections never panic half-way through a multi-step update
    // (they are map inserts and counters), so a poisoned guard is sound.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn connection_name(&self, role: &str) -> String {
        format!("fanout {} {} {role}", self.config.namespace, self.instance)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The live session, or why there is none. Never waits: while the
    /// supervisor reconnects, calls fail at once with `Unavailable`.
    pub(crate) fn current(&self) -> Result<Arc<Session>, BackendError> {
        if self.is_closed() {
            return Err(BackendError::Closed);
        }
        match self.session.borrow().clone() {
            Some(s) if s.alive() => Ok(s),
            Some(_) => {
                self.lost_hint.notify_one();
                Err(BackendError::Unavailable(
                    "connection to RabbitMQ lost; reconnecting".into(),
                ))
            }
            None => Err(BackendError::Unavailable(
                "not connected to RabbitMQ; reconnecting".into(),
            )),
        }
    }

    /// Tells the supervisor that a call failed in a way a dead connection
    /// would explain.
    pub(crate) fn hint_lost(&self) {
        self.lost_hint.notify_one();
    }

    /// Asks the supervisor to declare the topology again (something was
    /// missing: deleted by hand, or expired).
    pub(crate) fn request_redeclare(&self) {
        self.redeclare.store(true, Ordering::Release);
        self.lost_hint.notify_one();
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.config.operation_timeout
    }
}

impl RabbitMqBackend {
    /// Connects to one node of `config.url`, declares the namespace's
    /// topology and starts the supervisor that reconnects (to any node)
    /// after a loss. Fails if no node answers, each within
    /// `operation_timeout`.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self, BackendError> {
        let nodes = config.validate()?;
        let instance = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let (session, _) = watch::channel(None);
        let (stopping, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            names: Names::new(&config.namespace),
            cursor: nodes::Cursor::random(nodes.len()),
            legacy: topology::Legacy::default(),
            nodes,
            config,
            instance,
            session,
            closed: AtomicBool::new(false),
            stopping,
            ids: AtomicU64::new(0),
            servers: Mutex::new(HashMap::new()),
            registration: tokio::sync::Mutex::new(()),
            unroutable: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            queues_lost: AtomicU64::new(0),
            dead_read: tokio::sync::Mutex::new(()),
            lost_hint: Notify::new(),
            supervisor: Mutex::new(None),
            deleted: AtomicBool::new(false),
            redeclare: AtomicBool::new(false),
        });
        let generation = session::next_id(&inner.ids);
        let first = Session::open(&inner, generation).await?;
        inner.session.send_replace(Some(Arc::new(first)));
        let handle = tokio::spawn(supervise(Arc::downgrade(&inner)));
        *lock(&inner.supervisor) = Some(handle);
        Ok(Self { inner })
    }

    /// The settings this backend runs with.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.inner.config
    }

    /// Outgoing messages the broker returned because no gateway was bound
    /// to their key (nobody online), since this backend started.
    pub fn unroutable_count(&self) -> u64 {
        self.inner.unroutable.load(Ordering::Relaxed)
    }

    /// How many times the backend re-established its connections.
    pub fn reconnect_count(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Whether a session is up now (no broker call).
    pub fn is_connected(&self) -> bool {
        self.inner.current().is_ok()
    }

    /// The URL (password hidden) of the node this backend is connected to
    /// now, or `None` while it reconnects.
    pub fn connected_node(&self) -> Option<String> {
        let session = self.inner.session.borrow().clone()?;
        session
            .alive()
            .then(|| nodes::redact(&self.inner.nodes[session.node]))
    }

    /// The `connection_name` client property of this backend's two
    /// connections, as `rabbitmqctl list_connections client_properties`
    /// shows it: operators (and tests) can close exactly these.
    pub fn connection_names(&self) -> [String; 2] {
        [
            self.inner.connection_name("pub"),
            self.inner.connection_name("sub"),
        ]
    }

    /// How many keys this backend has bound for `server` (its own
    /// bookkeeping, which `deregister_server` unbinds from), or `None` if
    /// the server is not registered here.
    pub fn bound_keys(&self, server: &ServerId) -> Option<usize> {
        lock(&self.inner.servers).get(server).map(|e| e.keys.len())
    }

    /// Deletes every queue and exchange of `config.namespace` without
    /// declaring anything first: unlike [`RabbitMqBackend::connect`] +
    /// [`RabbitMqBackend::delete_namespace`], it works on a namespace whose
    /// queues an earlier version declared with other arguments (which
    /// `connect` refuses, PRECONDITION_FAILED). Gateway and presence
    /// queues are exclusive and go with their connections. Idempotent.
    pub async fn purge(config: &RabbitMqConfig) -> Result<(), BackendError> {
        let urls = config.validate()?;
        let names = Names::new(&config.namespace);
        let props = lapin::ConnectionProperties::default().with_connection_name(
            lapin::types::LongString::from(format!("fanout purge {}", config.namespace)),
        );
        within(config.operation_timeout * 4, "purge namespace", async {
            // Any node will do: queues and exchanges are cluster-wide.
            let mut conn = None;
            let mut last = None;
            for url in &urls {
                match within(config.operation_timeout, "connect to RabbitMQ", async {
                    lapin::Connection::connect(url, props.clone())
                        .await
                        .map_err(|e| error::map_err("connect to RabbitMQ", &e))
                })
                .await
                {
                    Ok(c) => {
                        conn = Some(c);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let Some(conn) = conn else {
                return Err(
                    last.unwrap_or(BackendError::Invalid("no RabbitMQ URL configured".into()))
                );
            };
            let result = async {
                let ch = conn
                    .create_channel()
                    .await
                    .map_err(|e| error::map_err("open channel", &e))?;
                delete_topology(&ch, &names, config.partitions).await
            }
            .await;
            let _ = conn.close(200, "purged".into()).await;
            result
        })
        .await
    }

    /// Deletes the namespace's shared topology: partition queues (with any
    /// events in them), the dead-letter queue and the exchanges. Gateways'
    /// and consumers' queues are exclusive and go with their connections.
    /// For tests and decommissioning; running workers and gateways of the
    /// namespace will fail until it is declared again.
    pub async fn delete_namespace(&self) -> Result<(), BackendError> {
        let inner = &self.inner;
        let session = inner.current()?;
        let names = &inner.names;
        inner.deleted.store(true, Ordering::Release);
        within(inner.timeout() * 4, "delete namespace", async {
            let ch = session
                .admin
                .get(0)
                .await
                .map_err(|e| error::map_err("open channel", &e))?;
            delete_topology(&ch, names, inner.config.partitions).await
        })
        .await
    }
}

/// Deletes a namespace's shared queues (with any events in them) and
/// exchanges on `ch`.
async fn delete_topology(
    ch: &lapin::Channel,
    names: &Names,
    partitions: u32,
) -> Result<(), BackendError> {
    let mut queues: Vec<String> = (0..partitions).map(|p| names.partition_queue(p)).collect();
    queues.push(names.dead_letter_queue());
    for q in queues {
        ch.queue_delete(ss(&q), QueueDeleteOptions::default())
            .await
            .map_err(|e| error::map_err("delete queue", &e))?;
    }
    for x in [
        names.incoming_exchange(),
        names.outgoing_exchange(),
        names.dead_letter_exchange(),
        names.members_exchange(),
    ] {
        ch.exchange_delete(ss(&x), ExchangeDeleteOptions::default())
            .await
            .map_err(|e| error::map_err("delete exchange", &e))?;
    }
    Ok(())
}

/// Watches the session and replaces it when either connection dies:
/// reconnects with backoff, re-declares the topology, re-declares every
/// registered gateway's queue (whose stream then yields `RoutesLost`), and
/// only then publishes the new session, so no call ever sees a half-built
/// one. Partition consumers notice the new session themselves.
async fn supervise(weak: Weak<Inner>) {
    let mut touched = tokio::time::Instant::now();
    let mut probed = tokio::time::Instant::now();
    loop {
        // Watch the live session.
        loop {
            let Some(inner) = weak.upgrade() else { return };
            if inner.is_closed() {
                return;
            }
            let current = inner.session.borrow().clone();
            let Some(session) = current.filter(|s| s.alive()) else {
                break;
            };
            // An ephemeral namespace expires when unused: while this backend
            // is connected, declaring it again now and then counts as use
            // (and re-creates an exchange that was auto-deleted meanwhile).
            // A call that found part of the topology missing asks for the
            // same.
            let refresh_due = inner
                .config
                .queue_expiry
                .is_some_and(|e| touched.elapsed() >= (e / 3).max(Duration::from_secs(1)))
                && !inner.deleted.load(Ordering::Acquire);
            if refresh_due || inner.redeclare.swap(false, Ordering::AcqRel) {
                touched = tokio::time::Instant::now();
                let r = bounded(inner.timeout(), "declare topology", async {
                    topology::declare(&session.admin, &inner.config, &inner.names, &inner.legacy)
                        .await
                })
                .await;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "could not declare the topology again");
                }
            }
            let hinted = tokio::select! {
                _ = tokio::time::sleep(SUPERVISOR_POLL) => false,
                _ = inner.lost_hint.notified() => true,
            };
            // A call failed although the connections look open. A network
            // that drops packets silently is only noticed by AMQP heartbeats
            // (tens of seconds): ask the broker directly, at most once a
            // second, and give the session up if it does not answer.
            if hinted && session.alive() && probed.elapsed() >= PROBE_EVERY {
                probed = tokio::time::Instant::now();
                if let Err(e) = probe(&inner, &session).await {
                    tracing::warn!(error = %e, "RabbitMQ does not answer on an open connection");
                    break;
                }
            }
        }
        // Lost: fail calls fast from now on, and close what is left.
        let Some(inner) = weak.upgrade() else { return };
        if inner.is_closed() {
            return;
        }
        if let Some(old) = inner.session.send_replace(None) {
            tracing::warn!(
                namespace = %inner.config.namespace,
                generation = old.generation,
                "RabbitMQ connection lost; reconnecting"
            );
            old.close().await;
        }
        drop(inner);
        // Reconnect.
        let mut delay = BACKOFF_FIRST;
        loop {
            let Some(inner) = weak.upgrade() else { return };
            if inner.is_closed() {
                return;
            }
            match reconnect(&inner).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "RabbitMQ reconnect failed");
                }
            }
            let mut stopping = inner.stopping.subscribe();
            drop(inner);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopping.changed() => {}
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }
}

/// Opens and closes a channel on each connection: answered by the broker's
/// connection process, so it tells a dead or wedged connection from a busy
/// queue.
async fn probe(inner: &Inner, session: &Session) -> Result<(), BackendError> {
    for conn in [&session.publish, &session.consume] {
        bounded(inner.timeout() * 2, "probe connection", async {
            let ch = conn.create_channel().await?;
            ch.close(200, "probe".into()).await
        })
        .await?;
    }
    Ok(())
}

async fn reconnect(inner: &Arc<Inner>) -> Result<(), BackendError> {
    let generation = session::next_id(&inner.ids);
    let session = Arc::new(Session::open(inner, generation).await?);
    // Registration is locked so that a gateway registering meanwhile is
    // either re-attached here or attaches itself to the new session.
    let _registration = inner.registration.lock().await;
    if let Err(e) = outgoing::reattach_all(inner, &session).await {
        session.close().await;
        return Err(e);
    }
    if inner.is_closed() {
        session.close().await;
        return Err(BackendError::Closed);
    }
    let session_node = session.node;
    inner.session.send_replace(Some(session));
    inner.reconnects.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        namespace = %inner.config.namespace,
        generation,
        node = %nodes::redact(&inner.nodes[session_node]),
        "RabbitMQ connection re-established"
    );
    Ok(())
}

#[async_trait]
impl FanoutBackend for RabbitMqBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "rabbitmq",
            // Durable queues, persistent messages, confirms before Ok.
            durable_incoming: true,
            // Manual acks; unsettled deliveries return to their queue.
            incoming_at_least_once: true,
            // Single-active-consumer partitions, handed over only when
            // nothing is unsettled.
            per_key_ordering: true,
            // A live gateway's queue is unbounded and acked: a slow gateway
            // loses nothing. A connection loss deletes the exclusive queue
            // and what was in it, which the stream reports as RoutesLost.
            outgoing_at_least_once: true,
            explicit_routing_table: false,
            reports_unroutable: true,
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("unroutable", self.unroutable_count()),
            ("reconnects", self.reconnect_count()),
            (
                "gateway_queues_lost",
                self.inner.queues_lost.load(Ordering::Relaxed),
            ),
        ]
    }

    async fn health(&self) -> Result<(), BackendError> {
        let inner = &self.inner;
        let session = inner.current()?;
        if session.publish.status().blocked() {
            return Err(BackendError::Unavailable(
                "RabbitMQ blocks publishing (resource alarm)".into(),
            ));
        }
        // A gateway whose queue is gone receives nothing until it is
        // declared again: not ready meanwhile, however healthy the broker.
        if let Some(server) = outgoing::detached(inner) {
            return Err(BackendError::Unavailable(
                format!("the queue of gateway {server} was lost; declaring it again").into(),
            ));
        }
        let limit = inner.timeout().min(Duration::from_secs(2));
        let exchange = inner.names.incoming_exchange();
        let r = bounded(limit, "health check", async {
            let ch = session.admin.get(0).await?;
            ch.exchange_declare(
                ss(&exchange),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
        })
        .await;
        if r.is_err() {
            inner.hint_lost();
        }
        r
    }

    async fn publish_incoming(&self, event: IncomingEvent) -> Result<(), BackendError> {
        incoming::publish(&self.inner, event).await
    }

    async fn consume_incoming(
        &self,
        options: ConsumeOptions,
    ) -> Result<BoxStream<'static, Result<IncomingDelivery, BackendError>>, BackendError> {
        incoming::consume(&self.inner, options)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BackendError> {
        incoming::dead_letters(&self.inner, limit).await
    }

    async fn resolve_dead_letters(
        &self,
        selection: &DeadLetterSelection,
        action: DeadLetterAction,
    ) -> Result<Vec<DeadLetter>, BackendError> {
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
        payload: bytes::Bytes,
    ) -> Result<RouteOutcome, BackendError> {
        outgoing::publish(&self.inner, key, payload).await
    }

    async fn shutdown(&self) -> Result<(), BackendError> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        inner.stopping.send_replace(true);
        if let Some(h) = lock(&inner.supervisor).take() {
            h.abort();
        }
        // Ends every gateway stream: their pumps stop and their senders go.
        outgoing::detach_all(inner);
        // Consumers release their partitions when they see `stopping`;
        // closing the connections returns anything still unsettled.
        if let Some(session) = inner.session.send_replace(None) {
            session.close().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password_of_every_node() {
        let c = RabbitMqConfig {
            url: "amqp://u:hunter2@a:5672/%2f,amqp://v:swordfish@b:5672/%2f".into(),
            ..RabbitMqConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("swordfish"),
            "{shown}"
        );
        assert!(
            shown.contains("amqp://u:***@a:5672/%2f,amqp://v:***@b:5672/%2f"),
            "{shown}"
        );
    }

    #[test]
    fn validation_returns_the_node_urls() {
        let c = RabbitMqConfig {
            url: "amqp://a/%2f , amqp://b/%2f".into(),
            ..RabbitMqConfig::default()
        };
        assert_eq!(
            c.validate().expect("valid"),
            ["amqp://a/%2f", "amqp://b/%2f"]
        );
        let bad = RabbitMqConfig {
            url: "amqp://a/%2f,".into(),
            ..RabbitMqConfig::default()
        };
        assert!(matches!(bad.validate(), Err(BackendError::Invalid(_))));
    }
}
