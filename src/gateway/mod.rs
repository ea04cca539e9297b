//! The gateway: holds Socket.IO sessions, publishes what clients send to
//! the incoming side, and emits what the outgoing side routes to it.
//!
//! Parts:
//! - [`socket`]: the Socket.IO namespace: handshake, `sendMessage`, disconnect;
//! - [`delivery`]: the loop over this server's outgoing stream, and the
//!   fills, joins and re-binds it asks for;
//! - [`http`]: the REST API, health, readiness and metrics;
//! - [`sessions`]: the local sessions and where each stands in each
//!   stream; the one way entries reach them ([`Sessions::offer`]), in
//!   position order, and the sweeper;
//! - [`resume`]: a reconnecting client's `auth.resume`: checked at the
//!   handshake, replayed from the store before any live entry;
//! - [`routes`]: reference-counted bindings on the backend, and their gauge.
//!
//! Nothing here names a concrete backend: the gateway holds a
//! [`DynBackend`] chosen at the edge (`app.rs`).

pub mod delivery;
pub mod http;
pub mod resume;
pub mod routes;
pub mod sessions;
pub mod socket;

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fanout_backend::{BackendError, DynBackend, RouteKey, ServerId};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::auth::Tokens;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::OutgoingEnvelope;
use crate::store::Store;
use crate::stream::Stream;

pub use routes::Routes;
pub use sessions::Sessions;

/// Rate limiter keyed by user id.
pub type UserLimiter = DefaultKeyedRateLimiter<Arc<str>>;

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
    /// Streams whose fill is scheduled (one at a time per stream).
    fills: Mutex<HashSet<Stream>>,
    /// Fills reading the store at once.
    fill_slots: tokio::sync::Semaphore,
    /// Keys whose failed bind was retried until it held; taken by the
    /// delivery loop, which fills their streams.
    repaired: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<RouteKey>>>,
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
        let (repaired_tx, repaired) = tokio::sync::mpsc::unbounded_channel();
        let routes = Arc::new(Routes::new(
            backend.clone(),
            server_id.clone(),
            routes::RouteMetrics::of(&metrics),
            repaired_tx,
        ));
        Arc::new(Self {
            sessions: Sessions::new(
                config.limits.send_buffer,
                config.limits.max_connections_per_user,
                routes.clone(),
                metrics.clone(),
            ),
            routes,
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
            unready: Mutex::new(None),
            fills: Mutex::new(HashSet::new()),
            fill_slots: tokio::sync::Semaphore::new(delivery::FILL_CONCURRENCY),
            repaired: Mutex::new(Some(repaired)),
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

    /// Ends the sessions whose end socketioxide never signalled (see
    /// [`Sessions::spawn_sweeper`]) and forgets the rate buckets of idle
    /// users, until the gateway is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        Sessions::spawn_sweeper(self, |gw| {
            gw.trim_limiters();
            &gw.sessions
        })
    }

    /// Marks the start of shutdown.
    pub fn begin_shutdown(&self) {
        self.sessions.begin_shutdown();
    }

    fn is_shutting_down(&self) -> bool {
        self.sessions.is_shutting_down()
    }

    /// Marks a fill of `stream` scheduled; `false` if one already is.
    fn fill_scheduled(&self, stream: &Stream) -> bool {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        fills.insert(stream.clone())
    }

    /// A scheduled fill of `stream` starts: gaps found from now on schedule
    /// another.
    fn fill_done(&self, stream: &Stream) {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        fills.remove(stream);
    }

    /// The receiver of repaired keys (once).
    fn take_repaired(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<RouteKey>> {
        self.repaired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
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
