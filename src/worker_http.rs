//! The HTTP side of a `fanout worker` process: `/healthz`, `/readyz` and
//! `/metrics`, so that a worker is as observable as a gateway (stored,
//! deduplicated and dead-lettered messages, retries, the backend's own
//! counters).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fanout_backend::DynBackend;
use serde_json::json;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::store::Store;

/// How long one readiness answer is reused: at most one broker and one
/// database round trip per this, however often `/readyz` is asked.
pub const READY_CACHE: Duration = Duration::from_secs(1);
/// Bound on each readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A readiness probe's answers: when, the broker's, the database's.
type Probed = (Instant, Result<(), String>, Result<(), String>);

/// What the worker's handlers share.
#[derive(Debug)]
pub struct WorkerHttp {
    backend: DynBackend,
    store: Store,
    metrics: Arc<Metrics>,
    /// The last probe: when, the broker's and the database's answer. A
    /// tokio mutex, held across the probe, so concurrent requests wait for
    /// one probe instead of each starting theirs.
    last: tokio::sync::Mutex<Option<Probed>>,
}

impl WorkerHttp {
    /// Handlers over this worker's backend, store and metrics.
    pub fn new(backend: DynBackend, store: Store, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            backend,
            store,
            metrics,
            last: tokio::sync::Mutex::new(None),
        })
    }

    /// The broker's and the database's readiness, probed at most once per
    /// [`READY_CACHE`].
    async fn probe(&self) -> (Result<(), String>, Result<(), String>) {
        let mut last = self.last.lock().await;
        if let Some((at, b, s)) = last.as_ref() {
            if at.elapsed() < READY_CACHE {
                return (b.clone(), s.clone());
            }
        }
        let (backend, store) = tokio::join!(
            tokio::time::timeout(PROBE_TIMEOUT, self.backend.health()),
            tokio::time::timeout(PROBE_TIMEOUT, self.store.ping()),
        );
        let backend = match backend {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("broker not ready: {e}")),
            Err(_) => Err("broker unreachable (no answer in time)".to_owned()),
        };
        let store = match store {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("database not ready: {e}")),
            Err(_) => Err("database unreachable (no answer in time)".to_owned()),
        };
        *last = Some((Instant::now(), backend.clone(), store.clone()));
        (backend, store)
    }
}

/// The worker's routes.
pub fn router(state: Arc<WorkerHttp>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({ "error": { "code": "not_found", "message": "no such route" } })),
            )
        })
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(w): State<Arc<WorkerHttp>>) -> Response {
    let (backend, store) = w.probe().await;
    let body = json!({
        "role": "worker",
        "backend": w.backend.capabilities().name,
        "backendReady": backend.is_ok(),
        "databaseReady": store.is_ok(),
    });
    match backend.and(store) {
        Ok(()) => (StatusCode::OK, axum::Json(body)).into_response(),
        Err(what) => {
            let err =
                json!({ "error": { "code": "unavailable", "message": what }, "status": body });
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(err)).into_response()
        }
    }
}

async fn metrics(State(w): State<Arc<WorkerHttp>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        w.metrics.render(),
    )
        .into_response()
}
