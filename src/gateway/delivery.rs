//! The loop over this gateway's outgoing stream: emits routed messages to
//! local sessions, applies membership changes, and re-binds after the
//! backend lost the routes.

use std::sync::Arc;
use std::time::Duration;

use fanout_backend::{OrderingKey, OutgoingMessage, RouteKey, ServerEvent, ServerStream};
use futures::StreamExt;

use super::sessions::Emit;
use super::Gateway;
use crate::protocol::{now_ms, Message, OutgoingEnvelope};

/// Most stored messages a newly added member catches up on; also per user
/// and per channel after a route loss.
const CATCH_UP_LIMIT: u32 = 1000;
/// Catch-up queries in flight after a route loss.
const CATCH_UP_CONCURRENCY: usize = 8;
/// How often sessions whose end was never signalled are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Runs the delivery loop until the stream ends.
pub fn spawn(gw: Arc<Gateway>, stream: ServerStream) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(gw, stream))
}

/// Ends sessions whose end socketioxide never signalled (see
/// [`super::Sessions::stale`]) and forgets the rate buckets of idle users,
/// until the gateway is dropped.
pub fn spawn_sweeper(gw: &Arc<Gateway>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(gw);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            let Some(gw) = weak.upgrade() else { return };
            gw.trim_limiters();
            for s in gw.sessions.stale(Duration::from_secs(30)) {
                tracing::info!(sid = %s.id, "ending a session whose disconnect was not signalled");
                super::socket::end_session(&gw, &s).await;
            }
        }
    })
}

async fn run(gw: Arc<Gateway>, mut stream: ServerStream) {
    // Processed one at a time, in order: a leave applied before the next
    // message, a join's catch-up finished before later live messages.
    // Wall time of the last delivery before a loss: what was published
    // after it may have fallen into the gap.
    let mut last_delivery_ms = now_ms();
    while let Some(event) = stream.next().await {
        match event {
            ServerEvent::Message(m) => {
                last_delivery_ms = now_ms();
                handle(&gw, m).await;
            }
            ServerEvent::RoutesLost => {
                gw.metrics.routes_lost.inc();
                let (n, err) = gw.routes.rebind_all().await;
                match err {
                    None => tracing::warn!(
                        keys = n,
                        "backend lost this gateway's routes; bound them again"
                    ),
                    Some(e) => {
                        tracing::error!(keys = n, error = %e, "re-binding after a route loss failed")
                    }
                }
                // Bound again: what comes next arrives live. Before the
                // stream moves on, send every local session what was
                // published into the gap, so the order within each
                // conversation holds; duplicate windows drop what a
                // session was already shown.
                let from = last_delivery_ms - gw.config.gateway.loss_catch_up_ms;
                catch_up_after_loss(&gw, from).await;
            }
        }
    }
    if gw.is_shutting_down() {
        tracing::info!("outgoing stream ended");
    } else {
        // Only the backend ends a registration on its own: another
        // process registered this server id (a second gateway started
        // with it, or took it while this one was paused or cut off).
        // Nothing reaches this gateway's sessions any more.
        let reason = format!(
            "this gateway's registration as {} ended (another process holds the server id); \
             it delivers nothing: restart it with a server id of its own",
            gw.server_id
        );
        tracing::error!("{reason}");
        gw.set_unready(reason);
    }
}

