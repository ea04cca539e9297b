//! The HTTP side of a gateway: the REST API under `/api`, `/healthz`,
//! `/readyz`, `/metrics`, and the Socket.IO endpoint at `/socket.io/`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use fanout_backend::{is_valid_id, RouteKey};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Gateway;
use crate::protocol::{now_ms, OutgoingEnvelope};
use crate::store::StoreError;

/// Default and largest history page.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 200;
/// Longest channel name, in bytes.
const MAX_NAME_BYTES: usize = 200;
/// Join notices of one channel creation published at once.
const ANNOUNCE_CONCURRENCY: usize = 16;

type AppState = Arc<Gateway>;

/// Every HTTP error: `{ "error": { "code", "message" } }` with a status.
/// Internal causes are logged, never sent.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl AppError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_payload", message)
    }
    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn unavailable(what: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "{what}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{what}; retry later"),
        )
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::new(StatusCode::CONFLICT, "conflict", "already exists"),
            e if e.is_temporary() => Self::unavailable("database unavailable", &e),
            e => {
                tracing::error!(error = %e, "database error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for AppError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", r.body_text())
        } else {
            Self::bad(r.body_text())
        }
    }
}

/// `axum::Json` whose rejections are [`AppError`]s.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
struct ApiJson<T>(T);

/// The caller, from `Authorization: Bearer <token>`: every `/api` handler
/// takes it, so no route runs for an unauthenticated or over-rate caller,
/// and the caller's id comes from the token, never from the request.
#[derive(Debug)]
struct Caller(String);

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, gw: &AppState) -> Result<Self, Self::Rejection> {
        let unauthorized = || {
            AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid bearer token",
            )
        };
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(unauthorized)?;
        let user = gw.tokens.verify(token.trim()).map_err(|_| unauthorized())?;
        let key: Arc<str> = Arc::from(user.as_str());
        if gw.user_api.check_key(&key).is_err() {
            gw.metrics
                .rate_limited
                .get_or_create(&vec![("scope", "api")])
                .inc();
            return Err(AppError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests; slow down and retry",
            ));
        }
        Ok(Caller(user))
    }
}

