//! The loop over this gateway's outgoing stream: emits routed messages to
//! local sessions, applies membership changes, and re-binds after the
//! backend lost the routes.
//!
//! Joins leave the loop's critical path: the loop only marks the joining
//! sessions (an in-memory step) and queues the join; join tasks bind the
//! channel and read its catch-up, up to [`JOIN_CONCURRENCY`] channels at a
//! time, all joins of one channel that queued meanwhile in one bind and one
//! query. Meanwhile the joining sessions keep the channel's live messages
//! aside and are shown them after the catch-up (see
//! [`super::Sessions::finish_join`]), so a channel flood of joins costs
//! chat delivery no bind and no query, and each session still sees its
//! conversation in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fanout_backend::{OrderingKey, OutgoingMessage, RouteKey, ServerEvent, ServerStream};
use futures::StreamExt;
use tokio::sync::{mpsc, Semaphore};

use super::sessions::{Emit, JoinTicket};
use super::Gateway;
use crate::protocol::{now_ms, Message, OutgoingEnvelope};

/// Most stored messages a newly added member catches up on; also per user
/// and per channel after a route loss.
const CATCH_UP_LIMIT: u32 = 1000;
/// Catch-up queries in flight after a route loss.
const CATCH_UP_CONCURRENCY: usize = 8;
/// Channels whose joins are bound and caught up at once.
const JOIN_CONCURRENCY: usize = 4;

/// Joins queued for their bind and catch-up, by channel: joins of one
/// channel that arrive before its task starts share that task.
#[derive(Debug, Default)]
struct JoinQueue {
    pending: Mutex<HashMap<String, Vec<JoinTicket>>>,
}

impl JoinQueue {
    /// Adds tickets; `true` if the channel had none waiting (the caller
    /// then schedules a task for it).
    fn push(&self, channel: &str, tickets: Vec<JoinTicket>) -> bool {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match p.get_mut(channel) {
            Some(waiting) => {
                waiting.extend(tickets);
                false
            }
            None => {
                p.insert(channel.to_owned(), tickets);
                true
            }
        }
    }

    fn take(&self, channel: &str) -> Vec<JoinTicket> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.remove(channel).unwrap_or_default()
    }
}

/// Runs the delivery loop until the stream ends.
pub fn spawn(gw: Arc<Gateway>, stream: ServerStream) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(gw, stream))
}

