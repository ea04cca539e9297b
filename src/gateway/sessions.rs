//! The gateway's local view: which sessions it holds, whose they are, which
//! channels they receive, and the ids each one was recently shown; and the
//! one way out to them: [`Sessions::emit`] writes an event to the local
//! sockets a route key reaches, counts what that came to, and disconnects
//! the slow clients it found. A session ends through [`Sessions::end`],
//! which gives its keys back to [`Routes`]; the sweeper
//! ([`Sessions::spawn_sweeper`]) ends the sessions whose end was never
//! signalled.
//!
//! Slow clients: a session whose Engine.IO buffer is full
//! (`limits.send_buffer`) is cut off: nothing more is written to it and it
//! is disconnected. Dropping only the event that did not fit would leave a
//! silent gap in the middle of its stream; cutting it off leaves a gap-free
//! prefix, and the disconnect tells the client to reconnect and read the
//! rest from history.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout_backend::RouteKey;
use serde_json::Value;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use socketioxide::{SendError, SocketError};
use tokio::time::Instant;

use super::Routes;
use crate::metrics::Metrics;

/// How often sessions whose end was never signalled are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How long a session may stay pending (handshake done, `connect` not
/// sent) before the sweeper ends it.
const PENDING_FOR: Duration = Duration::from_secs(30);
/// How often a slow client's disconnect is retried while its buffer is full.
const CLOSE_RETRY_EVERY: Duration = Duration::from_millis(50);
/// How long it is retried. Engine.IO's heartbeat closes a client that reads
/// nothing at all at its next ping (every 25 s), so this need not be longer.
const CLOSE_RETRY_FOR: Duration = Duration::from_secs(60);

/// The last `capacity` message ids shown to one session, so that a message
/// delivered twice (at-least-once redelivery, a retry, a catch-up racing a
/// live delivery) is shown once.
#[derive(Debug)]
pub struct RecentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
    capacity: usize,
}

impl RecentIds {
    /// An empty window of `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records `id`; `false` if it was already in the window.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id.to_owned());
        self.set.insert(id.to_owned());
        true
    }
}

/// What an emit to a session needs.
#[derive(Debug, Clone)]
pub struct Emit {
    /// Event name.
    pub event: &'static str,
    /// Message id, for the duplicate window.
    pub id: String,
    /// Event payload.
    pub data: Value,
    /// The message's `createdAt`, ms.
    pub created_at: i64,
}

/// Where a session's events go.
#[derive(Debug)]
enum Outbox {
    /// The client has not seen `connect` yet: what is routed to the session
    /// meanwhile waits here (at most `limits.send_buffer` events), so
    /// nothing routed after the bind is lost before the session is live.
    Pending(Vec<Emit>),
    /// Events are written to the socket.
    Live,
    /// A slow client (see the module doc): nothing more is written; the
    /// session waits for its disconnect.
    CutOff,
}

#[derive(Debug)]
struct Session {
    user: String,
    socket: SocketRef,
    channels: HashSet<String>,
    /// Channels joined while the session was live, with the membership's
    /// start: older channel messages still in flight are not shown, so the
    /// catch-up (which starts there) and the live stream stay in order.
    joined: HashMap<String, i64>,
    /// Channels joined whose bind and catch-up are still running (off the
    /// delivery loop), by join ticket: live channel messages wait here and
    /// follow the catch-up, so the session sees the conversation in order.
    /// The join task owns these channels' key references.
    catching_up: HashMap<String, (u64, Vec<Emit>)>,
    recent: RecentIds,
    outbox: Outbox,
    /// Tokio's clock, so that the sweeper's timing can be tested on a
    /// paused one.
    added: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<Sid, Session>,
    by_user: HashMap<String, HashSet<Sid>>,
    by_channel: HashMap<String, HashSet<Sid>>,
    next_ticket: u64,
}

/// One session's part in a join whose bind and catch-up run off the
/// delivery loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinTicket {
    /// The session.
    pub sid: Sid,
    /// Tells this join apart from a later one of the same channel.
    pub ticket: u64,
    /// Channel messages created from here on are shown to it.
    pub since: i64,
}