/// The routes, with the Socket.IO layer and the body limit.
pub fn router(gw: Arc<Gateway>, socketio: socketioxide::layer::SocketIoLayer) -> Router {
    let body_limit = gw.config.limits.max_http_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/channels", post(create_channel))
        .route("/api/channels/{id}/members", post(add_member))
        .route("/api/channels/{id}/members/{user}", delete(remove_member))
        .route("/api/channels/{id}/messages", get(channel_history))
        .route(
            "/api/conversations/{user}/messages",
            get(conversation_history),
        )
        .fallback(|| async { AppError::not_found("no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(gw)
        .layer(socketio)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(gw): State<AppState>) -> Response {
    if let Some(reason) = gw.unready_reason() {
        let err = json!({
            "error": { "code": "unavailable", "message": reason },
            "status": { "serverId": gw.server_id.as_str() },
        });
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(err)).into_response();
    }
    gw.readiness.get().await.response(json!({
        "backend": gw.backend.capabilities().name,
        "serverId": gw.server_id.as_str(),
    }))
}

/// Takes `changes` membership changes from `user`'s bucket
/// (`limits.membership_changes_per_second`), or refuses with `429`.
fn check_membership_rate(gw: &Gateway, user: &str, changes: usize) -> Result<(), AppError> {
    let n = NonZeroU32::new(u32::try_from(changes).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
    let key: Arc<str> = Arc::from(user);
    // More than the burst at once cannot happen within the limits the
    // configuration enforces; it is refused like any other excess.
    if matches!(gw.user_members.check_key_n(&key, n), Ok(Ok(()))) {
        return Ok(());
    }
    gw.metrics
        .rate_limited
        .get_or_create(&vec![("scope", "membership")])
        .inc();
    Err(AppError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many membership changes; slow down and retry",
    ))
}

async fn metrics(State(gw): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        gw.metrics.render(),
    )
        .into_response()
}

fn check_id(what: &str, id: &str) -> Result<(), AppError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(AppError::bad(format!(
            "{what} must be 1 to 64 characters of [A-Za-z0-9_-]"
        )))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewChannel {
    id: Option<String>,
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

async fn create_channel(
    State(gw): State<AppState>,
    Caller(caller): Caller,
    request: axum::extract::Request,
) -> Result<Response, AppError> {
    // The creator's own membership is taken before the body is read, so a
    // user over the membership rate costs no parsing of up to
    // `max_initial_members` ids; the other members are taken below.
    check_membership_rate(&gw, &caller, 1)?;
    let ApiJson(body) = ApiJson::<NewChannel>::from_request(request, &gw).await?;
    let id = match body.id {
        Some(id) => {
            check_id("id", &id)?;
            id
        }
        None => uuid::Uuid::now_v7().simple().to_string(),
    };
    if body.name.is_empty() || body.name.len() > MAX_NAME_BYTES || body.name.contains('\0') {
        return Err(AppError::bad(format!(
            "name must be 1 to {MAX_NAME_BYTES} bytes of text"
        )));
    }
    if body.members.len() > gw.config.limits.max_initial_members {
        return Err(AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "at most {} members at creation; add more one by one",
                gw.config.limits.max_initial_members
            ),
        ));
    }
    for m in &body.members {
        check_id("every member", m)?;
    }
    let mut members = body.members;
    members.push(caller.clone());
    members.sort_unstable();
    members.dedup();
    if members.len() > 1 {
        check_membership_rate(&gw, &caller, members.len() - 1)?;
    }
    // Only closed if the gateway is dropped, which cannot happen while a
    // handler holds it.
    let _slot = gw
        .fan_outs
        .acquire()
        .await
        .map_err(|e| AppError::unavailable("gateway shutting down", &e))?;
    let entries = gw
        .store
        .create_channel(&id, &body.name, &caller, &members, now_ms())
        .await?;
    // All enqueued before the 201, so each member's gateways open the
    // channel before any message sent after it.
    if let Err(e) = publish_entries(&gw, entries).await {
        // The channel and its entries are stored; the members' sessions
        // read them at their next gap or on reconnect.
        tracing::warn!(channel = %id, error = %e, "membership entries not published");
    }
    Ok((StatusCode::CREATED, axum::Json(json!({ "id": id }))).into_response())
}

