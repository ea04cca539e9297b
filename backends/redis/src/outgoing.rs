//! The outgoing side: the routing table, one Pub/Sub channel per server,
//! and the subscriber connection of each registered server.
//!
//! A registration owns the id through a random token stored in the
//! liveness key. Every write that could affect a newer holder of the same id
//! (bind, cleanup, refresh) is a script that checks the token first, so a
//! restarted gateway never inherits routes and a slow cleanup of its
//! predecessor never removes the newcomer's routes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use fanout_backend::{
    BackendError, OutgoingMessage, RouteKey, RouteOutcome, ServerEvent, ServerId, ServerStream,
};
use futures::stream::{self, StreamExt};
use redis::aio::{AsyncPushSender, SendError};
use redis::cluster::ClusterClient;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Notify};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::conn::Conn;
use crate::{jitter_fraction, Counters, Inner};

/// Messages buffered per server between Redis and the gateway. Beyond it
/// messages are dropped and counted (Pub/Sub has no backpressure: Redis
/// itself would disconnect a subscriber whose output buffer overflows),
/// and the overflow is a route loss: everything from the first drop until
/// a `RoutesLost` is queued is dropped too, so the gateway's catch-up from
/// the store starts at a clean cut (see [`PushForwarder`]).
pub(crate) const SERVER_BUFFER: usize = 65_536;
/// How often a subscriber connection is PINGed; a half-open TCP connection
/// (no RST, e.g. a network partition) is detected by a PING that times out.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Routes removed per script call during cleanup; small enough that one
/// call never stalls Redis for long (about 0.5 ms per 500 keys).
const CLEANUP_BATCH: usize = 500;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// On a cluster the other nodes answer while one fails over, so retrying
/// is cheap, and the promotion (seconds) is what a gateway waits for: a
/// short ceiling resubscribes within a second of it instead of up to five.
const CLUSTER_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A server registered on this backend value.
#[derive(Debug)]
pub(crate) struct LocalServer {
    /// Tells this registration apart from a later one of the same id.
    pub generation: u64,
    /// Stored in the liveness key while this registration holds the id.
    pub token: String,
    /// Stops the subscriber task (and so ends the stream).
    pub cancel: CancellationToken,
    /// Wakes the subscriber task to yield `RoutesLost` (a bind found the
    /// liveness key expired and re-asserted it, or the stream overflowed).
    pub routes_lost: Arc<Notify>,
}

/// Shared by a registration's push forwarders and its subscriber task:
/// set at the first message dropped for a full stream, cleared once the
/// `RoutesLost` that recovers it is queued.
#[derive(Debug, Default)]
pub(crate) struct Overflow {
    dropping: AtomicBool,
}

/// Frames a message for a server channel: `[key length: u8][key][payload]`.
/// The channel is per server, so the route key has to travel inside.
pub(crate) fn encode_frame(key: &RouteKey, payload: &[u8]) -> Vec<u8> {
    let k = key.as_routing_key();
    // Routing keys are at most "channel:" + 64 bytes, so the length fits a
    // byte; `min` keeps this total even if that ever changed.
    let len = k.len().min(usize::from(u8::MAX));
    let mut frame = Vec::with_capacity(1 + len + payload.len());
    frame.push(len as u8);
    frame.extend_from_slice(&k.as_bytes()[..len]);
    frame.extend_from_slice(payload);
    frame
}

/// The inverse of [`encode_frame`]; `None` for anything malformed.
pub(crate) fn decode_frame(frame: &[u8]) -> Option<(RouteKey, Bytes)> {
    let (&len, rest) = frame.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    let key = std::str::from_utf8(&rest[..len]).ok()?;
    let key = RouteKey::parse(key)?;
    Some((key, Bytes::copy_from_slice(&rest[len..])))
}

/// Receives the pushes of one subscriber connection (called by redis-rs'
/// connection driver, so it must never block): messages go to the server's
/// stream, a disconnection wakes the subscriber task.
///
/// A full stream (the gateway fell [`SERVER_BUFFER`] messages behind) is a
/// route loss, never a silent drop: the message is counted as dropped, the
/// subscriber task is woken to queue a `RoutesLost` as soon as there is
/// room, and every message until then is dropped and counted too. So the
/// gateway sees all messages before the first drop, then `RoutesLost`,
/// and its catch-up from the store covers exactly the dropped ones.
#[derive(Clone)]
struct PushForwarder {
    tx: mpsc::Sender<ServerEvent>,
    disconnected: Arc<Notify>,
    counters: Arc<Counters>,
    server: ServerId,
    /// Set while a re-established subscription has not queued its
    /// `RoutesLost` yet: its messages are dropped meanwhile (see
    /// [`Subscriber::reconnect`]).
    held: Arc<AtomicBool>,
    overflow: Arc<Overflow>,
    routes_lost: Arc<Notify>,
}

