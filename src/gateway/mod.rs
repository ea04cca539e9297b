//! The gateway: holds Socket.IO sessions, publishes what clients send to
//! the incoming side, and emits what the outgoing side routes to it.
//!
//! Parts:
//! - [`socket`]: the Socket.IO namespace: handshake, `sendMessage`, disconnect;
//! - [`delivery`]: the loop over this server's outgoing stream;
//! - [`http`]: the REST API, health, readiness and metrics;
//! - [`sessions`]: the local sessions and their duplicate windows;
//! - [`routes`]: reference-counted bindings on the backend.
//!
//! Nothing here names a concrete backend: the gateway holds a
//! [`DynBackend`] chosen at the edge (`app.rs`).

pub mod delivery;
pub mod http;
pub mod routes;
pub mod sessions;
pub mod socket;

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanout_backend::{BackendError, DynBackend, RouteKey, ServerId};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use socketioxide::extract::SocketRef;
use socketioxide::SocketError;

use crate::auth::Tokens;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::OutgoingEnvelope;
use crate::store::Store;

pub use routes::Routes;
pub use sessions::Sessions;

/// Rate limiter keyed by user id.
pub type UserLimiter = DefaultKeyedRateLimiter<Arc<str>>;

/// How often a slow client's disconnect is retried while its buffer is full.
const CLOSE_RETRY_EVERY: Duration = Duration::from_millis(50);
/// How long it is retried. Engine.IO's heartbeat closes a client that reads
/// nothing at all at its next ping (every 25 s), so this need not be longer.
const CLOSE_RETRY_FOR: Duration = Duration::from_secs(60);

/// Channel creations written and announced at once per gateway. One: two
/// at once measured worse for chat than one (they contend with the
/// workers' inserts for the database and its pool, and with the delivery
/// loop for the CPU), while one creation of 1,000 members takes about
/// 20 ms in a debug build, so a legitimate creation hardly waits.
const FAN_OUT_CONCURRENCY: usize = 1;

/// Everything a gateway's handlers share.
#[derive(Debug)]
pub struct Gateway {
    /// This gateway's id on the backend.
    pub server_id: ServerId,
    /// The broker.
    pub backend: DynBackend,
    /// The database (memberships, history, catch-up).
    pub store: Store,
    /// Token verification.
    pub tokens: Tokens,
    /// The whole configuration.
    pub config: Config,
    /// Exported figures.
    pub metrics: Arc<Metrics>,
    /// Local sessions.
    pub sessions: Sessions,
    /// Bound keys.
    pub routes: Arc<Routes>,
    /// `sendMessage` rate of each user, all connections here together.
    pub user_sends: Arc<UserLimiter>,
    /// HTTP API rate of each user.
    pub user_api: UserLimiter,
    /// Membership changes (one per member) of each user.
    pub user_members: UserLimiter,
    /// Socket.IO handshakes of each user.
    pub user_handshakes: UserLimiter,
    /// Channel creations fanning out at once on this gateway: a flood of
    /// them waits here instead of crowding out chat delivery.
    pub(crate) fan_outs: tokio::sync::Semaphore,
    /// The last `/readyz` probe, shared by every request within a second.
    pub(crate) readiness: crate::readiness::Readiness,
    /// Acks already given, by `(sender, clientMsgId)`: `(id, createdAt)`.
    retries: Mutex<RetryCache>,
    /// Set when shutdown starts: sessions that end then leave their keys to
    /// the bulk `deregister_server`.
    shutting_down: AtomicBool,
    /// Why this gateway can no longer deliver (its registration on the
    /// backend ended: the server id was taken by another process), for
    /// `/readyz`. Never cleared: a restart is the way back.
    unready: Mutex<Option<String>>,
}

