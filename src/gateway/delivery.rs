//! The loop over this gateway's outgoing stream, and the work it asks for:
//! entries are offered to the local sessions of their stream (which emit
//! them strictly in position order, see [`super::sessions`]); positions a
//! session misses are read from the store ("fills"); channels a user was
//! added to are bound, then filled; after the backend lost the routes,
//! every key is bound again (retried until it holds) and every local
//! stream is filled from where its sessions stand.
//!
//! Nothing here waits on the loop's critical path: binds, unbinds and
//! reads run in tasks, and the sessions keep what arrives meanwhile in
//! order.

use std::sync::Arc;
use std::time::Duration;

use fanout_backend::{OutgoingMessage, RouteKey, ServerEvent, ServerStream};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::sessions::{Follow, Item};
use super::Gateway;
use crate::protocol::OutgoingEnvelope;
use crate::stream::Stream;

/// Most entries one fill reads; a longer gap takes several reads.
pub const FILL_LIMIT: u32 = 1000;
/// Fills in flight at once on one gateway: a route loss or a flood of
/// joins must not take every connection of the store's pool.
pub const FILL_CONCURRENCY: usize = 8;
/// How long a failed fill waits before it is tried again.
const FILL_RETRY: Duration = Duration::from_millis(500);

/// Runs the delivery loop until the stream ends, and the task that fills
/// the streams of keys whose bind was repaired.
pub fn spawn(gw: Arc<Gateway>, stream: ServerStream) -> tokio::task::JoinHandle<()> {
    if let Some(repaired) = gw.take_repaired() {
        tokio::spawn(fill_repaired(Arc::downgrade(&gw), repaired));
    }
    tokio::spawn(run(gw, stream))
}

async fn run(gw: Arc<Gateway>, mut stream: ServerStream) {
    while let Some(event) = stream.next().await {
        match event {
            ServerEvent::Message(m) => handle(&gw, m),
            ServerEvent::RoutesLost => {
                gw.metrics.routes_lost.inc();
                let (bound, retrying) = gw.routes.rebind_all().await;
                if retrying == 0 {
                    tracing::warn!(
                        keys = bound,
                        "backend lost this gateway's routes; bound them again"
                    );
                } else {
                    tracing::error!(
                        keys = bound,
                        retrying,
                        "backend lost this gateway's routes; some binds failed and are retried until they hold"
                    );
                }
                // What was published into the gap is in the store; a lost
                // tail shows no gap, so every local stream is read from
                // where its sessions stand.
                fill_all(&gw);
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

/// Offers one outgoing entry to its stream's local sessions, without
/// awaiting anything.
fn handle(gw: &Arc<Gateway>, m: OutgoingMessage) {
    let entry = match serde_json::from_slice::<OutgoingEnvelope>(&m.payload) {
        Ok(OutgoingEnvelope::Entry(entry)) => entry,
        Err(e) => {
            tracing::error!(key = %m.key, error = %e, "undecodable outgoing message dropped");
            return;
        }
    };
    if Stream::of_route_key(&m.key) != entry.stream {
        tracing::error!(key = %m.key, stream = %entry.stream, "an entry routed under another stream's key dropped");
        return;
    }
    let follows = gw.sessions.offer(&Item::new(entry));
    gw.follow(follows);
}

impl Gateway {
    /// Starts the work sessions asked for (see [`Follow`]).
    pub fn follow(self: &Arc<Self>, follows: Vec<Follow>) {
        for f in follows {
            match f {
                Follow::Fill(stream) => {
                    let wait = Duration::from_millis(self.config.gateway.gap_wait_ms);
                    self.schedule_fill(stream, wait)
                }
                Follow::Join { sid, channel } => {
                    let gw = self.clone();
                    tokio::spawn(async move { join(&gw, sid, channel).await });
                }
                Follow::Release(key) => {
                    let gw = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = gw.routes.release(&key).await {
                            tracing::warn!(key = %key, error = %e, "cannot unbind a left channel; the route stays until the gateway deregisters");
                        }
                    });
                }
            }
        }
    }

    /// Fills `stream` after `wait` (after a gap, `gateway.gap_wait_ms`: the
    /// missing positions may only be late, two workers publish one inbox),
    /// once however many sessions asked for it meanwhile (a channel
    /// created with 1,000 members: one read for all its local joiners).
    pub fn schedule_fill(self: &Arc<Self>, stream: Stream, wait: Duration) {
        if !self.fill_scheduled(&stream) {
            return;
        }
        let gw = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let Ok(_slot) = gw.fill_slots.acquire().await else {
                return;
            };
            gw.fill_done(&stream);
            fill(&gw, &stream, false).await;
        });
    }
}

