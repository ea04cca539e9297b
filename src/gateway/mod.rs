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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fanout_backend::{BackendError, DynBackend, RouteKey, ServerId};

use crate::auth::Tokens;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::OutgoingEnvelope;
use crate::store::Store;

pub use routes::Routes;
pub use sessions::Sessions;

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
    pub routes: Routes,
    /// Acks already given, by `(sender, clientMsgId)`: `(id, createdAt)`.
    retries: Mutex<RetryCache>,
    /// Set when shutdown starts: sessions that end then leave their keys to
    /// the bulk `deregister_server`.
    shutting_down: AtomicBool,
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
            routes: Routes::new(backend.clone(), server_id.clone()),
            sessions: Sessions::new(config.gateway.dedup_window),
            retries: Mutex::new(RetryCache::new(config.gateway.retry_cache)),
            shutting_down: AtomicBool::new(false),
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
        let payload = serde_json::to_vec(env).map_err(|e| BackendError::Invalid(e.to_string()))?;
        self.backend
            .publish_outgoing(key, Bytes::from(payload))
            .await?;
        Ok(())
    }

    /// Marks the start of shutdown.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
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
