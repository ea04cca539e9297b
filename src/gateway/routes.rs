//! Reference-counted route keys: the gateway binds a key on the backend
//! when its first local session needs it and unbinds it when the last one
//! leaves, so a second tab binds nothing new and backends stay simple.
//!
//! A key sessions hold is never left unbound: a bind that fails after a
//! route loss is retried in the background until it holds (each failure
//! and retry counted), and the key is then reported on `repaired` so the
//! gateway fills what its sessions missed meanwhile. A second tab arriving
//! meanwhile finds the key held and counts on the same repair.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout_backend::{BackendError, DynBackend, RouteKey, ServerId};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

/// Binds in flight at once when re-binding everything.
const REBIND_CONCURRENCY: usize = 64;
/// The first retry of a failed bind waits this long, doubling each time...
const RETRY_START: Duration = Duration::from_millis(100);
/// ...up to this.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// One key's state. The async mutex serialises bind and unbind of one key:
/// a session that connects while the key's bind is in flight waits for it,
/// so it never sees `connect` before its routes exist.
#[derive(Debug, Default)]
struct State {
    /// Sessions holding the key.
    count: usize,
    /// Whether the backend holds the binding (false while a failed bind is
    /// being retried).
    bound: bool,
}

type Slot = Arc<tokio::sync::Mutex<State>>;

/// The figures [`Routes`] keeps (fresh metric handles it then owns).
#[derive(Debug, Clone, Default)]
pub struct RouteMetrics {
    /// Keys held by sessions (`bound_keys`).
    pub bound: Gauge,
    /// Binds the backend refused.
    pub bind_failures: Counter,
    /// Binds tried again after a failure.
    pub bind_retries: Counter,
}

impl RouteMetrics {
    /// The handles of a process's metrics.
    pub fn of(m: &crate::metrics::Metrics) -> Self {
        Self {
            bound: m.bound_keys.clone(),
            bind_failures: m.bind_failures.clone(),
            bind_retries: m.bind_retries.clone(),
        }
    }
}

/// The keys this gateway holds, with how many sessions hold each.
#[derive(Debug)]
pub struct Routes {
    backend: DynBackend,
    server: ServerId,
    slots: Mutex<HashMap<RouteKey, Slot>>,
    /// Moved by the one call that takes or gives back a key's first
    /// reference, under that key's lock, so it never needs a caller to
    /// refresh it.
    metrics: RouteMetrics,
    /// Keys whose failed bind was retried until it held.
    repaired: mpsc::UnboundedSender<RouteKey>,
}

/// The wait before retry `attempt` of a failed bind (0 is the first).
pub fn retry_wait(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    RETRY_START.saturating_mul(factor).min(RETRY_MAX)
}

impl Routes {
    /// An empty table for `server`; keys whose bind had to be retried are
    /// sent on `repaired` once they hold.
    pub fn new(
        backend: DynBackend,
        server: ServerId,
        metrics: RouteMetrics,
        repaired: mpsc::UnboundedSender<RouteKey>,
    ) -> Self {
        Self {
            backend,
            server,
            slots: Mutex::new(HashMap::new()),
            metrics,
            repaired,
        }
    }

