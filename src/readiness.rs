//! The readiness probe behind every process's `/readyz` (gateways and
//! workers). `/readyz` is unauthenticated, so however many requests
//! arrive, a process asks its broker and its database at most once per
//! [`PROBE_EVERY`]; requests that arrive while a probe runs wait for it
//! and share its answer.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fanout_backend::DynBackend;
use serde_json::json;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::store::Store;

/// How long one probe answers for every `/readyz` request.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe waits for the broker and for the database.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the last probe found: `Ok`, or why not, for each side.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The broker's answer.
    pub backend: Result<(), String>,
    /// The database's answer.
    pub store: Result<(), String>,
}

impl Probe {
    /// Both ready, or the first reason why not.
    pub fn ready(&self) -> Result<(), String> {
        self.backend.clone().and(self.store.clone())
    }

    /// The `/readyz` answer: `200` with `status` (plus `backendReady` and
    /// `databaseReady`), or `503` with the error and that status.
    pub fn response(&self, mut status: serde_json::Value) -> Response {
        status["backendReady"] = self.backend.is_ok().into();
        status["databaseReady"] = self.store.is_ok().into();
        match self.ready() {
            Ok(()) => (StatusCode::OK, axum::Json(status)).into_response(),
            Err(what) => {
                let err = json!({ "error": { "code": "unavailable", "message": what }, "status": status });
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(err)).into_response()
            }
        }
    }
}

/// One process's cached probe.
#[derive(Debug)]
pub struct Readiness {
    backend: DynBackend,
    store: Store,
    metrics: Arc<Metrics>,
    /// A tokio mutex, held across the probe, so that concurrent requests
    /// wait for one probe instead of each starting theirs.
    last: tokio::sync::Mutex<Option<(Instant, Probe)>>,
}

impl Readiness {
    /// A probe of `backend` and `store`, counted in `metrics`
    /// (`readiness_probes`).
    pub fn new(backend: DynBackend, store: Store, metrics: Arc<Metrics>) -> Self {
        Self {
            backend,
            store,
            metrics,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The broker's and the database's readiness, probed at most once per
    /// [`PROBE_EVERY`].
    pub async fn get(&self) -> Probe {
        let mut last = self.last.lock().await;
        if let Some((at, probe)) = last.as_ref() {
            if at.elapsed() < PROBE_EVERY {
                return probe.clone();
            }
        }
        let (backend, store) = tokio::join!(
            tokio::time::timeout(PROBE_TIMEOUT, self.backend.health()),
            tokio::time::timeout(PROBE_TIMEOUT, self.store.ping()),
        );
        self.metrics.readiness_probes.inc();
        let probe = Probe {
            backend: match backend {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("broker not ready: {e}")),
                Err(_) => Err("broker unreachable (no answer in time)".to_owned()),
            },
            store: match store {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("database not ready: {e}")),
                Err(_) => Err("database unreachable (no answer in time)".to_owned()),
            },
        };
        *last = Some((Instant::now(), probe.clone()));
        probe
    }
}