async fn run(gw: Arc<Gateway>, mut stream: ServerStream) {
    // Processed one at a time, in order: a leave applied before the next
    // message, a join's sessions marked before later live messages.
    let joins = Arc::new(JoinQueue::default());
    let (join_tx, join_rx) = mpsc::unbounded_channel();
    // Ends when this loop ends (join_tx dropped) and its queue is done.
    tokio::spawn(run_joins(gw.clone(), joins.clone(), join_rx));
    // Wall time of the last delivery before a loss, and how far behind its
    // message's creation it was: what was published after the message may
    // have fallen into the gap, which then starts that much earlier (a
    // gateway whose stream overflowed was behind by a whole buffer).
    let mut last_delivery_ms = now_ms();
    let mut lag_ms: i64 = 0;
    while let Some(event) = stream.next().await {
        match event {
            ServerEvent::Message(m) => {
                last_delivery_ms = now_ms();
                if let Some(created_at) = handle(&gw, &joins, &join_tx, m) {
                    lag_ms = (last_delivery_ms - created_at).max(0);
                }
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
                // Join and leave notices may have fallen into the gap too:
                // the store says what each local user belongs to now.
                resync_memberships(&gw, &joins, &join_tx).await;
                let from = last_delivery_ms - lag_ms - gw.config.gateway.loss_catch_up_ms;
                catch_up_after_loss(&gw, from).await;
                lag_ms = 0;
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

/// Applies one outgoing message without awaiting anything; returns the
/// chat message's creation time if it was one.
fn handle(
    gw: &Gateway,
    joins: &JoinQueue,
    join_tx: &mpsc::UnboundedSender<String>,
    m: OutgoingMessage,
) -> Option<i64> {
    let env: OutgoingEnvelope = match serde_json::from_slice(&m.payload) {
        Ok(env) => env,
        Err(e) => {
            tracing::error!(key = %m.key, error = %e, "undecodable outgoing message dropped");
            return None;
        }
    };
    match env {
        OutgoingEnvelope::Message { message } => {
            gw.sessions.emit(&m.key, &emit_of(&message));
            Some(message.created_at)
        }
        // Until the gateway handles positions: a message's entry is shown
        // as the message was (the worker publishes only these).
        OutgoingEnvelope::Entry(crate::stream::Entry {
            body: crate::stream::Body::Message(message),
            ..
        }) => {
            gw.sessions.emit(&m.key, &emit_of(&message));
            Some(message.created_at)
        }
        OutgoingEnvelope::Entry(_) => {
            tracing::error!(key = %m.key, "sequenced entries are not handled yet");
            None
        }
        OutgoingEnvelope::Join {
            channel_id,
            user_id,
            since,
        } => {
            let from = since - gw.config.gateway.catch_up_skew_ms;
            let tickets = gw.sessions.join_channel(&user_id, &channel_id, from);
            if !tickets.is_empty() && joins.push(&channel_id, tickets) {
                // Fails only once the join task is gone, i.e. never while
                // this loop runs.
                let _ = join_tx.send(channel_id);
            }
            None
        }
        OutgoingEnvelope::Leave {
            channel_id,
            user_id,
        } => {
            let sids = gw.sessions.leave_channel(&user_id, &channel_id);
            if !sids.is_empty() {
                // Unbinding waits for nothing the loop needs: the session
                // no longer receives the channel, so a late unbind only
                // lets a few messages arrive that nobody is shown.
                let gw_routes = gw.routes.clone();
                tokio::spawn(async move {
                    let key = RouteKey::Channel(channel_id.clone());
                    for _ in &sids {
                        if let Err(e) = gw_routes.release(&key).await {
                            tracing::warn!(channel = %channel_id, error = %e, "cannot unbind a left channel");
                        }
                    }
                });
            }
            None
        }
    }
}

/// Works the join queue, [`JOIN_CONCURRENCY`] channels at a time.
async fn run_joins(
    gw: Arc<Gateway>,
    joins: Arc<JoinQueue>,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    let slots = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
    while let Some(channel) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (gw, joins) = (gw.clone(), joins.clone());
        tokio::spawn(async move {
            complete_joins(&gw, &joins, &channel).await;
            drop(slot);
        });
    }
}

/// Binds `channel` for the joins queued on it, reads its catch-up once,
/// and shows each joined session its part, then what waited meanwhile.
async fn complete_joins(gw: &Gateway, joins: &JoinQueue, channel: &str) {
    let tickets = joins.take(channel);
    let Some(from) = tickets.iter().map(|t| t.since).min() else {
        return;
    };
    let key = RouteKey::Channel(channel.to_owned());
    let mut held = Vec::with_capacity(tickets.len());
    for t in &tickets {
        match gw.routes.acquire(&key).await {
            Ok(_) => held.push(t.ticket),
            Err(e) => {
                tracing::error!(channel = %channel, error = %e, "cannot bind a joined channel")
            }
        }
    }
    // Bound now: everything published from here on arrives live. What was
    // published before the bind is in the store (workers store before they
    // publish), so read it back; the sessions' duplicate windows drop what
    // they were already shown.
    let conversation = OrderingKey::channel(channel);
    let catch_up: Vec<Emit> = match gw
        .store
        .messages_since(conversation.as_str(), from, CATCH_UP_LIMIT)
        .await
    {
        Ok(messages) => messages.iter().map(emit_of).collect(),
        Err(e) => {
            tracing::error!(channel = %channel, error = %e, "catch-up after join failed");
            Vec::new()
        }
    };
    let gone = gw.sessions.finish_join(channel, &tickets, &catch_up);
    // Sessions that left or ended while catching up: their references
    // were never handed to them, so they go back here.
    for t in gone {
        if held.contains(&t.ticket) {
            if let Err(e) = gw.routes.release(&key).await {
                tracing::warn!(channel = %channel, error = %e, "cannot unbind a left channel");
            }
        }
    }
}

/// Applies to the local sessions the memberships the store holds now, as
/// join and leave notices would have (after a route loss, which may have
/// swallowed some). Both directions are idempotent, so a notice still in
/// the stream changes nothing more when it arrives.
async fn resync_memberships(
    gw: &Arc<Gateway>,
    joins: &JoinQueue,
    join_tx: &mpsc::UnboundedSender<String>,
) {
    let (users, _) = gw.sessions.local_users_and_channels();
    let results: Vec<_> = futures::stream::iter(users)
        .map(|u| async move {
            let r = gw.store.memberships_of(&u).await;
            (u, r)
        })
        .buffer_unordered(CATCH_UP_CONCURRENCY)
        .collect()
        .await;
    let (mut joined, mut left) = (0usize, 0usize);
    for (user, result) in results {
        let memberships = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(%user, error = %e, "membership check after a route loss failed");
                continue;
            }
        };
        let held = gw.sessions.channels_of_user(&user);
        for (channel, added_at) in &memberships {
            if held.contains(channel) {
                continue;
            }
            let from = added_at - gw.config.gateway.catch_up_skew_ms;
            let tickets = gw.sessions.join_channel(&user, channel, from);
            joined += tickets.len();
            if !tickets.is_empty() && joins.push(channel, tickets) {
                // Fails only once the join task is gone, i.e. never while
                // the delivery loop runs.
                let _ = join_tx.send(channel.clone());
            }
        }
        let now: std::collections::HashSet<&String> = memberships.iter().map(|(c, _)| c).collect();
        for channel in held.iter().filter(|c| !now.contains(c)) {
            let sids = gw.sessions.leave_channel(&user, channel);
            left += sids.len();
            let key = RouteKey::Channel(channel.clone());
            for _ in &sids {
                if let Err(e) = gw.routes.release(&key).await {
                    tracing::warn!(%channel, error = %e, "cannot unbind a left channel");
                }
            }
        }
    }
    if joined + left > 0 {
        tracing::warn!(
            joined,
            left,
            "applied membership changes whose notices the route loss swallowed"
        );
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
            shown += gw.sessions.emit(&key, &emit_of(message)).emitted;
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