/// Publishes stored entries to their streams' route keys: one key's
/// entries one after another in position order, keys concurrently.
async fn publish_entries(
    gw: &Gateway,
    entries: Vec<crate::stream::Entry>,
) -> Result<(), fanout_backend::BackendError> {
    // A creation's entries touch one key per member: a map, not a search
    // of the keys so far (2,000 entries of a 1,000-member creation were a
    // million comparisons on the runtime's thread, stalling its deliveries).
    let mut per_key: HashMap<RouteKey, Vec<crate::stream::Entry>> = HashMap::new();
    for e in entries {
        per_key.entry(e.stream.route_key()).or_default().push(e);
    }
    let results: Vec<Result<(), fanout_backend::BackendError>> = futures::stream::iter(per_key)
        .map(|(key, list)| async move {
            for e in list {
                gw.publish(&key, &OutgoingEnvelope::Entry(e)).await?;
            }
            Ok(())
        })
        .buffer_unordered(ANNOUNCE_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NewMember {
    user_id: String,
}

async fn add_member(
    State(gw): State<AppState>,
    Caller(caller): Caller,
    Path(channel): Path<String>,
    ApiJson(body): ApiJson<NewMember>,
) -> Result<StatusCode, AppError> {
    check_id("channel id", &channel)?;
    check_id("userId", &body.user_id)?;
    check_membership_rate(&gw, &caller, 1)?;
    require_channel(&gw, &channel).await?;
    if gw.store.member_since(&channel, &caller).await?.is_none() {
        return Err(AppError::forbidden("only members can add members"));
    }
    let (_, entries) = gw
        .store
        .add_member(&channel, &body.user_id, &caller, now_ms())
        .await?;
    // Published on every call, also when already a member (the entries
    // that added them), so that a retry after a 503 completes what the
    // first call began.
    publish_entries(&gw, entries)
        .await
        .map_err(|e| AppError::unavailable("cannot notify the member's gateways", &e))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member(
    State(gw): State<AppState>,
    Caller(caller): Caller,
    Path((channel, user)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    check_id("channel id", &channel)?;
    check_id("user id", &user)?;
    check_membership_rate(&gw, &caller, 1)?;
    let ch = require_channel(&gw, &channel).await?;
    let allowed = caller == ch.creator_id
        || (caller == user && gw.store.member_since(&channel, &caller).await?.is_some());
    if !allowed {
        return Err(AppError::forbidden(
            "only the creator removes others; members may remove themselves",
        ));
    }
    let Some(entries) = gw
        .store
        .remove_member(&channel, &user, &caller, now_ms())
        .await?
    else {
        return Ok(StatusCode::NO_CONTENT);
    };
    // The removal is enqueued for the channel's and the user's gateways
    // before the 204, so it takes effect there before any message sent
    // after the 204; were it lost, the next entry of the channel shows the
    // gap, and the sessions read the removal from the store at its
    // position (they never emit past it).
    publish_entries(&gw, entries)
        .await
        .map_err(|e| AppError::unavailable("cannot notify the member's gateways", &e))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn require_channel(gw: &Gateway, channel: &str) -> Result<crate::store::Channel, AppError> {
    gw.store
        .channel(channel)
        .await?
        .ok_or_else(|| AppError::not_found(format!("no channel {channel}")))
}

#[derive(Debug, Deserialize)]
struct Page {
    before: Option<String>,
    limit: Option<String>,
}

impl Page {
    fn parse(self) -> Result<(Option<String>, u32), AppError> {
        let limit = match self.limit {
            None => DEFAULT_LIMIT,
            Some(s) => match s.parse::<u32>() {
                Ok(0) | Err(_) => {
                    return Err(AppError::bad("limit must be a whole number from 1 to 200"))
                }
                Ok(n) => n.min(MAX_LIMIT),
            },
        };
        if let Some(b) = &self.before {
            if uuid::Uuid::try_parse(b).is_err() {
                return Err(AppError::bad("before must be a message id"));
            }
        }
        Ok((self.before.map(|b| b.to_ascii_lowercase()), limit))
    }
}

/// One page of history: `read` gets `limit + 1` entries, newest first.
fn history_page(mut entries: Vec<crate::stream::Entry>, limit: u32) -> Response {
    let more = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    let next_before = if more {
        entries.last().and_then(|e| match &e.body {
            crate::stream::Body::Message(m) => Some(m.id.clone()),
            crate::stream::Body::Membership(_) => None,
        })
    } else {
        None
    };
    let items: Vec<Value> = entries.iter().map(|e| e.to_event().1).collect();
    axum::Json(json!({ "messages": items, "nextBefore": next_before })).into_response()
}

async fn channel_history(
    State(gw): State<AppState>,
    Caller(caller): Caller,
    Path(channel): Path<String>,
    Query(page): Query<Page>,
) -> Result<Response, AppError> {
    check_id("channel id", &channel)?;
    require_channel(&gw, &channel).await?;
    if gw.store.member_since(&channel, &caller).await?.is_none() {
        return Err(AppError::forbidden(
            "only members can read a channel's history",
        ));
    }
    let (before, limit) = page.parse()?;
    let entries = gw
        .store
        .channel_history(&channel, before.as_deref(), limit + 1)
        .await?;
    Ok(history_page(entries, limit))
}

async fn conversation_history(
    State(gw): State<AppState>,
    Caller(caller): Caller,
    Path(user): Path<String>,
    Query(page): Query<Page>,
) -> Result<Response, AppError> {
    check_id("user id", &user)?;
    let (before, limit) = page.parse()?;
    let entries = gw
        .store
        .personal_history(&caller, &user, before.as_deref(), limit + 1)
        .await?;
    Ok(history_page(entries, limit))
}