impl PushForwarder {
    fn drop_one(&self) {
        Counters::bump(&self.counters.outgoing_dropped, 1);
        if !self.overflow.dropping.swap(true, Ordering::AcqRel) {
            Counters::bump(&self.counters.outgoing_overflows, 1);
            tracing::warn!(
                server = %self.server,
                buffer = SERVER_BUFFER,
                "server stream full: the gateway fell behind; dropping until it recovers the gap from the store"
            );
            self.routes_lost.notify_one();
        }
    }
}

impl AsyncPushSender for PushForwarder {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        match info.kind {
            // Classic Pub/Sub on a standalone Redis, sharded on a cluster.
            PushKind::Message | PushKind::SMessage => {
                let frame = match info.data.get(1) {
                    Some(Value::BulkString(b)) => b.as_slice(),
                    _ => &[][..],
                };
                let Some((key, payload)) = decode_frame(frame) else {
                    Counters::bump(&self.counters.outgoing_malformed, 1);
                    tracing::warn!(server = %self.server, "skipped a malformed outgoing frame");
                    return Ok(());
                };
                if self.held.load(Ordering::Acquire) {
                    return Ok(());
                }
                if self.overflow.dropping.load(Ordering::Acquire) {
                    self.drop_one();
                    return Ok(());
                }
                let event = ServerEvent::Message(OutgoingMessage { key, payload });
                match self.tx.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => self.drop_one(),
                    // The stream was dropped; the task is stopping.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            // A lost connection, or (cluster) the channel's slot moved to
            // another node, which unsubscribes us: either way messages may
            // have been missed, and the subscription is set up anew.
            PushKind::Disconnection | PushKind::SUnsubscribe => self.disconnected.notify_one(),
            // Subscribe confirmations and anything else are not ours to act on.
            _ => {}
        }
        Ok(())
    }
}

/// Opens a server's subscriber connection: RESP3, named, subscribed.
async fn connect_subscriber(
    inner: &Inner,
    server: &ServerId,
    forwarder: PushForwarder,
) -> Result<Conn, redis::RedisError> {
    if inner.cluster() {
        return connect_cluster_subscriber(inner, server, forwarder).await;
    }
    let op = inner.config.operation_timeout;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(op))
        .set_response_timeout(Some(op))
        .set_push_sender(forwarder);
    let mut con = inner
        .sub_client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(inner.keys.subscriber_client_name(server))
        .query_async::<()>(&mut con)
        .await?;
    con.subscribe(inner.keys.out_channel(server)).await?;
    Ok(Conn::Plain(con))
}

/// On a cluster: a cluster connection of the server's own (RESP3, pushes to
/// the forwarder), subscribed to its sharded channel, which lives on the
/// node that owns the channel's slot. The connection to that node is named
/// like a standalone subscriber, so operators and tests find it.
///
/// redis-rs would resubscribe by itself after a reconnection or a slot move,
/// but silently: messages published meanwhile are gone and nobody would
/// know. So every such event (a `Disconnection` or `sunsubscribe` push, or
/// a health check that finds no subscriber) makes the subscriber task build
/// a new subscription and report `RoutesLost`, as on a standalone Redis.
async fn connect_cluster_subscriber(
    inner: &Inner,
    server: &ServerId,
    forwarder: PushForwarder,
) -> Result<Conn, redis::RedisError> {
    let op = inner.config.operation_timeout;
    let client = ClusterClient::builder(inner.config.urls().iter().map(|u| u.to_string()))
        .use_protocol(ProtocolVersion::RESP3)
        .connection_timeout(op)
        .response_timeout(op)
        .retries(1)
        .push_sender(forwarder)
        .build()?;
    let mut con = client.get_async_connection().await?;
    let channel = inner.keys.out_channel(server);
    con.ssubscribe(&channel).await?;
    let owner = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
        &channel,
        SlotAddr::Master,
    )));
    let mut name = redis::cmd("CLIENT");
    name.arg("SETNAME")
        .arg(inner.keys.subscriber_client_name(server));
    con.route_command(name, owner).await?;
    Ok(Conn::Cluster(con))
}

