//! The HTTP side of a `fanout worker` process: `/healthz`, `/readyz` and
//! `/metrics`, so that a worker is as observable as a gateway (stored,
//! deduplicated and dead-lettered messages, retries, the backend's own
//! counters).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fanout_backend::DynBackend;
use serde_json::json;

use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::store::Store;

/// What the worker's handlers share.
#[derive(Debug)]
pub struct WorkerHttp {
    backend: DynBackend,
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

impl WorkerHttp {
    /// Handlers over this worker's backend, store and metrics.
    pub fn new(backend: DynBackend, store: Store, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            readiness: Readiness::new(backend.clone(), store, metrics.clone()),
            backend,
            metrics,
        })
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
    w.readiness.get().await.response(json!({
        "role": "worker",
        "backend": w.backend.capabilities().name,
    }))
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
