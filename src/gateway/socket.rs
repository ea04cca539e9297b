//! The Socket.IO namespace `/`: the handshake, `sendMessage`, disconnect.
//!
//! Order of a session's sends: socketioxide runs each event handler in its
//! own task, so two sends of one session could reach the broker in either
//! order. The [`Slot`] extractor runs inline, in wire order, before that
//! task is spawned: it applies the rate limits, reserves the send's place
//! in the session's queue, and one task per session works the queue in
//! order.
//!
//! Identity: the user is the token's `sub`, fixed at the handshake; no
//! field of any payload can change who a send is from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout_backend::{IncomingEvent, RouteKey};
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, RateLimiter};
use serde_json::{json, Value};
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::{ConnectHandler, FromMessageParts};
use socketioxide::socket::{Sid, Socket};
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::{mpsc, oneshot};

use super::{Gateway, UserLimiter};
use crate::protocol::{
    now_ms, parse_send, ErrorCode, IncomingEnvelope, Message, ProtocolError, Target, SEND_MESSAGE,
};

/// Bindings issued at once while a session connects.
const BIND_CONCURRENCY: usize = 32;

/// Why a handshake was refused; the text is what the client's
/// `connect_error` carries.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Bad or missing token.
    #[error("unauthorized")]
    Unauthorized,
    /// The database or broker failed; the client may retry.
    #[error("unavailable")]
    Unavailable,
    /// The user already has `limits.max_connections_per_user` sessions on
    /// this gateway.
    #[error("too_many_connections")]
    TooManyConnections,
    /// The user opened more connections than `limits.handshakes_per_second`
    /// allows (with its burst); the client retries after a pause.
    #[error("rate_limited")]
    RateLimited,
    /// `auth.resume` is malformed, or names a position or a stream the
    /// user may not resume from.
    #[error("invalid_resume")]
    InvalidResume,
}

impl HandshakeError {
    fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Unauthorized => "unauthorized",
            HandshakeError::Unavailable => "unavailable",
            HandshakeError::TooManyConnections => "too_many_connections",
            HandshakeError::RateLimited => "rate_limited",
            HandshakeError::InvalidResume => "invalid_resume",
        }
    }
}

/// One queued send.
struct Job {
    value: Value,
    ack: AckSender,
    received: Instant,
}

/// A session's send queue and rate limiters, kept in the socket's extensions.
#[derive(Clone)]
struct SendQueue {
    tx: mpsc::Sender<oneshot::Receiver<Job>>,
    limiter: Arc<DefaultDirectRateLimiter>,
    user: Arc<str>,
    user_limiter: Arc<UserLimiter>,
}

/// A send's reserved place in its session's queue (see the module doc).
enum Slot {
    Queued(oneshot::Sender<Job>),
    /// Refused before queueing, with the limit that refused it (a
    /// `rate_limited` label) if one did.
    Refused(ProtocolError, Option<&'static str>),
}

fn rate_limited(scope: &'static str, message: &str) -> Slot {
    Slot::Refused(
        ProtocolError::new(ErrorCode::RateLimited, message),
        Some(scope),
    )
}

impl<A: Adapter> FromMessageParts<A> for Slot {
    type Error = std::convert::Infallible;