/// Whether a subscriber connection is alive and subscribed: a PING on a
/// standalone Redis; on a cluster, the channel's subscriber count on the
/// node that owns its slot (a PING would go to any node; and redis-rs would
/// send `PUBSUB SHARDNUMSUB` to every node, so one node down would make
/// every gateway start over, not only those whose channel it held).
async fn check_subscribed(inner: &Inner, server: &ServerId, con: &mut Conn) -> bool {
    let limit = inner.config.operation_timeout;
    let Conn::Cluster(cluster) = con else {
        let pong = tokio::time::timeout(limit, redis::cmd("PING").query_async::<String>(con)).await;
        return matches!(pong, Ok(Ok(_)));
    };
    let channel = inner.keys.out_channel(server);
    let owner = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
        crate::keys::slot_of(&channel),
        SlotAddr::Master,
    )));
    let mut count = redis::cmd("PUBSUB");
    count.arg("SHARDNUMSUB").arg(&channel);
    match tokio::time::timeout(limit, cluster.route_command(count, owner)).await {
        Ok(Ok(v)) => subscriber_count(&v) > 0,
        _ => false,
    }
}

/// The count in a `PUBSUB SHARDNUMSUB channel` reply: `[channel, n]` (a
/// map `{channel: n}` where redis-rs combines several nodes' answers).
fn subscriber_count(v: &Value) -> i64 {
    let n = match v {
        Value::Array(a) => a.get(1),
        Value::Map(m) => m.first().map(|(_, n)| n),
        _ => None,
    };
    match n {
        Some(Value::Int(n)) => *n,
        _ => 0,
    }
}

/// Runs the liveness script in `claim` or `refresh` mode.
async fn alive(
    inner: &Inner,
    server: &ServerId,
    token: &str,
    mode: &str,
) -> Result<i64, BackendError> {
    inner.scripts.alive.call(inner, server, token, mode).await
}

/// Removes a server's routes in batches. `mode` is the guard (see the
/// CLEANUP script). Returns the routes removed, or `None` if the guard
/// refused (another registration holds the id).
pub(crate) async fn cleanup(
    inner: &Inner,
    server: &str,
    token: &str,
    mode: &str,
) -> Result<Option<u64>, BackendError> {
    let mut removed = 0u64;
    loop {
        let (left, popped) = (inner.scripts.cleanup)
            .call(inner, server, token, mode, CLEANUP_BATCH)
            .await?;
        removed += popped;
        if left < 0 {
            return Ok(None);
        }
        if left == 0 {
            return Ok(Some(removed));
        }
    }
}

/// Graceful removal of a registration's routes and liveness key.
pub(crate) async fn remove_routes(
    inner: &Inner,
    server: &ServerId,
    token: &str,
) -> Result<(), BackendError> {
    cleanup(inner, server.as_str(), token, "deregister").await?;
    Ok(())
}

pub(crate) async fn register(
    inner: &Arc<Inner>,
    server: &ServerId,
) -> Result<ServerStream, BackendError> {
    inner.check_open()?;
    let generation = inner.generation.fetch_add(1, Ordering::Relaxed);
    let token = uuid::Uuid::new_v4().simple().to_string();
    let cancel = inner.cancel.child_token();
    let routes_lost = Arc::new(Notify::new());
    {
        let mut servers = inner.servers();
        if servers.contains_key(server) {
            return Err(BackendError::Conflict(server.to_string().into()));
        }
        // Reserved before any await, so two concurrent registrations of
        // one id cannot both pass the check.
        servers.insert(
            server.clone(),
            LocalServer {
                generation,
                token: token.clone(),
                cancel: cancel.clone(),
                routes_lost: routes_lost.clone(),
            },
        );
    }
    let (tx, rx) = mpsc::channel(SERVER_BUFFER);
    let held = Arc::new(AtomicBool::new(false));
    let overflow = Arc::new(Overflow::default());
    let setup = async {
        let disconnected = Arc::new(Notify::new());
        let forwarder = PushForwarder {
            tx: tx.clone(),
            disconnected: disconnected.clone(),
            counters: inner.counters.clone(),
            server: server.clone(),
            held: held.clone(),
            overflow: overflow.clone(),
            routes_lost: routes_lost.clone(),
        };
        // Claimed before subscribing: the claim tells a live holder of the
        // id (subscribed to its channel) from a crashed one (not), and our
        // own subscription must not count. A live holder keeps the id.
        if alive(inner, server, &token, "claim").await? < 0 {
            return Err(BackendError::Conflict(
                format!("{server} (another live process holds it)").into(),
            ));
        }
        // Subscribed before we return, so a bind that follows is
        // effective at once.
        let subscribed = async {
            let con = inner
                .run(connect_subscriber(inner, server, forwarder))
                .await?;
            // A predecessor with this id (a gateway restarted after a
            // crash) may have left routes: they are not ours. The guard
            // also fails if a process starting at the same instant took
            // the id after our claim.
            if cleanup(inner, server.as_str(), &token, "owner")
                .await?
                .is_none()
            {
                return Err(BackendError::Conflict(
                    format!("{server} (another process registered it at the same time)").into(),
                ));
            }
            Ok(con)
        }
        .await;
        match subscribed {
            Ok(con) => Ok((con, disconnected)),
            Err(e) => {
                // Give the id back at once rather than after the TTL.
                let _ = remove_routes(inner, server, &token).await;
                Err(e)
            }
        }
    };
    let (con, disconnected) = match setup.await {
        Ok(v) => v,
        Err(e) => {
            forget(inner, server, generation);
            return Err(e);
        }
    };
    let task = Subscriber {
        inner: inner.clone(),
        server: server.clone(),
        token,
        generation,
        tx,
        cancel,
        routes_lost,
        held,
        overflow,
    };
    inner.spawn(task.run(con, disconnected));
    let guard = ServerGuard {
        inner: Arc::downgrade(inner),
        server: server.clone(),
        generation,
    };
    let stream = stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|ev| (ev, (rx, guard)))
    });
    Ok(stream.boxed())
}