impl Gateway {
    /// A gateway; call [`delivery::spawn`] and mount [`http::router`] to run it.
    pub fn new(
        server_id: ServerId,
        backend: DynBackend,
        store: Store,
        tokens: Tokens,
        config: Config,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            routes: Arc::new(Routes::new(backend.clone(), server_id.clone())),
            sessions: Sessions::new(
                config.gateway.dedup_window,
                config.limits.send_buffer,
                config.limits.max_connections_per_user,
            ),
            user_sends: Arc::new(RateLimiter::keyed(quota(
                config.limits.user_rate(),
                config.limits.user_burst(),
            ))),
            user_api: RateLimiter::keyed(quota(
                config.limits.api_requests_per_second,
                config.limits.api_burst,
            )),
            user_members: RateLimiter::keyed(quota(
                config.limits.membership_changes_per_second,
                config.limits.membership_burst,
            )),
            user_handshakes: RateLimiter::keyed(quota(
                config.limits.handshakes_per_second,
                config.limits.handshake_burst,
            )),
            fan_outs: tokio::sync::Semaphore::new(FAN_OUT_CONCURRENCY),
            readiness: crate::readiness::Readiness::new(
                backend.clone(),
                store.clone(),
                metrics.clone(),
            ),
            retries: Mutex::new(RetryCache::new(config.gateway.retry_cache)),
            shutting_down: AtomicBool::new(false),
            unready: Mutex::new(None),
            server_id,
            backend,
            store,
            tokens,
            config,
            metrics,
        })
    }

    /// Publishes a control or message envelope to a route key.
    pub async fn publish(
        &self,
        key: &RouteKey,
        env: &OutgoingEnvelope,
    ) -> Result<(), BackendError> {
        let payload = serde_json::to_vec(env).map_err(|e| BackendError::invalid("", e))?;
        self.backend
            .publish_outgoing(key, Bytes::from(payload))
            .await?;
        Ok(())
    }

    /// Counts what an emit came to and disconnects the sessions it found
    /// closed or cut off as slow clients.
    pub(crate) fn account(&self, count: sessions::EmitCount, close: Vec<SocketRef>) {
        self.metrics.deliveries.inc_by(count.emitted);
        self.metrics.duplicates_dropped.inc_by(count.duplicates);
        self.metrics.slow_client_drops.inc_by(count.dropped);
        self.metrics.slow_client_disconnects.inc_by(count.cut_off);
        if count.cut_off > 0 {
            tracing::warn!(
                sessions = count.cut_off,
                "slow clients: send buffer full; disconnecting them"
            );
        }
        for s in close {
            disconnect(s);
        }
    }

    /// Cuts a session off as a slow client because `what` did not fit in
    /// its send buffer.
    pub(crate) fn cut_off(&self, sid: socketioxide::socket::Sid, what: &str) {
        self.metrics.slow_client_drops.inc();
        if let Some(s) = self.sessions.cut_off(sid) {
            self.metrics.slow_client_disconnects.inc();
            tracing::warn!(%sid, "slow client: no room for {what}; disconnecting it");
            disconnect(s);
        }
    }

    /// Forgets the rate-limiter state of users whose buckets are full again
    /// (indistinguishable from a user never seen), so memory follows the
    /// active users rather than every user ever seen.
    pub(crate) fn trim_limiters(&self) {
        self.user_sends.retain_recent();
        self.user_sends.shrink_to_fit();
        self.user_api.retain_recent();
        self.user_api.shrink_to_fit();
        self.user_members.retain_recent();
        self.user_members.shrink_to_fit();
        self.user_handshakes.retain_recent();
        self.user_handshakes.shrink_to_fit();
    }

    /// Marks the start of shutdown.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Takes this gateway out of readiness for good, saying why.
    pub fn set_unready(&self, reason: String) {
        *self.unready.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// Why this gateway is out of readiness for good, if it is.
    pub fn unready_reason(&self) -> Option<String> {
        self.unready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn cached_ack(&self, sender: &str, client_msg_id: &str) -> Option<(String, i64)> {
        let cache = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(&(sender.to_owned(), client_msg_id.to_owned()))
            .cloned()
    }

    fn remember_ack(&self, sender: &str, client_msg_id: &str, id: &str, created_at: i64) {
        let mut cache = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(
            (sender.to_owned(), client_msg_id.to_owned()),
            (id.to_owned(), created_at),
        );
    }
}

/// A quota of `per_second` with a burst of `burst` (0 counts as 1; the
/// configuration refuses 0 where it matters).
pub(crate) fn quota(per_second: u32, burst: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

/// Disconnects a session. socketioxide 0.18 refuses to disconnect a socket
/// whose buffer is full (the disconnect packet needs a slot, and nothing
/// else closes it from outside), so this retries until a slot frees; a
/// client that reads nothing at all is closed by Engine.IO's heartbeat
/// instead, whose ping then finds the buffer full.
fn disconnect(s: SocketRef) {
    if !matches!(
        s.clone().disconnect(),
        Err(SocketError::InternalChannelFull)
    ) {
        return;
    }
    tokio::spawn(async move {
        let deadline = Instant::now() + CLOSE_RETRY_FOR;
        while s.connected() && Instant::now() < deadline {
            tokio::time::sleep(CLOSE_RETRY_EVERY).await;
            if !matches!(
                s.clone().disconnect(),
                Err(SocketError::InternalChannelFull)
            ) {
                return;
            }
        }
    });
}

/// A map that forgets its oldest entries beyond a capacity. Hand-written:
/// insertion-order eviction is all it needs, and it is a dozen lines.
#[derive(Debug)]
struct RetryCache {
    map: HashMap<(String, String), (String, i64)>,
    order: VecDeque<(String, String)>,
    capacity: usize,
}

impl RetryCache {
    fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, k: &(String, String)) -> Option<&(String, i64)> {
        self.map.get(k)
    }

    fn insert(&mut self, k: (String, String), v: (String, i64)) {
        if self.capacity == 0 {
            return;
        }
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}