    fn from_message_parts(
        s: &Arc<Socket<A>>,
        _: &mut socketioxide::handler::Value,
        _: &Option<i64>,
    ) -> Result<Self, Self::Error> {
        let Some(queue) = s.extensions.get::<SendQueue>() else {
            return Ok(Slot::Refused(
                ProtocolError::new(ErrorCode::Unavailable, "session is not ready"),
                None,
            ));
        };
        // The connection's own bucket first: a client flooding on one
        // connection is then refused without draining the bucket its
        // user's other connections share.
        if queue.limiter.check().is_err() {
            return Ok(rate_limited(
                "connection",
                "too many messages on this connection; slow down and retry",
            ));
        }
        if queue.user_limiter.check_key(&queue.user).is_err() {
            return Ok(rate_limited(
                "user",
                "too many messages from this user; slow down and retry",
            ));
        }
        let (tx, rx) = oneshot::channel();
        Ok(match queue.tx.try_send(rx) {
            Ok(()) => Slot::Queued(tx),
            Err(_) => rate_limited(
                "queue",
                "too many messages waiting for the broker; retry later",
            ),
        })
    }
}

/// Mounts the namespace on `io`.
pub fn attach(io: &SocketIo, gw: Arc<Gateway>) {
    let on_connect = {
        let gw = gw.clone();
        move |s: SocketRef| {
            let gw = gw.clone();
            async move {
                tracing::debug!(sid = %s.id, "connected");
                let (replay, follows) = gw.sessions.activate(s.id);
                gw.follow(follows);
                if let Some(streams) = replay {
                    tokio::spawn(super::resume::replay(gw.clone(), s.id, streams));
                }
            }
        }
    };
    let handshake = move |s: SocketRef, TryData(auth): TryData<Value>| {
        let gw = gw.clone();
        async move {
            let result = handshake(&gw, s, auth.ok()).await;
            if let Err(e) = &result {
                gw.metrics.connects_refused.inc();
                gw.metrics
                    .connects_refused_by_reason
                    .get_or_create(&vec![("reason", e.reason())])
                    .inc();
            }
            result
        }
    };
    io.ns("/", on_connect.with(handshake));
}

/// Authenticates, binds the user's keys and registers the handlers, all
/// before the client sees `connect`, so that a connected session receives
/// everything routed to it and no event it sends finds no handler.
async fn handshake(
    gw: &Arc<Gateway>,
    s: SocketRef,
    auth: Option<Value>,
) -> Result<(), HandshakeError> {
    let token = auth
        .as_ref()
        .and_then(|a| a.get("token"))
        .and_then(Value::as_str)
        .ok_or(HandshakeError::Unauthorized)?;
    let user = gw
        .tokens
        .verify(token)
        .map_err(|_| HandshakeError::Unauthorized)?;
    // Before anything costs a query or a bind: one user churning
    // connections would otherwise bind and unbind on the broker at will.
    if gw
        .user_handshakes
        .check_key(&Arc::from(user.as_str()))
        .is_err()
    {
        gw.metrics
            .rate_limited
            .get_or_create(&vec![("scope", "handshake")])
            .inc();
        return Err(HandshakeError::RateLimited);
    }
    // Checked before the database is asked, so that a user hammering the
    // handshake costs no query; add_pending below is the binding check.
    if !gw.sessions.has_room_for(&user) {
        return Err(HandshakeError::TooManyConnections);
    }
    let positions =
        super::resume::parse(auth.as_ref().and_then(|a| a.get("resume"))).map_err(|why| {
            tracing::debug!(%user, "handshake: {why}");
            HandshakeError::InvalidResume
        })?;
    let memberships = gw.store.memberships(&user).await.map_err(|e| {
        tracing::warn!(%user, error = %e, "handshake: cannot load memberships");
        HandshakeError::Unavailable
    })?;
    let plan = super::resume::plan(
        &gw.store,
        &user,
        &memberships,
        positions.as_ref(),
        gw.config.gateway.replay_limit,
    )
    .await
    .map_err(|e| match e {
        super::resume::PlanError::Invalid(why) => {
            tracing::debug!(%user, "handshake: {why}");
            HandshakeError::InvalidResume
        }
        super::resume::PlanError::Store(e) => {
            tracing::warn!(%user, error = %e, "handshake: cannot read stream heads");
            HandshakeError::Unavailable
        }
    })?;
    tracing::debug!(%user, channels = memberships.len(), "handshake: memberships loaded");
    let keys: Vec<RouteKey> = plan
        .starts
        .iter()
        .filter(|s| s.bound)
        .map(|s| s.stream.route_key())
        .collect();
    let at_head = plan.at_head;
    gw.sessions
        .add_pending(s.clone(), &user, plan.starts, plan.replay)
        .map_err(|_| HandshakeError::TooManyConnections)?;
    let results: Vec<(RouteKey, Result<bool, _>)> = futures::stream::iter(keys)
        .map(|k| async move {
            let r = gw.routes.acquire(&k).await;
            (k, r)
        })
        .buffer_unordered(BIND_CONCURRENCY)
        .collect()
        .await;
    if let Some((_, Err(e))) = results.iter().find(|(_, r)| r.is_err()) {
        // Refused rather than connected deaf: the client's reconnect is
        // the retry, and nothing stays bound for it meanwhile.
        tracing::warn!(%user, error = %e, "handshake: cannot bind routes");
        gw.sessions.remove(s.id);
        for (k, r) in &results {
            if r.is_ok() {
                let _ = gw.routes.release(k).await;
            }
        }
        return Err(HandshakeError::Unavailable);
    }
    tracing::debug!(%user, "handshake: routes bound");
    // Read after the bind: whatever is committed later is published later,
    // so it reaches this session; whatever came before is before connect.
    if !at_head.is_empty() {
        match gw.store.heads(&at_head).await {
            Ok(heads) => gw.sessions.raise(s.id, &heads),
            Err(e) => {
                tracing::warn!(%user, error = %e, "handshake: cannot read stream heads");
                if let Some(keys) = gw.sessions.remove(s.id) {
                    for k in keys {
                        let _ = gw.routes.release(&k).await;
                    }
                }
                return Err(HandshakeError::Unavailable);
            }
        }
    }

    let limits = &gw.config.limits;
    let (tx, rx) = mpsc::channel(limits.send_queue);
    let user: Arc<str> = Arc::from(user);
    s.extensions.insert(SendQueue {
        tx,
        limiter: Arc::new(RateLimiter::direct(super::quota(
            limits.messages_per_second,
            limits.message_burst,
        ))),
        user: user.clone(),
        user_limiter: gw.user_sends.clone(),
    });
    tokio::spawn(work_queue(gw.clone(), user, s.id, rx));

    let gw_send = gw.clone();
    s.on(
        SEND_MESSAGE,
        move |slot: Slot, s: SocketRef, ack: AckSender, TryData(value): TryData<Value>| {
            let gw = gw_send.clone();
            async move {
                match slot {
                    Slot::Refused(e, scope) => {
                        count_refusal(&gw, e.code, scope);
                        send_ack(&gw, s.id, ack, &e.ack());
                    }
                    Slot::Queued(tx) => {
                        let value = value.unwrap_or(Value::Null);
                        // The queue's task is gone only if the session is.
                        let _ = tx.send(Job {
                            value,
                            ack,
                            received: Instant::now(),
                        });
                    }
                }
            }
        },
    );
    let gw_disconnect = gw.clone();
    s.on_disconnect(move |s: SocketRef| {
        let gw = gw_disconnect.clone();
        async move { gw.sessions.end(s.id).await }
    });
    gw.metrics.sessions.inc();
    tracing::debug!("handshake: done");
    Ok(())
}

/// Counts a refused send, and the limit that refused it if one did.
fn count_refusal(gw: &Gateway, code: ErrorCode, scope: Option<&'static str>) {
    gw.metrics
        .sends_refused
        .get_or_create(&vec![("code", code_label(code))])
        .inc();
    if let Some(scope) = scope {
        gw.metrics
            .rate_limited
            .get_or_create(&vec![("scope", scope)])
            .inc();
    }
}

/// Sends an ack; one that does not fit in the session's send buffer makes
/// the session a slow client (an ack silently lost would leave the client
/// waiting on it).
fn send_ack(gw: &Gateway, sid: Sid, ack: AckSender, reply: &Value) {
    if let Err(SendError::Socket(SocketError::InternalChannelFull)) = ack.send(reply) {
        gw.sessions.cut_off(sid, "an ack");
    }
}

/// Works one session's sends in the order they arrived.
async fn work_queue(
    gw: Arc<Gateway>,
    user: Arc<str>,
    sid: Sid,
    mut queue: mpsc::Receiver<oneshot::Receiver<Job>>,
) {
    while let Some(slot) = queue.recv().await {
        // A dropped sender means the handler never ran; skip its place.
        let Ok(job) = slot.await else { continue };
        let reply = match accept(&gw, &user, &job.value).await {
            Ok((id, created_at)) => {
                gw.metrics.sends_accepted.inc();
                json!({ "ok": true, "id": id, "createdAt": crate::protocol::format_time(created_at) })
            }
            Err(e) => {
                count_refusal(&gw, e.code, None);
                e.ack()
            }
        };
        gw.metrics
            .send_ack_seconds
            .observe(job.received.elapsed().as_secs_f64());
        send_ack(&gw, sid, job.ack, &reply);
    }
}

fn code_label(c: ErrorCode) -> &'static str {
    match c {
        ErrorCode::InvalidPayload => "invalid_payload",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::NotMember => "not_member",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::Unavailable => "unavailable",
    }
}