/// Removes the local entry of a registration if it is still this one.
fn forget(inner: &Inner, server: &ServerId, generation: u64) -> Option<LocalServer> {
    let mut servers = inner.servers();
    if servers
        .get(server)
        .is_some_and(|s| s.generation == generation)
    {
        servers.remove(server)
    } else {
        None
    }
}

pub(crate) async fn deregister(inner: &Inner, server: &ServerId) -> Result<(), BackendError> {
    let entry = inner.servers().remove(server);
    match entry {
        Some(s) => {
            s.cancel.cancel();
            remove_routes(inner, server, &s.token).await
        }
        // Never registered here, or already deregistered: idempotent.
        None => Ok(()),
    }
}

pub(crate) async fn bind(
    inner: &Inner,
    server: &ServerId,
    key: &RouteKey,
) -> Result<(), BackendError> {
    inner.check_open()?;
    let (token, routes_lost) = {
        let servers = inner.servers();
        let s = servers
            .get(server)
            .ok_or_else(|| BackendError::NotRegistered(server.to_string().into()))?;
        (s.token.clone(), s.routes_lost.clone())
    };
    let code = inner.scripts.bind.call(inner, server, key, &token).await?;
    match code {
        1 => Ok(()),
        0 => {
            // Our liveness had lapsed (Redis unreachable longer than the
            // TTL, or restarted): the janitor may have removed some routes.
            routes_lost.notify_one();
            Ok(())
        }
        _ => Err(BackendError::Conflict(server.to_string().into())),
    }
}

pub(crate) async fn unbind(
    inner: &Inner,
    server: &ServerId,
    key: &RouteKey,
) -> Result<(), BackendError> {
    inner.check_open()?;
    let mut conn = inner.conn();
    // The route first, then the server's own record (two slots on a
    // cluster): a crash between the two leaves a record without its route,
    // which the cleanup removes for nothing, never a route the cleanup
    // would not know of.
    inner
        .run(
            redis::cmd("SREM")
                .arg(inner.keys.route(key))
                .arg(server.as_str())
                .query_async::<()>(&mut conn),
        )
        .await?;
    inner
        .run(
            redis::cmd("SREM")
                .arg(inner.keys.server_keys(server.as_str()))
                .arg(key.as_routing_key())
                .query_async::<()>(&mut conn),
        )
        .await
}

pub(crate) async fn publish(
    inner: &Inner,
    key: &RouteKey,
    payload: &[u8],
) -> Result<RouteOutcome, BackendError> {
    inner.check_open()?;
    let frame = encode_frame(key, payload);
    let (bound, received) = if inner.cluster() {
        publish_sharded(inner, key, &frame).await?
    } else {
        inner.scripts.publish.call(inner, key, &frame).await?
    };
    if bound > 0 && received < bound {
        // A bound server without a subscriber: crashed (stale route, until
        // the janitor runs) or reconnecting. Its copy is lost.
        tracing::debug!(key = %key, bound, received, "message reached fewer servers than are bound");
    }
    Ok(if received == 0 {
        RouteOutcome::Unroutable
    } else {
        RouteOutcome::Routed {
            servers: Some(received as usize),
        }
    })
}