    fn slot(&self, key: &RouteKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    async fn bind(&self, key: &RouteKey) -> Result<(), BackendError> {
        let r = self.backend.bind(&self.server, key).await;
        if r.is_err() {
            self.metrics.bind_failures.inc();
        }
        r
    }

    /// Takes one reference to `key`, binding it if it is the first.
    /// Returns whether this call bound it. A first reference whose bind
    /// fails is not taken (the caller refuses or retries); a later one is
    /// taken whether the key's binding is being repaired or not.
    pub async fn acquire(&self, key: &RouteKey) -> Result<bool, BackendError> {
        let slot = self.slot(key);
        let mut state = slot.lock().await;
        if state.count > 0 {
            state.count += 1;
            return Ok(false);
        }
        self.bind(key).await?;
        state.bound = true;
        state.count = 1;
        self.metrics.bound.inc();
        Ok(true)
    }

    /// [`Routes::acquire`], retried with backoff until it holds or
    /// `wanted` says the reference is no longer wanted (`false` then).
    pub async fn acquire_until(&self, key: &RouteKey, wanted: impl Fn() -> bool) -> bool {
        let mut attempt = 0;
        loop {
            match self.acquire(key).await {
                Ok(_) => return true,
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, retry_in = ?retry_wait(attempt), "cannot bind; retrying until it holds");
                }
            }
            tokio::time::sleep(retry_wait(attempt)).await;
            attempt = attempt.saturating_add(1);
            if !wanted() {
                return false;
            }
            self.metrics.bind_retries.inc();
        }
    }

    /// Gives back one reference to `key`, unbinding it if it was the last.
    /// Returns whether this call unbound it.
    pub async fn release(&self, key: &RouteKey) -> Result<bool, BackendError> {
        let slot = self.slot(key);
        let mut state = slot.lock().await;
        if state.count == 0 {
            return Ok(false);
        }
        state.count -= 1;
        if state.count > 0 {
            return Ok(false);
        }
        // No session holds it any more, whether the unbind below succeeds
        // or not (a failed one leaves the route until deregistration).
        self.metrics.bound.dec();
        state.bound = false;
        let result = self.backend.unbind(&self.server, key).await;
        // Forget the slot unless someone else already holds a clone of it
        // (they will bind it again under the same lock); this keeps the
        // table as small as the set of keys in use.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots
            .get(key)
            .is_some_and(|s| Arc::ptr_eq(s, &slot) && Arc::strong_count(s) == 2)
        {
            slots.remove(key);
        }
        drop(slots);
        result.map(|()| true)
    }

    /// Binds every held key again, after the backend lost them, many at a
    /// time (a reconnect of thousands of users must take seconds, not
    /// minutes). A key that fails is retried in the background until it
    /// holds (see the module doc). Returns how many keys were bound and how
    /// many are being retried.
    pub async fn rebind_all(self: &Arc<Self>) -> (usize, usize) {
        let held: Vec<(RouteKey, Slot)> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
        };
        let results: Vec<Option<(RouteKey, bool)>> = futures::stream::iter(held)
            .map(|(key, slot)| async move {
                // Held across the bind, so a concurrent release of this key
                // waits and unbinds after us, never before.
                let mut state = slot.lock().await;
                if state.count == 0 {
                    return None;
                }
                state.bound = self.bind(&key).await.is_ok();
                Some((key, state.bound))
            })
            .buffer_unordered(REBIND_CONCURRENCY)
            .collect()
            .await;
        let (mut bound, mut retrying) = (0, 0);
        for (key, ok) in results.into_iter().flatten() {
            if ok {
                bound += 1;
            } else {
                retrying += 1;
                let routes = self.clone();
                tokio::spawn(async move { routes.repair(key).await });
            }
        }
        (bound, retrying)
    }

    /// Retries the bind of a held key until it holds or nobody holds the
    /// key any more; then reports it on `repaired`.
    async fn repair(&self, key: RouteKey) {
        let mut attempt = 0;
        loop {
            tokio::time::sleep(retry_wait(attempt)).await;
            attempt = attempt.saturating_add(1);
            let slot = self.slot(&key);
            let mut state = slot.lock().await;
            if state.count == 0 || state.bound {
                return;
            }
            self.metrics.bind_retries.inc();
            match self.bind(&key).await {
                Ok(()) => {
                    state.bound = true;
                    drop(state);
                    tracing::info!(key = %key, attempts = attempt, "bind repaired");
                    // Fails only once the gateway is gone.
                    let _ = self.repaired.send(key);
                    return;
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, attempt, "bind still refused; retrying until it holds")
                }
            }
        }
    }

    /// How many keys are held now.
    pub fn bound(&self) -> usize {
        usize::try_from(self.metrics.bound.get()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fanout_backend::RouteOutcome;

    fn table(backend: &DynBackend, server: &ServerId, gauge: &Gauge) -> Routes {
        let metrics = RouteMetrics {
            bound: gauge.clone(),
            ..RouteMetrics::default()
        };
        let (tx, _) = mpsc::unbounded_channel();
        Routes::new(backend.clone(), server.clone(), metrics, tx)
    }

    #[tokio::test]
    async fn second_reference_binds_nothing_and_last_release_unbinds() {
        let backend: DynBackend = Arc::new(fanout_memory::MemoryBackend::default());
        let server = ServerId::new("gw").expect("valid");
        let _stream = backend.register_server(&server).await.expect("register");
        let gauge = Gauge::default();
        let routes = table(&backend, &server, &gauge);
        let key = RouteKey::user("alice").expect("valid");
        assert!(routes.acquire(&key).await.expect("bind"));
        assert!(!routes.acquire(&key).await.expect("second tab"));
        assert_eq!(gauge.get(), 1, "the gauge follows the bound keys");
        assert!(!routes.release(&key).await.expect("first tab closes"));
        assert_eq!(routes.bound(), 1);
        let out = backend
            .publish_outgoing(&key, Bytes::from_static(b"x"))
            .await
            .expect("publish");
        assert!(
            matches!(out, RouteOutcome::Routed { .. }),
            "still bound for the other tab"
        );
        assert!(routes.release(&key).await.expect("last tab closes"));
        assert_eq!(gauge.get(), 0);
        let out = backend
            .publish_outgoing(&key, Bytes::from_static(b"x"))
            .await
            .expect("publish");
        assert_eq!(out, RouteOutcome::Unroutable);
        assert!(
            routes.slots.lock().expect("lock").is_empty(),
            "no slot kept for an unused key"
        );
        assert!(!routes
            .release(&key)
            .await
            .expect("extra release is harmless"));
    }

    /// The gauge moves with what sessions hold, not with what the broker
    /// said: a refused bind holds nothing and counts nothing (the session
    /// is refused), and a release on a shut-down backend counts the key as
    /// given back whatever the unbind answers, since no session holds it.
    #[tokio::test]
    async fn refused_binds_and_releases_after_shutdown_keep_the_gauge_true() {
        let backend: DynBackend = Arc::new(fanout_memory::MemoryBackend::default());
        let server = ServerId::new("gw").expect("valid");
        let gauge = Gauge::default();
        let routes = table(&backend, &server, &gauge);
        let key = RouteKey::user("alice").expect("valid");
        let refused = routes.acquire(&key).await;
        assert!(refused.is_err(), "an unregistered server cannot bind");
        assert_eq!(gauge.get(), 0, "a refused bind counts nothing");
        assert!(!routes.release(&key).await.expect("nothing was held"));
        assert_eq!(gauge.get(), 0);

        let _stream = backend.register_server(&server).await.expect("register");
        assert!(routes.acquire(&key).await.expect("bind"));
        assert_eq!(gauge.get(), 1);
        backend.shutdown().await.expect("shutdown");
        // A broker backend refuses the unbind now (Redis: Closed); memory's
        // unbind is a no-op that cannot fail. Either way the key is given back.
        let _unbound = routes.release(&key).await;
        assert_eq!(gauge.get(), 0, "no session holds the key any more");
        assert!(
            routes.acquire(&key).await.is_err(),
            "and a bind on a closed backend counts nothing either"
        );
        assert_eq!(gauge.get(), 0);
    }
}