/// Validates one send and publishes it durably; returns its id and time.
async fn accept(gw: &Gateway, user: &str, value: &Value) -> Result<(String, i64), ProtocolError> {
    let req = parse_send(value, gw.config.limits.max_content_bytes)?;
    // A retry is the first send again, whatever its target: answered
    // before the target is looked at.
    if let Some(cid) = &req.client_msg_id {
        if let Some(first) = find_first_send(gw, user, cid).await {
            // Sent before: the broker or the store holds it already,
            // publish nothing.
            return Ok(first);
        }
    }
    if let Target::Channel(c) = &req.target {
        if !is_member(gw, user, c).await? {
            return Err(ProtocolError::new(
                ErrorCode::NotMember,
                format!("you are not a member of channel {c}"),
            ));
        }
    }
    let message = Message {
        id: uuid::Uuid::now_v7().to_string(),
        sender_id: user.to_owned(),
        target: req.target,
        content: req.content,
        client_msg_id: req.client_msg_id,
        created_at: now_ms(),
    };
    let payload = serde_json::to_vec(&IncomingEnvelope {
        v: 1,
        message: message.clone(),
    })
    .map_err(|e| ProtocolError::new(ErrorCode::InvalidPayload, e.to_string()))?;
    let event = IncomingEvent {
        id: message.id.clone(),
        ordering_key: message.ordering_key(),
        payload: payload.into(),
    };
    let unavailable = |why: String| {
        tracing::warn!(%user, "send not accepted: {why}");
        ProtocolError::new(
            ErrorCode::Unavailable,
            "the broker did not accept the message; retry with the same clientMsgId",
        )
    };
    // Backends bound their own calls by the same setting; this is the
    // backstop that keeps a client from waiting forever on a broken one.
    let timeout = Duration::from_millis(gw.config.broker_timeout_ms);
    match tokio::time::timeout(timeout, gw.backend.publish_incoming(event)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(unavailable(e.to_string())),
        Err(_) => return Err(unavailable(format!("no confirm within {timeout:?}"))),
    }
    if let Some(cid) = &message.client_msg_id {
        gw.remember_ack(user, cid, &message.id, message.created_at);
    }
    Ok((message.id, message.created_at))
}

