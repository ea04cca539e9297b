//! Reference-counted route keys: the gateway binds a key on the backend
//! when its first local session needs it and unbinds it when the last one
//! leaves, so a second tab binds nothing new and backends stay simple.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fanout_backend::{BackendError, DynBackend, RouteKey, ServerId};
use futures::StreamExt;
use prometheus_client::metrics::gauge::Gauge;

/// Binds in flight at once when re-binding everything.
const REBIND_CONCURRENCY: usize = 64;

/// One key's count. The async mutex serialises bind and unbind of one key:
/// a session that connects while the key's bind is in flight waits for it,
/// so it never sees `connect` before its routes exist.
type Slot = Arc<tokio::sync::Mutex<usize>>;

/// The keys this gateway holds, with how many sessions hold each.
#[derive(Debug)]
pub struct Routes {
    backend: DynBackend,
    server: ServerId,
    slots: Mutex<HashMap<RouteKey, Slot>>,
    /// How many keys are bound (`bound_keys`): moved by the one call that
    /// binds or unbinds a key, under that key's lock, so it never needs a
    /// caller to refresh it.
    bound: Gauge,
}

impl Routes {
    /// An empty table for `server`, counting its bound keys in `bound`, a
    /// fresh gauge it then owns (nothing else sets it).
    pub fn new(backend: DynBackend, server: ServerId, bound: Gauge) -> Self {
        Self {
            backend,
            server,
            slots: Mutex::new(HashMap::new()),
            bound,
        }
    }

    fn slot(&self, key: &RouteKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// Takes one reference to `key`, binding it if it is the first.
    /// Returns whether this call bound it.
    pub async fn acquire(&self, key: &RouteKey) -> Result<bool, BackendError> {
        let slot = self.slot(key);
        let mut count = slot.lock().await;
        let bound = *count == 0;
        if bound {
            self.backend.bind(&self.server, key).await?;
            self.bound.inc();
        }
        *count += 1;
        Ok(bound)
    }

    /// Gives back one reference to `key`, unbinding it if it was the last.
    /// Returns whether this call unbound it.
    pub async fn release(&self, key: &RouteKey) -> Result<bool, BackendError> {
        let slot = self.slot(key);
        let mut count = slot.lock().await;
        if *count == 0 {
            return Ok(false);
        }
        *count -= 1;
        if *count > 0 {
            return Ok(false);
        }
        // No session holds it any more, whether the unbind below succeeds
        // or not (a failed one leaves the route until deregistration).
        self.bound.dec();
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
    /// minutes). Returns how many keys were bound and the first error.
    pub async fn rebind_all(&self) -> (usize, Option<BackendError>) {
        let held: Vec<(RouteKey, Slot)> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
        };
        let results: Vec<Option<Result<(), BackendError>>> = futures::stream::iter(held)
            .map(|(key, slot)| async move {
                // Held across the bind, so a concurrent release of this key
                // waits and unbinds after us, never before.
                let count = slot.lock().await;
                if *count == 0 {
                    return None;
                }
                Some(self.backend.bind(&self.server, &key).await)
            })
            .buffer_unordered(REBIND_CONCURRENCY)
            .collect()
            .await;
        let mut bound = 0;
        let mut first_error = None;
        for r in results.into_iter().flatten() {
            match r {
                Ok(()) => bound += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        (bound, first_error)
    }

    /// How many keys are bound now.
    pub fn bound(&self) -> usize {
        usize::try_from(self.bound.get()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fanout_backend::RouteOutcome;

    #[tokio::test]
    async fn second_reference_binds_nothing_and_last_release_unbinds() {
        let backend: DynBackend = Arc::new(fanout_memory::MemoryBackend::default());
        let server = ServerId::new("gw").expect("valid");
        let _stream = backend.register_server(&server).await.expect("register");
        let gauge = Gauge::default();
        let routes = Routes::new(backend.clone(), server, gauge.clone());
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
        let routes = Routes::new(backend.clone(), server.clone(), gauge.clone());
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