/// The registry. A std mutex: every section is a few map operations and
/// none awaits.
#[derive(Debug)]
pub struct Sessions {
    inner: Mutex<Inner>,
    window: usize,
    pending_cap: usize,
    max_per_user: usize,
    /// Where an ended session's keys go back.
    routes: Arc<Routes>,
    /// Where emits and slow clients are counted.
    metrics: Arc<Metrics>,
    /// Set when shutdown starts: sessions that end then leave their keys to
    /// the bulk `deregister_server`.
    shutting_down: AtomicBool,
}

/// A handshake refused because the user already has
/// `limits.max_connections_per_user` sessions here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many connections of one user")]
pub struct TooManyConnections;

/// The outcome of emitting to sessions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EmitCount {
    /// Sessions the event was written to (or queued for, if pending).
    pub emitted: u64,
    /// Sessions that had already been shown this id.
    pub duplicates: u64,
    /// Sessions whose socket was closed.
    pub failed: u64,
    /// Events not written because the session's buffer was full or it had
    /// been cut off as a slow client.
    pub dropped: u64,
    /// Sessions cut off as slow clients by this emit.
    pub cut_off: u64,
}

impl EmitCount {
    fn add(&mut self, other: EmitCount) {
        self.emitted += other.emitted;
        self.duplicates += other.duplicates;
        self.failed += other.failed;
        self.dropped += other.dropped;
        self.cut_off += other.cut_off;
    }
}

/// What one write to a live socket came to.
enum Written {
    Ok,
    Full,
    Closed,
}

fn write(socket: &SocketRef, e: &Emit) -> Written {
    match socket.emit(e.event, &e.data) {
        Ok(()) => Written::Ok,
        Err(SendError::Socket(SocketError::InternalChannelFull)) => Written::Full,
        Err(_) => Written::Closed,
    }
}