async fn handle(gw: &Gateway, m: OutgoingMessage) {
    let env: OutgoingEnvelope = match serde_json::from_slice(&m.payload) {
        Ok(env) => env,
        Err(e) => {
            tracing::error!(key = %m.key, error = %e, "undecodable outgoing message dropped");
            return;
        }
    };
    match env {
        OutgoingEnvelope::Message { message } => {
            let e = emit_of(&message);
            let (count, failed) = match &m.key {
                RouteKey::User(u) => gw.sessions.emit_to_user(u, &e),
                RouteKey::Channel(c) => gw.sessions.emit_to_channel(c, &e),
            };
            gw.account(count, failed);
        }
        OutgoingEnvelope::Join {
            channel_id,
            user_id,
            since,
        } => {
            let from = since - gw.config.gateway.catch_up_skew_ms;
            let sids = gw.sessions.join_channel(&user_id, &channel_id, from);
            if sids.is_empty() {
                return;
            }
            let key = RouteKey::Channel(channel_id.clone());
            for _ in &sids {
                if let Err(e) = gw.routes.acquire(&key).await {
                    tracing::error!(user = %user_id, channel = %channel_id, error = %e, "cannot bind a joined channel");
                }
            }
            gw.metrics.bound_keys.set(gw.routes.bound() as i64);
            // Bound now: everything published from here on arrives live.
            // What was published before the bind is in the store (workers
            // store before they publish), so read it back; the sessions'
            // duplicate windows drop what they were already shown.
            let conversation = OrderingKey::channel(&channel_id);
            match gw
                .store
                .messages_since(conversation.as_str(), from, CATCH_UP_LIMIT)
                .await
            {
                Ok(messages) => {
                    for message in &messages {
                        let (count, failed) =
                            gw.sessions.emit_to_sessions(&sids, &emit_of(message));
                        gw.account(count, failed);
                    }
                }
                Err(e) => {
                    tracing::error!(channel = %channel_id, error = %e, "catch-up after join failed")
                }
            }
        }
        OutgoingEnvelope::Leave {
            channel_id,
            user_id,
        } => {
            let sids = gw.sessions.leave_channel(&user_id, &channel_id);
            let key = RouteKey::Channel(channel_id.clone());
            for _ in &sids {
                if let Err(e) = gw.routes.release(&key).await {
                    tracing::warn!(channel = %channel_id, error = %e, "cannot unbind a left channel");
                }
            }
            gw.metrics.bound_keys.set(gw.routes.bound() as i64);
        }
    }
}

/// Reads back from the store what local users and channels got from
/// `from` on, and emits it.
async fn catch_up_after_loss(gw: &Gateway, from: i64) {
    let (users, channels) = gw.sessions.local_users_and_channels();
    let started = std::time::Instant::now();
    let personal = futures::stream::iter(users)
        .map(|u| async move {
            let r = gw
                .store
                .personal_messages_since(&u, from, CATCH_UP_LIMIT)
                .await;
            (RouteKey::User(u), r)
        })
        .buffer_unordered(CATCH_UP_CONCURRENCY);
    let group = futures::stream::iter(channels)
        .map(|c| async move {
            let conversation = OrderingKey::channel(&c);
            let r = gw
                .store
                .messages_since(conversation.as_str(), from, CATCH_UP_LIMIT)
                .await;
            (RouteKey::Channel(c), r)
        })
        .buffer_unordered(CATCH_UP_CONCURRENCY);
    let results: Vec<_> = personal.chain(group).collect().await;
    let (mut shown, mut failed) = (0u64, 0usize);
    for (key, result) in results {
        let messages = match result {
            Ok(m) => m,
            Err(e) => {
                failed += 1;
                tracing::error!(key = %key, error = %e, "catch-up after a route loss failed");
                continue;
            }
        };
        for message in &messages {
            let e = emit_of(message);
            let (count, failed) = match &key {
                RouteKey::User(u) => gw.sessions.emit_to_user(u, &e),
                RouteKey::Channel(c) => gw.sessions.emit_to_channel(c, &e),
            };
            shown += count.emitted;
            gw.account(count, failed);
        }
    }
    gw.metrics.loss_catch_up_emitted.inc_by(shown);
    tracing::warn!(
        from_ms = from,
        shown,
        failed_queries = failed,
        took_ms = started.elapsed().as_millis() as u64,
        "caught local sessions up after a route loss"
    );
}

fn emit_of(message: &Message) -> Emit {
    let (event, data) = message.to_event();
    Emit {
        event,
        id: message.id.clone(),
        data,
        created_at: message.created_at,
    }
}