/// Reads `stream` from the store from where its waiting sessions stand
/// (all of its sessions if `all`) and offers what it finds; retried until
/// the store answers while a session still waits.
pub async fn fill(gw: &Arc<Gateway>, stream: &Stream, all: bool) {
    let mut all = all;
    let mut previous = None;
    loop {
        let Some(from) = gw.sessions.fill_from(stream, all) else {
            return;
        };
        if previous.is_some_and(|p| from <= p) {
            // The store's entries did not move the sessions on: a gap in
            // the store itself, which positions never leave.
            tracing::error!(%stream, from, "filling made no progress; the store misses positions");
            return;
        }
        gw.metrics.fills.inc();
        match gw.store.entries_after(stream, from, FILL_LIMIT).await {
            Ok(entries) => {
                let full = entries.len() as u32 == FILL_LIMIT;
                let items: Vec<Arc<Item>> = entries.into_iter().map(Item::new).collect();
                let (emitted, follows) = gw.sessions.fill(stream, &items);
                gw.metrics.fill_entries.inc_by(emitted);
                gw.follow(follows);
                if !full {
                    return;
                }
                // A longer gap: read on from where the sessions are now.
                all = true;
                previous = Some(from);
            }
            Err(e) => {
                gw.metrics.fill_failures.inc();
                tracing::warn!(%stream, error = %e, retry_in = ?FILL_RETRY, "cannot read missing positions; retrying");
                tokio::time::sleep(FILL_RETRY).await;
            }
        }
    }
}

/// Fills every local stream (after a route loss): each is marked, so that
/// a lost tail with no gap to show it is read too.
fn fill_all(gw: &Arc<Gateway>) {
    let streams = gw.sessions.streams();
    tracing::warn!(
        streams = streams.len(),
        "filling local sessions from the store after a route loss"
    );
    for stream in streams {
        gw.sessions.mark_stale(&stream);
        gw.schedule_fill(stream, Duration::ZERO);
    }
}

/// Binds a channel a session was added to (retried until it holds while
/// the session still wants it), then fills it from the entry that added
/// the user.
async fn join(gw: &Arc<Gateway>, sid: socketioxide::socket::Sid, channel: String) {
    let key = RouteKey::Channel(channel.clone());
    let held = gw
        .routes
        .acquire_until(&key, || gw.sessions.is_joining(sid, &channel))
        .await;
    if !held {
        return;
    }
    if !gw.sessions.joined(sid, &channel) {
        // Ended or removed meanwhile: the reference goes back.
        if let Err(e) = gw.routes.release(&key).await {
            tracing::warn!(%channel, error = %e, "cannot unbind a left channel");
        }
        return;
    }
    gw.schedule_fill(Stream::Channel(channel), Duration::ZERO);
}

/// Fills the streams of keys whose bind failed and was retried until it
/// held: what was published to them meanwhile never arrived.
async fn fill_repaired(
    gw: std::sync::Weak<Gateway>,
    mut repaired: mpsc::UnboundedReceiver<RouteKey>,
) {
    while let Some(key) = repaired.recv().await {
        let Some(gw) = gw.upgrade() else { return };
        let stream = Stream::of_route_key(&key);
        gw.sessions.mark_stale(&stream);
        gw.schedule_fill(stream, Duration::ZERO);
    }
}