impl Sessions {
    /// An empty registry whose sessions remember `window` ids each, hold
    /// at most `pending_cap` events before they are live, and of which one
    /// user may have at most `max_per_user`; ended sessions give their keys
    /// back to `routes`, and emits are counted in `metrics`.
    pub fn new(
        window: usize,
        pending_cap: usize,
        max_per_user: usize,
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            window,
            pending_cap,
            max_per_user,
            routes,
            metrics,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Marks the start of shutdown: sessions ending from now on keep their
    /// keys (the gateway's deregistration removes them all at once).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has started.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Whether `user` may open one more session (a hint for refusing early;
    /// [`Sessions::add_pending`] decides).
    pub fn has_room_for(&self, user: &str) -> bool {
        self.lock().by_user.get(user).map_or(0, HashSet::len) < self.max_per_user
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a session that is not yet live (see [`Sessions::activate`]),
    /// unless the user already has the most sessions allowed: counted and
    /// added under one lock, so concurrent handshakes cannot overshoot.
    pub fn add_pending(
        &self,
        socket: SocketRef,
        user: &str,
        channels: &[String],
    ) -> Result<(), TooManyConnections> {
        let mut g = self.lock();
        if g.by_user.get(user).map_or(0, HashSet::len) >= self.max_per_user {
            return Err(TooManyConnections);
        }
        let sid = socket.id;
        g.by_user.entry(user.to_owned()).or_default().insert(sid);
        for c in channels {
            g.by_channel.entry(c.clone()).or_default().insert(sid);
        }
        g.sessions.insert(
            sid,
            Session {
                user: user.to_owned(),
                socket,
                channels: channels.iter().cloned().collect(),
                joined: HashMap::new(),
                catching_up: HashMap::new(),
                recent: RecentIds::new(self.window),
                outbox: Outbox::Pending(Vec::new()),
                added: Instant::now(),
            },
        );
        Ok(())
    }

    /// Marks a session live and emits what was routed to it meanwhile,
    /// disconnecting it if it turned out a slow client.
    pub fn activate(&self, sid: Sid) {
        let (count, close) = self.activate_locked(sid);
        self.account(count, close.into_iter().collect());
    }

    fn activate_locked(&self, sid: Sid) -> (EmitCount, Option<SocketRef>) {
        let mut g = self.lock();
        let mut count = EmitCount::default();
        let Some(s) = g.sessions.get_mut(&sid) else {
            return (count, None);
        };
        let queued = match std::mem::replace(&mut s.outbox, Outbox::Live) {
            Outbox::Pending(queued) => queued,
            // Its pending queue overflowed: cut off before it went live.
            Outbox::CutOff => {
                s.outbox = Outbox::CutOff;
                return (count, Some(s.socket.clone()));
            }
            Outbox::Live => Vec::new(),
        };
        for e in &queued {
            count.add(deliver(s, e, usize::MAX));
        }
        let close = (count.cut_off + count.failed > 0).then(|| s.socket.clone());
        (count, close)
    }

    /// Cuts a session off as a slow client because `what` (an ack) did
    /// not fit in its send buffer, and disconnects it.
    pub fn cut_off(&self, sid: Sid, what: &str) {
        self.metrics.slow_client_drops.inc();
        if let Some(s) = self.cut_off_locked(sid) {
            self.metrics.slow_client_disconnects.inc();
            tracing::warn!(%sid, "slow client: no room for {what}; disconnecting it");
            disconnect(s);
        }
    }

    /// Marks a session cut off; its socket to disconnect if it was not
    /// cut off yet.
    fn cut_off_locked(&self, sid: Sid) -> Option<SocketRef> {
        let mut g = self.lock();
        let s = g.sessions.get_mut(&sid)?;
        if matches!(s.outbox, Outbox::CutOff) {
            return None;
        }
        s.outbox = Outbox::CutOff;
        Some(s.socket.clone())
    }

    /// Ends a session: forgets it and gives its keys back to the routes
    /// (unless shutdown has started). Idempotent: the disconnect handler
    /// and the sweeper may both end one session.
    pub async fn end(&self, sid: Sid) {
        let Some((user, channels)) = self.remove(sid) else {
            return;
        };
        self.metrics.sessions.dec();
        if self.is_shutting_down() {
            // deregister_server removes every route in bulk.
            return;
        }
        let mut keys = vec![RouteKey::User(user.clone())];
        keys.extend(channels.into_iter().map(RouteKey::Channel));
        for k in keys {
            if let Err(e) = self.routes.release(&k).await {
                tracing::warn!(%user, key = %k, error = %e, "cannot unbind; the route stays until the gateway deregisters");
            }
        }
    }

    /// Removes a session without giving its keys back (the handshake that
    /// failed to bind them gives back what it took); returns its user and
    /// the channels it holds a reference to, if it was there.
    pub fn remove(&self, sid: Sid) -> Option<(String, Vec<String>)> {
        let mut g = self.lock();
        let s = g.sessions.remove(&sid)?;
        if let Some(set) = g.by_user.get_mut(&s.user) {
            set.remove(&sid);
            if set.is_empty() {
                g.by_user.remove(&s.user);
            }
        }
        for c in &s.channels {
            if let Some(set) = g.by_channel.get_mut(c) {
                set.remove(&sid);
                if set.is_empty() {
                    g.by_channel.remove(c);
                }
            }
        }
        // A channel still catching up holds no reference yet; its join
        // task gives back the one it takes.
        let channels = s
            .channels
            .into_iter()
            .filter(|c| !s.catching_up.contains_key(c))
            .collect();
        Some((s.user, channels))
    }

    /// Whether the user's sessions here receive `channel`.
    pub fn user_in_channel(&self, user: &str, channel: &str) -> bool {
        let g = self.lock();
        g.by_user
            .get(user)
            .and_then(|sids| sids.iter().next())
            .and_then(|sid| g.sessions.get(sid))
            .is_some_and(|s| s.channels.contains(channel))
    }

    /// Adds `channel` to every session of `user` that lacks it, showing
    /// channel messages created from `since` on. Those sessions catch up
    /// first: live channel messages wait until [`Sessions::finish_join`].
    /// Returns their tickets; the caller takes one reference to the
    /// channel key for each.
    pub fn join_channel(&self, user: &str, channel: &str, since: i64) -> Vec<JoinTicket> {
        let mut g = self.lock();
        let sids = user_sids(&g, user);
        let mut joined = Vec::new();
        for sid in sids {
            let ticket = g.next_ticket;
            if let Some(s) = g.sessions.get_mut(&sid) {
                if s.channels.insert(channel.to_owned()) {
                    s.joined.insert(channel.to_owned(), since);
                    s.catching_up
                        .insert(channel.to_owned(), (ticket, Vec::new()));
                    joined.push(JoinTicket { sid, ticket, since });
                    g.next_ticket += 1;
                }
            }
        }
        for j in &joined {
            g.by_channel
                .entry(channel.to_owned())
                .or_default()
                .insert(j.sid);
        }
        joined
    }

    /// Ends the catch-up of joins: each session still waiting on its
    /// ticket is shown `catch_up` (from its own start on), then the live
    /// messages that waited, in that order, under one lock; counted, and
    /// slow clients disconnected, as [`Sessions::emit`] does. Returns the
    /// tickets whose session left or ended meanwhile (their key references
    /// go back).
    pub fn finish_join(
        &self,
        channel: &str,
        tickets: &[JoinTicket],
        catch_up: &[Emit],
    ) -> Vec<JoinTicket> {
        let (count, close, gone) = self.finish_join_locked(channel, tickets, catch_up);
        self.account(count, close);
        gone
    }

    fn finish_join_locked(
        &self,
        channel: &str,
        tickets: &[JoinTicket],
        catch_up: &[Emit],
    ) -> (EmitCount, Vec<SocketRef>, Vec<JoinTicket>) {
        let mut g = self.lock();
        let mut count = EmitCount::default();
        let mut close = Vec::new();
        let mut gone = Vec::new();
        for t in tickets {
            let Some(s) = g.sessions.get_mut(&t.sid) else {
                gone.push(*t);
                continue;
            };
            let waited = match s.catching_up.get(channel) {
                Some((ticket, _)) if *ticket == t.ticket => s
                    .catching_up
                    .remove(channel)
                    .map(|(_, w)| w)
                    .unwrap_or_default(),
                _ => {
                    gone.push(*t);
                    continue;
                }
            };
            let live = matches!(s.outbox, Outbox::Live);
            let mut one = EmitCount::default();
            for e in catch_up
                .iter()
                .filter(|e| e.created_at >= t.since)
                .chain(&waited)
            {
                if !s.recent.insert(&e.id) {
                    one.duplicates += 1;
                    continue;
                }
                one.add(deliver(s, e, self.pending_cap));
            }
            if live && one.cut_off + one.failed > 0 {
                close.push(s.socket.clone());
            }
            count.add(one);
        }
        (count, close, gone)
    }

    /// Removes `channel` from every session of `user`; returns those that
    /// had it with a reference to give back (a session still catching up
    /// leaves that to its join task).
    pub fn leave_channel(&self, user: &str, channel: &str) -> Vec<Sid> {
        let mut g = self.lock();
        let sids = user_sids(&g, user);
        let mut left = Vec::new();
        let mut removed = Vec::new();
        for sid in sids {
            if let Some(s) = g.sessions.get_mut(&sid) {
                if s.channels.remove(channel) {
                    s.joined.remove(channel);
                    removed.push(sid);
                    if s.catching_up.remove(channel).is_none() {
                        left.push(sid);
                    }
                }
            }
        }
        if let Some(set) = g.by_channel.get_mut(channel) {
            for sid in &removed {
                set.remove(sid);
            }
            if set.is_empty() {
                g.by_channel.remove(channel);
            }
        }
        left
    }

    /// The channels the sessions of `user` receive (all of them alike).
    pub fn channels_of_user(&self, user: &str) -> HashSet<String> {
        let g = self.lock();
        let mut out = HashSet::new();
        for sid in user_sids(&g, user) {
            if let Some(s) = g.sessions.get(&sid) {
                out.extend(s.channels.iter().cloned());
            }
        }
        out
    }

    /// Users and channels that have a session here: what a catch-up after
    /// a route loss must cover.
    pub fn local_users_and_channels(&self) -> (Vec<String>, Vec<String>) {
        let g = self.lock();
        (
            g.by_user.keys().cloned().collect(),
            g.by_channel.keys().cloned().collect(),
        )
    }

    /// Emits `e` to the local sessions `key` reaches, counts what that
    /// came to, and disconnects the sessions it found closed or cut off as
    /// slow clients. Returns the count (a catch-up reports how many it
    /// showed).
    pub fn emit(&self, key: &RouteKey, e: &Emit) -> EmitCount {
        // The lock is released before disconnecting: a disconnect may run
        // the session's end, which takes it again.
        let (count, close) = match key {
            RouteKey::User(u) => self.emit_to_user(u, e),
            RouteKey::Channel(c) => self.emit_to_channel(c, e),
        };
        self.account(count, close);
        count
    }

    /// Counts what an emit came to and disconnects the sessions it found
    /// closed or cut off as slow clients.
    fn account(&self, count: EmitCount, close: Vec<SocketRef>) {
        self.metrics.deliveries.inc_by(count.emitted);
        self.metrics.duplicates_dropped.inc_by(count.duplicates);
        self.metrics.slow_client_drops.inc_by(count.dropped);
        self.metrics.slow_client_disconnects.inc_by(count.cut_off);
        if count.cut_off > 0 {
            tracing::warn!(
                sessions = count.cut_off,
                "slow clients: send buffer full; disconnecting them"
            );
        }
        for s in close {
            disconnect(s);
        }
    }

    /// Emits to every session of `user`.
    fn emit_to_user(&self, user: &str, e: &Emit) -> (EmitCount, Vec<SocketRef>) {
        let mut g = self.lock();
        let sids = user_sids(&g, user);
        emit_to(&mut g, &sids, e, self.pending_cap)
    }

    /// Emits to every session that receives `channel`, except sessions
    /// that joined it after the message was created; sessions still
    /// catching up on it keep it for [`Sessions::finish_join`].
    fn emit_to_channel(&self, channel: &str, e: &Emit) -> (EmitCount, Vec<SocketRef>) {
        let mut g = self.lock();
        let sids: Vec<Sid> = match g.by_channel.get(channel) {
            None => Vec::new(),
            Some(set) => set
                .iter()
                .copied()
                .filter(|sid| {
                    g.sessions
                        .get(sid)
                        .and_then(|s| s.joined.get(channel))
                        .is_none_or(|since| e.created_at >= *since)
                })
                .collect(),
        };
        let mut now = Vec::with_capacity(sids.len());
        let mut count = EmitCount::default();
        let mut close = Vec::new();
        for sid in sids {
            let Some(s) = g.sessions.get_mut(&sid) else {
                continue;
            };
            let Some((_, waiting)) = s.catching_up.get_mut(channel) else {
                now.push(sid);
                continue;
            };
            if waiting.len() < self.pending_cap {
                // Counted when shown, in finish_join.
                waiting.push(e.clone());
                continue;
            }
            // A catch-up that long behind a busy channel: a slow client,
            // cut off like one (see the module doc).
            count.dropped += 1;
            if !matches!(s.outbox, Outbox::CutOff) {
                let live = matches!(s.outbox, Outbox::Live);
                s.outbox = Outbox::CutOff;
                count.cut_off += 1;
                if live {
                    close.push(s.socket.clone());
                }
            }
        }
        let (more, more_close) = emit_to(&mut g, &now, e, self.pending_cap);
        count.add(more);
        close.extend(more_close);
        (count, close)
    }

    /// Sessions whose end was never signalled: still pending long after
    /// their handshake (the connect packet could not be sent), or no longer
    /// connected though live.
    fn stale(&self, pending_for: Duration) -> Vec<Sid> {
        let g = self.lock();
        g.sessions
            .values()
            .filter(|s| match s.outbox {
                Outbox::Pending(_) => s.added.elapsed() > pending_for,
                Outbox::Live | Outbox::CutOff => !s.socket.connected(),
            })
            .map(|s| s.socket.id)
            .collect()
    }

    /// Ends the sessions whose end socketioxide never signalled.
    async fn sweep(&self) {
        for sid in self.stale(PENDING_FOR) {
            tracing::info!(%sid, "ending a session whose disconnect was not signalled");
            self.end(sid).await;
        }
    }

    /// Every [`SWEEP_EVERY`], until `owner` is dropped: runs `round` on it
    /// (the gateway forgets idle users' rate buckets there), then ends the
    /// sessions `round` returns whose end was never signalled.
    pub fn spawn_sweeper<T: Send + Sync + 'static>(
        owner: &Arc<T>,
        round: fn(&T) -> &Sessions,
    ) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(owner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let Some(owner) = weak.upgrade() else { return };
                round(&owner).sweep().await;
            }
        })
    }

    /// How many sessions are held.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn user_sids(g: &Inner, user: &str) -> Vec<Sid> {
    g.by_user
        .get(user)
        .map(|s| s.iter().copied().collect())
        .unwrap_or_default()
}