/// A publish on a cluster: the route set, then `SPUBLISH` on the channel of
/// each bound server, each on the node of its channel (two round trips; one
/// script cannot, its channels are in other slots). A bind that lands
/// between the two misses this message live; the gateway reads its sessions'
/// inboxes after binding, and the message was stored before it was
/// published, so the read covers it.
async fn publish_sharded(
    inner: &Inner,
    key: &RouteKey,
    frame: &[u8],
) -> Result<(u64, u64), BackendError> {
    let servers: Vec<String> = inner
        .query(redis::cmd("SMEMBERS").arg(inner.keys.route(key)))
        .await?;
    let sends = servers
        .iter()
        .filter_map(|s| ServerId::new(s).ok())
        .map(|s| {
            let mut conn = inner.conn();
            let channel = inner.keys.out_channel(&s);
            async move {
                inner
                    .run(
                        redis::cmd("SPUBLISH")
                            .arg(channel)
                            .arg(frame)
                            .query_async::<i64>(&mut conn),
                    )
                    .await
            }
        });
    let received = futures::future::try_join_all(sends)
        .await?
        .into_iter()
        .filter(|&n| n > 0)
        .count();
    Ok((servers.len() as u64, received as u64))
}

/// Deregisters a server when its stream is dropped, unless the id was
/// registered anew since.
struct ServerGuard {
    inner: Weak<Inner>,
    server: ServerId,
    generation: u64,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let Some(entry) = forget(&inner, &self.server, self.generation) else {
            return;
        };
        entry.cancel.cancel();
        // Drop cannot await: the route removal runs in the background. Outside
        // a runtime (process exit) the janitor removes them after the TTL.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let server = self.server.clone();
            rt.spawn(async move {
                if let Err(e) = remove_routes(&inner, &server, &entry.token).await {
                    tracing::warn!(server = %server, error = %e, "could not remove routes of a dropped server; the janitor will");
                }
            });
        }
    }
}

/// The background task of one registered server: keeps its subscription
/// and its liveness key alive.
struct Subscriber {
    inner: Arc<Inner>,
    server: ServerId,
    token: String,
    generation: u64,
    tx: mpsc::Sender<ServerEvent>,
    cancel: CancellationToken,
    routes_lost: Arc<Notify>,
    /// Shared with the current subscription's forwarder.
    held: Arc<AtomicBool>,
    overflow: Arc<Overflow>,
}

enum Next {
    Continue,
    Reconnect,
    Stop,
}