/// The id and time of an earlier send with this `clientMsgId`: from this
/// gateway's memory of its acks, else from the store (a first send acked by
/// another gateway, or before a restart, once a worker stored it). A store
/// error is no reason to refuse the send: the worker deduplicates anyway.
async fn find_first_send(gw: &Gateway, user: &str, client_msg_id: &str) -> Option<(String, i64)> {
    if let Some(hit) = gw.cached_ack(user, client_msg_id) {
        return Some(hit);
    }
    match gw.store.find_by_client_msg_id(user, client_msg_id).await {
        Ok(Some(first)) => {
            gw.remember_ack(user, client_msg_id, &first.id, first.created_at);
            Some((first.id, first.created_at))
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(%user, error = %e, "retry lookup failed; the worker will deduplicate");
            None
        }
    }
}

/// Membership, from the store. Not from the local view alone: that view
/// learns of a removal only when the `leave` reaches this gateway's stream,
/// and a member removed a moment ago must not send after the `204`. Only
/// when the store cannot answer does the local view decide, and only to
/// say yes: refusing every group send during a database outage would be
/// worse than the short window in which a removal is not yet seen.
async fn is_member(gw: &Gateway, user: &str, channel: &str) -> Result<bool, ProtocolError> {
    match gw.store.member_since(channel, user).await {
        Ok(since) => Ok(since.is_some()),
        Err(e) if gw.sessions.user_in_channel(user, channel) => {
            tracing::warn!(%user, %channel, error = %e, "membership check failed; trusting this gateway's view");
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(%user, %channel, error = %e, "membership check failed");
            Err(ProtocolError::new(
                ErrorCode::Unavailable,
                "cannot check channel membership; retry",
            ))
        }
    }
}