/// Emits under the registry lock, so two deliveries to one session can
/// never pass each other. Returns the sockets to disconnect: closed ones,
/// and slow clients this emit cut off (see the module doc).
fn emit_to(
    g: &mut Inner,
    sids: &[Sid],
    e: &Emit,
    pending_cap: usize,
) -> (EmitCount, Vec<SocketRef>) {
    let mut count = EmitCount::default();
    let mut close = Vec::new();
    for sid in sids {
        let Some(s) = g.sessions.get_mut(sid) else {
            continue;
        };
        if !s.recent.insert(&e.id) {
            count.duplicates += 1;
            continue;
        }
        // A pending session cut off is disconnected once it is live
        // (see [`Sessions::activate`]), not in the middle of its handshake.
        let live = matches!(s.outbox, Outbox::Live);
        let one = deliver(s, e, pending_cap);
        if live && one.cut_off + one.failed > 0 {
            close.push(s.socket.clone());
        }
        count.add(one);
    }
    (count, close)
}

/// Disconnects a session. socketioxide 0.18 refuses to disconnect a socket
/// whose buffer is full (the disconnect packet needs a slot, and nothing
/// else closes it from outside), so this retries until a slot frees; a
/// client that reads nothing at all is closed by Engine.IO's heartbeat
/// instead, whose ping then finds the buffer full.
fn disconnect(s: SocketRef) {
    if !matches!(
        s.clone().disconnect(),
        Err(SocketError::InternalChannelFull)
    ) {
        return;
    }
    tokio::spawn(async move {
        let deadline = Instant::now() + CLOSE_RETRY_FOR;
        while s.connected() && Instant::now() < deadline {
            tokio::time::sleep(CLOSE_RETRY_EVERY).await;
            if !matches!(
                s.clone().disconnect(),
                Err(SocketError::InternalChannelFull)
            ) {
                return;
            }
        }
    });
}