impl Subscriber {
    async fn run(self, mut con: Conn, mut disconnected: Arc<Notify>) {
        let mut ping = interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut refresh = interval(self.inner.config.liveness_ttl / 3);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Both intervals fire at once; the registration just did both.
        ping.tick().await;
        refresh.tick().await;
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => Next::Stop,
                _ = self.tx.closed() => Next::Stop,
                _ = disconnected.notified() => Next::Reconnect,
                _ = ping.tick() => {
                    if check_subscribed(&self.inner, &self.server, &mut con).await {
                        Next::Continue
                    } else {
                        Next::Reconnect
                    }
                }
                _ = refresh.tick() => self.refresh().await,
                _ = self.routes_lost.notified() => self.yield_routes_lost().await,
            };
            match next {
                Next::Continue => {}
                Next::Stop => return,
                Next::Reconnect => {
                    tracing::warn!(server = %self.server, "subscriber connection lost; reconnecting");
                    drop(con);
                    match self.reconnect().await {
                        Some((c, d)) => {
                            con = c;
                            disconnected = d;
                            if let Next::Stop = self.yield_routes_lost().await {
                                return;
                            }
                        }
                        None => return,
                    }
                }
            }
        }
    }

    async fn refresh(&self) -> Next {
        match alive(&self.inner, &self.server, &self.token, "refresh").await {
            Ok(1) => Next::Continue,
            Ok(0) => {
                tracing::warn!(server = %self.server, "liveness key had expired; re-asserted");
                self.yield_routes_lost().await
            }
            Ok(_) => self.taken_over(),
            // Redis unreachable: the ping notices a dead subscriber; the
            // next refresh re-asserts liveness when Redis is back.
            Err(e) => {
                tracing::warn!(server = %self.server, error = %e, "could not refresh liveness");
                Next::Continue
            }
        }
    }

    fn taken_over(&self) -> Next {
        tracing::error!(
            server = %self.server,
            "server id registered by another process; this registration ends"
        );
        forget(&self.inner, &self.server, self.generation);
        Next::Stop
    }

    async fn yield_routes_lost(&self) -> Next {
        Counters::bump(&self.inner.counters.routes_lost, 1);
        let next = tokio::select! {
            _ = self.cancel.cancelled() => Next::Stop,
            sent = self.tx.send(ServerEvent::RoutesLost) => {
                if sent.is_ok() { Next::Continue } else { Next::Stop }
            }
        };
        self.held.store(false, Ordering::Release);
        // Queued: what arrives from here on follows the RoutesLost, whose
        // catch-up covers what was dropped before it.
        if self.overflow.dropping.swap(false, Ordering::AcqRel) {
            tracing::info!(server = %self.server, "stream has room again after an overflow; the gateway recovers the gap");
        }
        next
    }

    /// Reconnects with exponential backoff and jitter until subscribed and
    /// live again; `None` if the registration ended meanwhile.
    ///
    /// The new subscription's messages are dropped until the caller has
    /// queued `RoutesLost`. Otherwise a message published right after the
    /// SUBSCRIBE (the route sets outlive the connection, and after a Redis
    /// restart the workers' backlog comes out at once) would reach the
    /// gateway before `RoutesLost` and pass for its last delivery before
    /// the loss: its catch-up would then start after the gap (measured: 6
    /// to 8 deliveries lost to connected sessions in the fault matrix's
    /// Redis restart). Dropped here, they are stored, so the catch-up after
    /// `RoutesLost` shows them.
    async fn reconnect(&self) -> Option<(Conn, Arc<Notify>)> {
        self.held.store(true, Ordering::Release);
        Counters::bump(&self.inner.counters.subscriber_reconnects, 1);
        let started = Instant::now();
        let mut delay = BACKOFF_MIN;
        loop {
            if self.cancel.is_cancelled() || self.tx.is_closed() {
                return None;
            }
            let disconnected = Arc::new(Notify::new());
            let forwarder = PushForwarder {
                tx: self.tx.clone(),
                disconnected: disconnected.clone(),
                counters: self.inner.counters.clone(),
                server: self.server.clone(),
                held: self.held.clone(),
                overflow: self.overflow.clone(),
                routes_lost: self.routes_lost.clone(),
            };
            match self
                .inner
                .run(connect_subscriber(&self.inner, &self.server, forwarder))
                .await
            {
                Ok(con) => match alive(&self.inner, &self.server, &self.token, "refresh").await {
                    Ok(1 | 0) => {
                        let gap = started.elapsed();
                        self.inner
                            .counters
                            .last_subscriber_outage_ms
                            .store(gap.as_millis() as u64, Ordering::Relaxed);
                        tracing::info!(server = %self.server, outage_ms = gap.as_millis() as u64, "resubscribed");
                        return Some((con, disconnected));
                    }
                    Ok(_) => {
                        self.taken_over();
                        return None;
                    }
                    Err(e) => {
                        tracing::warn!(server = %self.server, error = %e, "resubscribed but could not assert liveness; retrying");
                    }
                },
                Err(e) => {
                    tracing::warn!(server = %self.server, error = %e, "subscriber reconnect failed");
                }
            }
            let sleep = delay.mul_f64(0.5 + 0.5 * jitter_fraction());
            tokio::select! {
                _ = self.cancel.cancelled() => return None,
                _ = tokio::time::sleep(sleep) => {}
            }
            let ceiling = if self.inner.cluster() {
                CLUSTER_BACKOFF_MAX
            } else {
                BACKOFF_MAX
            };
            delay = (delay * 2).min(ceiling);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let k = RouteKey::channel("general").expect("valid");
        let f = encode_frame(&k, b"hello");
        assert_eq!(f[0] as usize, "channel:general".len());
        assert_eq!(decode_frame(&f), Some((k, Bytes::from_static(b"hello"))));
        let u = RouteKey::user("alice").expect("valid");
        assert_eq!(
            decode_frame(&encode_frame(&u, b"")),
            Some((u, Bytes::new()))
        );
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert_eq!(decode_frame(b""), None);
        assert_eq!(decode_frame(&[10, b'a']), None);
        assert_eq!(decode_frame(&[3, b'a', b':', b'b']), None);
    }
}