/// Writes one event to one session, or queues it while the session is
/// pending, cutting the session off when its buffer or queue is full.
fn deliver(s: &mut Session, e: &Emit, pending_cap: usize) -> EmitCount {
    let mut count = EmitCount::default();
    match &mut s.outbox {
        Outbox::CutOff => count.dropped += 1,
        Outbox::Pending(queue) if queue.len() >= pending_cap => {
            s.outbox = Outbox::CutOff;
            count.dropped += 1;
            count.cut_off += 1;
        }
        Outbox::Pending(queue) => {
            queue.push(e.clone());
            count.emitted += 1;
        }
        Outbox::Live => match write(&s.socket, e) {
            Written::Ok => count.emitted += 1,
            Written::Full => {
                s.outbox = Outbox::CutOff;
                count.dropped += 1;
                count.cut_off += 1;
            }
            Written::Closed => count.failed += 1,
        },
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_backend::{DynBackend, ServerId, ServerStream};
    use socketioxide::SocketIo;

    /// A connected socket without a server or a client: socketioxide's
    /// hidden `__test_harness` feature (a dev-dependency feature only).
    /// The second value keeps its pipes open; drop it with the socket.
    async fn dummy_socket() -> (SocketRef, Box<dyn std::any::Any + Send>) {
        let (svc, io) = SocketIo::new_svc();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        io.ns("/", move |s: SocketRef| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(s);
            }
        });
        let pipes = io.new_dummy_sock("/", ()).await;
        let s = rx.recv().await.expect("the dummy socket connects");
        (s, Box::new((svc, io, pipes)))
    }

    /// A registry on a memory backend holding one session of alice, as
    /// her handshake leaves it: pending, her key bound, counted.
    struct OneSession {
        sessions: Arc<Sessions>,
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
        socket: SocketRef,
        _open: (ServerStream, Box<dyn std::any::Any + Send>),
    }

    async fn one_session() -> OneSession {
        let backend: DynBackend = Arc::new(fanout_memory::MemoryBackend::default());
        let server = ServerId::new("gw").expect("valid");
        let stream = backend.register_server(&server).await.expect("register");
        let metrics = Arc::new(Metrics::new());
        let routes = Arc::new(Routes::new(backend, server, metrics.bound_keys.clone()));
        let sessions = Arc::new(Sessions::new(8, 8, 8, routes.clone(), metrics.clone()));
        let (socket, pipes) = dummy_socket().await;
        sessions
            .add_pending(socket.clone(), "alice", &[])
            .expect("room");
        routes
            .acquire(&RouteKey::user("alice").expect("valid"))
            .await
            .expect("bind");
        metrics.sessions.inc();
        OneSession {
            sessions,
            routes,
            metrics,
            socket,
            _open: (stream, pipes),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_ends_a_session_left_pending_at_its_first_round_after_30_s() {
        let t = one_session().await;
        let started = Instant::now();
        let sweeper = Sessions::spawn_sweeper(&t.sessions, |s| s);
        assert_eq!(t.metrics.bound_keys.get(), 1);
        // Rounds at 0, 5, ..., 30 s find it not older than 30 s; 35 s does.
        tokio::time::sleep_until(started + Duration::from_millis(34_999)).await;
        assert_eq!(t.sessions.len(), 1, "still pending within its 30 s");
        tokio::time::sleep_until(started + Duration::from_millis(35_001)).await;
        assert!(t.sessions.is_empty(), "ended at the 35 s round");
        assert_eq!(t.routes.bound(), 0, "its key went back");
        assert_eq!(t.metrics.bound_keys.get(), 0, "and the gauge says so");
        assert_eq!(t.metrics.sessions.get(), 0);
        sweeper.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_leaves_a_live_session_alone_and_ends_it_one_round_after_it_closed() {
        let t = one_session().await;
        t.sessions.activate(t.socket.id);
        let sweeper = Sessions::spawn_sweeper(&t.sessions, |s| s);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            t.sessions.len(),
            1,
            "a connected live session is never swept"
        );
        // Closed without its end being signalled to the registry.
        t.socket.clone().disconnect().expect("disconnect");
        tokio::time::sleep(SWEEP_EVERY + Duration::from_millis(1)).await;
        assert!(t.sessions.is_empty(), "ended within one round");
        assert_eq!(t.metrics.bound_keys.get(), 0);
        sweeper.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_ended_during_shutdown_keeps_its_keys_for_the_bulk_deregistration() {
        let t = one_session().await;
        t.sessions.begin_shutdown();
        t.sessions.end(t.socket.id).await;
        t.sessions.end(t.socket.id).await;
        assert!(t.sessions.is_empty());
        assert_eq!(t.metrics.sessions.get(), 0, "ended once, counted once");
        assert_eq!(t.routes.bound(), 1);
    }

    #[test]
    fn window_drops_repeats_and_forgets_old_ids() {
        let mut w = RecentIds::new(2);
        assert!(w.insert("a"));
        assert!(!w.insert("a"));
        assert!(w.insert("b"));
        assert!(w.insert("c"));
        assert!(w.insert("a"), "a fell out of a window of two");
    }
}
