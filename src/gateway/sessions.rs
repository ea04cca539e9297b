//! The gateway's local view: which sessions it holds, whose they are, and
//! where each one stands in each stream it receives; and the one way out
//! to them: entries are offered to a stream's sessions ([`Sessions::offer`]),
//! and each session emits them strictly in position order.
//!
//! # Gap-free sessions
//!
//! Every session keeps, per stream (its inbox, each of its channels), the
//! last position it was shown (`last`). An entry at `last + 1` is emitted,
//! then whatever waited right behind it; an entry at or below `last` is
//! dropped (a redelivery, or one a fill already showed); an entry further
//! ahead waits (`ahead`) while the gateway reads the missing positions from
//! the store ([`Follow::Fill`], after a short wait in case they are only
//! late). Nothing is ever emitted out of order or twice, whatever the
//! broker lost or repeated.
//!
//! Membership changes take effect at their position: a session emits its
//! user's own removal from a channel as that channel's last entry and
//! drops the stream there (also when only the inbox copy arrived: the
//! channel stream is then read up to the removal); an inbox entry that
//! adds the user to a channel opens that channel's stream at the entry
//! that added them ([`Follow::Join`]: bind, then fill).
//!
//! A session holds every entry (emits nothing) from its handshake until it
//! is live, and through a resume's replay ([`Sessions::replay`]), so the
//! replay comes before any live entry and the seam has no duplicate.
//!
//! Slow clients: a session whose Engine.IO buffer is full
//! (`limits.send_buffer`), or that holds more entries than that, is cut
//! off: nothing more is written to it and it is disconnected. Dropping only
//! the event that did not fit would leave a silent gap in its stream;
//! cutting it off leaves a gap-free prefix, and the client resumes from
//! there on reconnect.
//!
//! A session ends through [`Sessions::end`], which gives its keys back to
//! [`Routes`]; the sweeper ([`Sessions::spawn_sweeper`]) ends the sessions
//! whose end was never signalled.

use std::collections::{BTreeMap, HashMap, HashSet};
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
use crate::stream::{Body, Change, Entry, Membership, Stream};

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

/// An entry with its client event, made once for all the sessions it
/// reaches.
#[derive(Debug)]
pub struct Item {
    /// The entry.
    pub entry: Entry,
    event: &'static str,
    data: Value,
}

impl Item {
    /// Wraps an entry, building its client event.
    pub fn new(entry: Entry) -> Arc<Self> {
        let (event, data) = entry.to_event();
        Arc::new(Self { entry, event, data })
    }

    fn seq(&self) -> i64 {
        self.entry.seq
    }

    /// The client event: its name and payload.
    pub fn event(&self) -> (&'static str, &Value) {
        (self.event, &self.data)
    }
}

/// Work a change of sessions asks of the gateway, done off the registry
/// lock: reads, binds and unbinds await.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Follow {
    /// Some session of this stream misses positions, or must reach the end
    /// of a channel it was removed from: read the stream from the store.
    Fill(Stream),
    /// A session was added to a channel: bind it, then fill.
    Join {
        /// The session.
        sid: Sid,
        /// The channel.
        channel: String,
    },
    /// A session stopped receiving a stream: give back its reference.
    Release(RouteKey),
}

/// Where one session starts in one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The stream.
    pub stream: Stream,
    /// The last position the session has (the head, or a resume's position).
    pub last: i64,
    /// For a channel the user was removed from: the removal's position,
    /// where the stream ends for this session.
    pub ends_at: Option<i64>,
    /// Whether the handshake takes a reference to its route key (not for a
    /// channel the user was removed from: it is only read from the store).
    pub bound: bool,
}

impl StreamStart {
    /// A stream the session follows live from `last` on.
    pub fn live(stream: Stream, last: i64) -> Self {
        StreamStart {
            stream,
            last,
            ends_at: None,
            bound: true,
        }
    }
}

/// One stream of a resume's replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayStream {
    /// The stream.
    pub stream: Stream,
    /// Replay the entries after this position.
    pub from: i64,
    /// More entries were missing than the gateway replays: `from` was moved
    /// up to the newest `replay_limit` ones, and the client is told.
    pub incomplete: bool,
}

#[derive(Debug, Default)]
struct Cursor {
    /// The last position emitted (or given at start).
    last: i64,
    /// Entries beyond `last + 1`, waiting for the ones before them.
    ahead: BTreeMap<i64, Arc<Item>>,
    /// The user's removal from this channel: its last entry here.
    ends_at: Option<i64>,
    /// The user was added again at this position after `ends_at`: the
    /// stream goes on from there instead of ending.
    rejoin_at: Option<i64>,
    /// The bind of a channel just joined is in flight: entries wait.
    joining: bool,
    /// Whether this session holds a reference to the stream's route key.
    holds_route: bool,
    /// The stream may miss entries with no gap to show it (just joined, or
    /// its key was bound again): the next fill reads it.
    stale: bool,
}

/// Where a session's events go.
#[derive(Debug)]
enum Outbox {
    /// The client has not seen `connect` yet.
    Pending,
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
    streams: HashMap<Stream, Cursor>,
    /// Entries are kept, not emitted: until the session is live, and
    /// through a resume's replay.
    hold: bool,
    /// A resume's replay, taken when the session goes live.
    replay: Option<Vec<ReplayStream>>,
    /// Entries kept in every `ahead` together.
    kept: usize,
    outbox: Outbox,
    /// Tokio's clock, so that the sweeper's timing can be tested on a
    /// paused one.
    added: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<Sid, Session>,
    by_stream: HashMap<Stream, HashSet<Sid>>,
}

impl Inner {
    fn index(&mut self, sid: Sid, stream: &Stream) {
        self.by_stream
            .entry(stream.clone())
            .or_default()
            .insert(sid);
    }

    fn unindex(&mut self, sid: Sid, stream: &Stream) {
        if let Some(set) = self.by_stream.get_mut(stream) {
            set.remove(&sid);
            if set.is_empty() {
                self.by_stream.remove(stream);
            }
        }
    }

    fn sids(&self, stream: &Stream) -> Vec<Sid> {
        self.by_stream
            .get(stream)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// The registry. A std mutex: every section is map operations and socket
/// writes, and none awaits.
#[derive(Debug)]
pub struct Sessions {
    inner: Mutex<Inner>,
    /// Most entries one session keeps waiting, and most events it may have
    /// unwritten (`limits.send_buffer`).
    cap: usize,
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

/// What offering entries came to.
#[derive(Debug, Default)]
struct Out {
    /// Entries written to sockets.
    emitted: u64,
    /// Entries a session already had.
    duplicates: u64,
    /// Entries that came before an earlier position of their stream.
    early: u64,
    /// Sessions whose socket was closed.
    failed: u64,
    /// Sessions cut off as slow clients.
    cut_off: u64,
    /// Sockets to disconnect once the lock is released.
    close: Vec<SocketRef>,
    follows: Vec<Follow>,
    /// Streams a session started or stopped receiving (index updates).
    opened: Vec<(Sid, Stream)>,
    closed: Vec<(Sid, Stream)>,
}

impl Out {
    fn fill(&mut self, stream: &Stream) {
        let f = Follow::Fill(stream.clone());
        if !self.follows.contains(&f) {
            self.follows.push(f);
        }
    }
}

/// Where a session's emitted entries go: its socket, or a list a resume's
/// replay writes at its own pace.
enum Sink<'a> {
    Socket,
    Collect(&'a mut Vec<Arc<Item>>),
}

impl Session {
    /// Offers one entry of `stream` (see the module doc).
    fn offer(&mut self, sid: Sid, stream: &Stream, item: &Arc<Item>, cap: usize, out: &mut Out) {
        if matches!(self.outbox, Outbox::CutOff) {
            return;
        }
        let hold = self.hold;
        let Some(cur) = self.streams.get_mut(stream) else {
            return;
        };
        let seq = item.seq();
        if seq <= cur.last {
            out.duplicates += 1;
            return;
        }
        if hold || cur.joining || seq != cur.last + 1 {
            if cur.ends_at.is_some_and(|end| seq > end) && cur.rejoin_at.is_none_or(|r| seq < r) {
                // Past the user's removal: never theirs to see.
                return;
            }
            if cur.ahead.insert(seq, item.clone()).is_none() {
                self.kept += 1;
            }
            if !hold && !cur.joining {
                out.early += 1;
                out.fill(stream);
            }
            if self.kept > cap {
                self.cut(out);
            }
            return;
        }
        self.run(sid, stream, Some(item.clone()), &mut Sink::Socket, out);
    }

    /// Emits `first` (at `last + 1`), then every entry waiting right
    /// behind it, applying each one's effect at its position.
    fn run(
        &mut self,
        sid: Sid,
        stream: &Stream,
        mut next: Option<Arc<Item>>,
        sink: &mut Sink<'_>,
        out: &mut Out,
    ) {
        loop {
            let Some(cur) = self.streams.get_mut(stream) else {
                return;
            };
            let item = match next.take() {
                Some(item) => item,
                None => match cur.ahead.remove(&(cur.last + 1)) {
                    Some(item) => {
                        self.kept -= 1;
                        item
                    }
                    None => {
                        if !cur.ahead.is_empty() && !self.hold {
                            out.fill(stream);
                        }
                        return;
                    }
                },
            };
            cur.last = item.seq();
            match sink {
                Sink::Collect(list) => list.push(item.clone()),
                Sink::Socket => self.write(&item, out),
            }
            if matches!(self.outbox, Outbox::CutOff) {
                return;
            }
            self.apply(sid, stream, &item, out);
        }
    }

    /// The effect of an entry just emitted at its position.
    fn apply(&mut self, sid: Sid, stream: &Stream, item: &Item, out: &mut Out) {
        let seq = item.seq();
        let own = match &item.entry.body {
            Body::Membership(m) if m.user_id == self.user => Some(m),
            _ => None,
        };
        match stream {
            Stream::Channel(_) => {
                let Some(cur) = self.streams.get_mut(stream) else {
                    return;
                };
                let removed_here = own.is_some_and(|m| m.change == Change::Removed);
                if !(removed_here || cur.ends_at == Some(seq)) {
                    return;
                }
                if let Some(again) = cur.rejoin_at.take() {
                    // Removed, then added again: the entries between the
                    // two are not the user's to see.
                    cur.ends_at = None;
                    cur.last = again - 1;
                    let before = cur.ahead.len();
                    cur.ahead = cur.ahead.split_off(&again);
                    self.kept -= before - cur.ahead.len();
                    return;
                }
                if let Some(cur) = self.streams.remove(stream) {
                    self.kept -= cur.ahead.len();
                    if cur.holds_route {
                        out.follows.push(Follow::Release(stream.route_key()));
                    }
                }
                out.closed.push((sid, stream.clone()));
            }
            Stream::Inbox(_) => {
                if let Some(m) = own {
                    self.apply_membership(sid, m, out);
                }
            }
        }
    }

    /// An inbox entry about one of the user's memberships.
    fn apply_membership(&mut self, sid: Sid, m: &Membership, out: &mut Out) {
        let channel = Stream::Channel(m.channel_id.clone());
        match (m.change, self.streams.get_mut(&channel)) {
            (Change::Added, None) => {
                self.streams.insert(
                    channel.clone(),
                    Cursor {
                        last: m.channel_seq - 1,
                        joining: true,
                        ..Cursor::default()
                    },
                );
                out.opened.push((sid, channel));
                out.follows.push(Follow::Join {
                    sid,
                    channel: m.channel_id.clone(),
                });
            }
            (Change::Added, Some(cur)) => {
                if cur.ends_at.is_some_and(|end| end < m.channel_seq) {
                    cur.rejoin_at = Some(m.channel_seq);
                }
            }
            (Change::Removed, Some(cur)) if cur.last < m.channel_seq => {
                // The channel's own copy of the removal may have been lost:
                // read the stream up to it, and not a position further.
                cur.ends_at = Some(m.channel_seq);
                cur.rejoin_at = None;
                let before = cur.ahead.len();
                cur.ahead.retain(|seq, _| *seq <= m.channel_seq);
                self.kept -= before - cur.ahead.len();
                if !cur.joining {
                    out.fill(&channel);
                }
            }
            (Change::Removed, _) => {}
        }
    }

    /// Writes one event to the socket, cutting the session off if its
    /// buffer is full.
    fn write(&mut self, item: &Item, out: &mut Out) {
        if !matches!(self.outbox, Outbox::Live) {
            // Only a held session is not live, and it writes nothing.
            return;
        }
        match self.socket.emit(item.event, &item.data) {
            Ok(()) => out.emitted += 1,
            Err(SendError::Socket(SocketError::InternalChannelFull)) => self.cut(out),
            Err(_) => {
                out.failed += 1;
                out.close.push(self.socket.clone());
            }
        }
    }

    /// Cuts the session off as a slow client (see the module doc).
    fn cut(&mut self, out: &mut Out) {
        let live = matches!(self.outbox, Outbox::Live);
        if matches!(self.outbox, Outbox::CutOff) {
            return;
        }
        self.outbox = Outbox::CutOff;
        for cur in self.streams.values_mut() {
            cur.ahead.clear();
        }
        self.kept = 0;
        out.cut_off += 1;
        // A pending session cut off is disconnected once it is live (see
        // [`Sessions::activate`]), not in the middle of its handshake.
        if live {
            out.close.push(self.socket.clone());
        }
    }

    /// Lets every stream go on from where it stands once the hold ends.
    fn release_hold(&mut self, sid: Sid, out: &mut Out) {
        self.hold = false;
        let streams: Vec<Stream> = self.streams.keys().cloned().collect();
        for stream in streams {
            let joining = self.streams.get(&stream).is_some_and(|c| c.joining);
            if !joining {
                self.run(sid, &stream, None, &mut Sink::Socket, out);
            }
        }
    }
}

impl Sessions {
    /// An empty registry whose sessions may keep or leave unwritten at most
    /// `cap` events each, and of which one user may have at most
    /// `max_per_user`; ended sessions give their keys back to `routes`,
    /// and emits are counted in `metrics`.
    pub fn new(
        cap: usize,
        max_per_user: usize,
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            cap,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many sessions `user` has here.
    fn count_of(g: &Inner, user: &str) -> usize {
        g.by_stream
            .get(&Stream::Inbox(user.to_owned()))
            .map_or(0, HashSet::len)
    }

    /// Whether `user` may open one more session (a hint for refusing early;
    /// [`Sessions::add_pending`] decides).
    pub fn has_room_for(&self, user: &str) -> bool {
        Self::count_of(&self.lock(), user) < self.max_per_user
    }

    /// Adds a session that is not yet live (see [`Sessions::activate`]),
    /// holding its entries, with where it starts in each stream (its inbox
    /// first) and the replay of a resume, unless the user already has the
    /// most sessions allowed: counted and added under one lock, so
    /// concurrent handshakes cannot overshoot.
    pub fn add_pending(
        &self,
        socket: SocketRef,
        user: &str,
        starts: Vec<StreamStart>,
        replay: Option<Vec<ReplayStream>>,
    ) -> Result<(), TooManyConnections> {
        let mut g = self.lock();
        if Self::count_of(&g, user) >= self.max_per_user {
            return Err(TooManyConnections);
        }
        let sid = socket.id;
        let mut streams = HashMap::with_capacity(starts.len() + 1);
        for s in starts {
            g.index(sid, &s.stream);
            streams.insert(
                s.stream,
                Cursor {
                    last: s.last,
                    ends_at: s.ends_at,
                    holds_route: s.bound,
                    ..Cursor::default()
                },
            );
        }
        let inbox = Stream::Inbox(user.to_owned());
        g.index(sid, &inbox);
        streams.entry(inbox).or_default();
        g.sessions.insert(
            sid,
            Session {
                user: user.to_owned(),
                socket,
                streams,
                hold: true,
                replay,
                kept: 0,
                outbox: Outbox::Pending,
                added: Instant::now(),
            },
        );
        Ok(())
    }

    /// Moves a pending session's streams up to the given heads (read after
    /// its binds); what it holds at or below them is dropped: it was
    /// committed before the session connected.
    pub fn raise(&self, sid: Sid, heads: &HashMap<Stream, i64>) {
        let mut g = self.lock();
        let Some(s) = g.sessions.get_mut(&sid) else {
            return;
        };
        for (stream, &head) in heads {
            if let Some(cur) = s.streams.get_mut(stream) {
                if cur.last < head {
                    cur.last = head;
                    let before = cur.ahead.len();
                    cur.ahead = cur.ahead.split_off(&(head + 1));
                    s.kept -= before - cur.ahead.len();
                }
            }
        }
    }

    /// Marks a session live. Without a resume, its streams go on at once
    /// (what arrived meanwhile is emitted or filled); with one, the replay
    /// is returned, and the session keeps holding until
    /// [`Sessions::finish_replay`].
    pub fn activate(&self, sid: Sid) -> (Option<Vec<ReplayStream>>, Vec<Follow>) {
        let mut out = Out::default();
        let replay = {
            let mut g = self.lock();
            let Some(s) = g.sessions.get_mut(&sid) else {
                return (None, Vec::new());
            };
            match s.outbox {
                // Its queue overflowed while pending: cut off before it
                // went live.
                Outbox::CutOff => out.close.push(s.socket.clone()),
                Outbox::Pending => s.outbox = Outbox::Live,
                Outbox::Live => {}
            }
            let replay = s.replay.take();
            if replay.is_none() && s.hold {
                s.release_hold(sid, &mut out);
            }
            let replay = replay.filter(|_| matches!(s.outbox, Outbox::Live));
            Self::reindex(&mut g, &out);
            replay
        };
        (replay, self.account(out))
    }

    /// Applies a resume's replay: the stored entries of each stream after
    /// its `from`, in order, through the same rules as live entries.
    /// Returns what to write (the caller writes it at the socket's pace,
    /// then sends `RESUMED` and calls [`Sessions::finish_replay`]).
    pub fn replay(
        &self,
        sid: Sid,
        batches: Vec<(Stream, i64, Vec<Arc<Item>>)>,
    ) -> (Vec<Arc<Item>>, Vec<Follow>) {
        let mut out = Out::default();
        let mut written = Vec::new();
        {
            let mut g = self.lock();
            let Some(s) = g.sessions.get_mut(&sid) else {
                return (written, Vec::new());
            };
            for (stream, from, items) in batches {
                let Some(cur) = s.streams.get_mut(&stream) else {
                    continue;
                };
                if cur.last < from {
                    // An incomplete stream jumps to its newest entries.
                    cur.last = from;
                    let before = cur.ahead.len();
                    cur.ahead = cur.ahead.split_off(&(from + 1));
                    s.kept -= before - cur.ahead.len();
                }
                for item in items {
                    let Some(cur) = s.streams.get(&stream) else {
                        break;
                    };
                    if item.seq() != cur.last + 1 {
                        continue;
                    }
                    s.run(
                        sid,
                        &stream,
                        Some(item),
                        &mut Sink::Collect(&mut written),
                        &mut out,
                    );
                }
            }
            Self::reindex(&mut g, &out);
        }
        (written, self.account(out))
    }

    /// Ends a resume's replay: what arrived meanwhile is emitted after it.
    pub fn finish_replay(&self, sid: Sid) -> Vec<Follow> {
        let mut out = Out::default();
        {
            let mut g = self.lock();
            if let Some(s) = g.sessions.get_mut(&sid) {
                s.release_hold(sid, &mut out);
            }
            Self::reindex(&mut g, &out);
        }
        self.account(out)
    }

    /// The socket of a session, if it is still here and not cut off.
    pub fn socket(&self, sid: Sid) -> Option<SocketRef> {
        let g = self.lock();
        g.sessions
            .get(&sid)
            .filter(|s| !matches!(s.outbox, Outbox::CutOff))
            .map(|s| s.socket.clone())
    }

    /// Offers an entry to every local session of its stream.
    pub fn offer(&self, item: &Arc<Item>) -> Vec<Follow> {
        let stream = &item.entry.stream;
        let mut out = Out::default();
        {
            let mut g = self.lock();
            for sid in g.sids(stream) {
                if let Some(s) = g.sessions.get_mut(&sid) {
                    s.offer(sid, stream, item, self.cap, &mut out);
                }
            }
            Self::reindex(&mut g, &out);
        }
        self.account(out)
    }

    /// Where a read of `stream` must start to fill its sessions: the lowest
    /// position among those that wait on it (every session of the stream
    /// if `all`: after a route loss or a bind, a lost tail shows no gap).
    /// `None` if no session needs it.
    pub fn fill_from(&self, stream: &Stream, all: bool) -> Option<i64> {
        let g = self.lock();
        g.by_stream
            .get(stream)?
            .iter()
            .filter_map(|sid| {
                let s = g.sessions.get(sid)?;
                if s.hold || matches!(s.outbox, Outbox::CutOff) {
                    return None;
                }
                let cur = s.streams.get(stream)?;
                let waits = !cur.ahead.is_empty() || cur.ends_at.is_some() || cur.stale;
                (!cur.joining && (all || waits)).then_some(cur.last)
            })
            .min()
    }

    /// Offers entries read from the store (in order, from a
    /// [`Sessions::fill_from`] position) to the stream's sessions; returns
    /// how many were emitted, and the follow-ups.
    pub fn fill(&self, stream: &Stream, items: &[Arc<Item>]) -> (u64, Vec<Follow>) {
        let mut out = Out::default();
        {
            let mut g = self.lock();
            for sid in g.sids(stream) {
                let Some(s) = g.sessions.get_mut(&sid) else {
                    continue;
                };
                match s.streams.get_mut(stream) {
                    Some(cur) if !s.hold && !cur.joining => cur.stale = false,
                    _ => continue,
                }
                for item in items {
                    s.offer(sid, stream, item, self.cap, &mut out);
                }
            }
            Self::reindex(&mut g, &out);
        }
        let emitted = out.emitted;
        (emitted, self.account(out))
    }

    /// Whether a session still waits for the bind of `channel` it joined.
    pub fn is_joining(&self, sid: Sid, channel: &str) -> bool {
        let g = self.lock();
        g.sessions
            .get(&sid)
            .and_then(|s| s.streams.get(&Stream::Channel(channel.to_owned())))
            .is_some_and(|c| c.joining)
    }

    /// The bind of a joined channel holds: the session now owns that
    /// reference. `false` if it no longer wants it (ended, or removed
    /// meanwhile); the caller gives the reference back.
    pub fn joined(&self, sid: Sid, channel: &str) -> bool {
        let mut g = self.lock();
        let Some(cur) = g
            .sessions
            .get_mut(&sid)
            .and_then(|s| s.streams.get_mut(&Stream::Channel(channel.to_owned())))
        else {
            return false;
        };
        if !cur.joining {
            return false;
        }
        cur.joining = false;
        cur.holds_route = true;
        cur.stale = true;
        true
    }

    /// Marks every session of `stream` as possibly missing entries with no
    /// gap to show it (its key was bound again after a loss), so that the
    /// next fill reads it for them.
    pub fn mark_stale(&self, stream: &Stream) {
        let mut g = self.lock();
        for sid in g.sids(stream) {
            if let Some(cur) = g
                .sessions
                .get_mut(&sid)
                .and_then(|s| s.streams.get_mut(stream))
            {
                cur.stale = true;
            }
        }
    }

    /// Every stream some local session receives.
    pub fn streams(&self) -> Vec<Stream> {
        self.lock().by_stream.keys().cloned().collect()
    }

    fn reindex(g: &mut Inner, out: &Out) {
        for (sid, stream) in &out.opened {
            g.index(*sid, stream);
        }
        for (sid, stream) in &out.closed {
            g.unindex(*sid, stream);
        }
    }

    /// Counts what offering came to, disconnects the sessions it found
    /// closed or cut off, and returns the follow-ups.
    fn account(&self, out: Out) -> Vec<Follow> {
        self.metrics.deliveries.inc_by(out.emitted);
        self.metrics.duplicates_dropped.inc_by(out.duplicates);
        self.metrics.entries_early.inc_by(out.early);
        self.metrics.slow_client_disconnects.inc_by(out.cut_off);
        if out.cut_off > 0 {
            self.metrics.slow_client_drops.inc_by(out.cut_off);
            tracing::warn!(
                sessions = out.cut_off,
                "slow clients: send buffer full or too much kept; disconnecting them"
            );
        }
        for s in out.close {
            disconnect(s);
        }
        out.follows
    }

    /// Cuts a session off as a slow client because `what` (an ack) did
    /// not fit in its send buffer, and disconnects it.
    pub fn cut_off(&self, sid: Sid, what: &str) {
        self.metrics.slow_client_drops.inc();
        let mut out = Out::default();
        if let Some(s) = self.lock().sessions.get_mut(&sid) {
            s.cut(&mut out);
        }
        if out.cut_off > 0 {
            tracing::warn!(%sid, "slow client: no room for {what}; disconnecting it");
        }
        self.metrics.slow_client_disconnects.inc_by(out.cut_off);
        for s in out.close {
            disconnect(s);
        }
    }

    /// Ends a session: forgets it and gives its keys back to the routes
    /// (unless shutdown has started). Idempotent: the disconnect handler
    /// and the sweeper may both end one session.
    pub async fn end(&self, sid: Sid) {
        let Some(keys) = self.remove(sid) else {
            return;
        };
        self.metrics.sessions.dec();
        if self.is_shutting_down() {
            // deregister_server removes every route in bulk.
            return;
        }
        for k in keys {
            if let Err(e) = self.routes.release(&k).await {
                tracing::warn!(key = %k, error = %e, "cannot unbind; the route stays until the gateway deregisters");
            }
        }
    }

    /// Removes a session without giving its keys back (the handshake that
    /// failed to bind them gives back what it took); returns the route keys
    /// it holds a reference to, if it was there.
    pub fn remove(&self, sid: Sid) -> Option<Vec<RouteKey>> {
        let mut g = self.lock();
        let s = g.sessions.remove(&sid)?;
        let mut keys = Vec::with_capacity(s.streams.len());
        for (stream, cur) in s.streams {
            g.unindex(sid, &stream);
            // A channel still joining holds no reference yet; its join
            // task gives back the one it takes.
            if cur.holds_route {
                keys.push(stream.route_key());
            }
        }
        Some(keys)
    }

    /// Whether the user's sessions here receive `channel`.
    pub fn user_in_channel(&self, user: &str, channel: &str) -> bool {
        let g = self.lock();
        let stream = Stream::Channel(channel.to_owned());
        g.sids(&Stream::Inbox(user.to_owned()))
            .iter()
            .filter_map(|sid| g.sessions.get(sid))
            .any(|s| s.streams.contains_key(&stream))
    }

    /// Sessions whose end was never signalled: still pending long after
    /// their handshake (the connect packet could not be sent), or no longer
    /// connected though live.
    fn stale(&self, pending_for: Duration) -> Vec<Sid> {
        let g = self.lock();
        g.sessions
            .values()
            .filter(|s| match s.outbox {
                Outbox::Pending => s.added.elapsed() > pending_for,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Message, Target};
    use crate::stream::Membership;
    use fanout_backend::{DynBackend, ServerId, ServerStream};
    use socketioxide::SocketIo;
    use tokio::sync::mpsc;

    type Packets = mpsc::Receiver<engineioxide::Packet>;

    /// A connected socket without a server or a client: socketioxide's
    /// hidden `__test_harness` feature (a dev-dependency feature only),
    /// with what it writes. The last value keeps its pipes open; drop it
    /// with the socket.
    async fn dummy_socket() -> (SocketRef, Packets, Box<dyn std::any::Any + Send>) {
        let (svc, io) = SocketIo::new_svc();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        io.ns("/", move |s: SocketRef| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(s);
            }
        });
        let (to_server, packets) = io.new_dummy_sock("/", ()).await;
        let s = rx.recv().await.expect("the dummy socket connects");
        (s, packets, Box::new((svc, io, to_server)))
    }

    /// The events written so far, as `(name, stream, seq)`.
    async fn events(packets: &mut Packets) -> Vec<(String, String, i64)> {
        let mut out = Vec::new();
        // The dummy socket's pipe forwards packets from a task of its own.
        let quiet = Duration::from_millis(50);
        while let Ok(Some(p)) = tokio::time::timeout(quiet, packets.recv()).await {
            let engineioxide::Packet::Message(text) = p else {
                continue;
            };
            // A Socket.IO EVENT packet (type 2; Engine.IO's own type is
            // not part of the dummy pipe's text).
            let Some(json) = text.strip_prefix('2') else {
                continue;
            };
            let v: Value = serde_json::from_str(json).expect("an event array");
            out.push((
                v[0].as_str().unwrap_or_default().to_owned(),
                v[1]["stream"].as_str().unwrap_or_default().to_owned(),
                v[1]["seq"].as_i64().unwrap_or(-1),
            ));
        }
        out
    }

    async fn seqs(packets: &mut Packets, stream: &str) -> Vec<i64> {
        events(packets)
            .await
            .into_iter()
            .filter(|(_, s, _)| s == stream)
            .map(|(_, _, seq)| seq)
            .collect()
    }

    fn inbox() -> Stream {
        Stream::Inbox("alice".into())
    }

    fn general() -> Stream {
        Stream::Channel("general".into())
    }

    fn message(stream: &Stream, seq: i64) -> Arc<Item> {
        let target = match stream {
            Stream::Inbox(_) => Target::User("alice".into()),
            Stream::Channel(c) => Target::Channel(c.clone()),
        };
        Item::new(Entry {
            stream: stream.clone(),
            seq,
            body: Body::Message(Message {
                id: format!("m{seq}"),
                sender_id: "bob".into(),
                target,
                content: "x".into(),
                client_msg_id: None,
                created_at: 0,
            }),
        })
    }

    /// Alice added to or removed from `general` at `channel_seq`, in
    /// `stream` at `seq`.
    fn change(stream: &Stream, seq: i64, change: Change, channel_seq: i64) -> Arc<Item> {
        Item::new(Entry {
            stream: stream.clone(),
            seq,
            body: Body::Membership(Membership {
                channel_id: "general".into(),
                user_id: "alice".into(),
                change,
                by_user_id: "carol".into(),
                created_at: 0,
                channel_seq,
            }),
        })
    }

    /// A registry on a memory backend holding one session of alice, as
    /// her handshake leaves it: pending, her key bound, counted.
    struct OneSession {
        sessions: Arc<Sessions>,
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
        socket: SocketRef,
        packets: Packets,
        _open: (ServerStream, Box<dyn std::any::Any + Send>),
    }

    async fn one_session() -> OneSession {
        session_in(vec![]).await
    }

    /// Alice's session starting at position 10 of her inbox and of each of
    /// `channels`.
    async fn session_in(channels: Vec<Stream>) -> OneSession {
        let backend: DynBackend = Arc::new(fanout_memory::MemoryBackend::default());
        let server = ServerId::new("gw").expect("valid");
        let stream = backend.register_server(&server).await.expect("register");
        let metrics = Arc::new(Metrics::new());
        let (tx, _) = mpsc::unbounded_channel();
        let routes = Arc::new(Routes::new(
            backend,
            server,
            super::super::routes::RouteMetrics::of(&metrics),
            tx,
        ));
        let sessions = Arc::new(Sessions::new(8, 8, routes.clone(), metrics.clone()));
        let (socket, packets, pipes) = dummy_socket().await;
        let mut starts = vec![StreamStart {
            stream: inbox(),
            last: 10,
            ends_at: None,
            bound: true,
        }];
        starts.extend(channels.into_iter().map(|stream| StreamStart {
            stream,
            last: 10,
            ends_at: None,
            bound: true,
        }));
        for s in &starts {
            routes.acquire(&s.stream.route_key()).await.expect("bind");
        }
        sessions
            .add_pending(socket.clone(), "alice", starts, None)
            .expect("room");
        metrics.sessions.inc();
        OneSession {
            sessions,
            routes,
            metrics,
            socket,
            packets,
            _open: (stream, pipes),
        }
    }

    #[tokio::test]
    async fn entries_are_shown_in_position_order_once_and_a_gap_asks_for_a_fill() {
        let mut t = session_in(vec![]).await;
        assert!(t.sessions.offer(&message(&inbox(), 11)).is_empty());
        let (replay, follows) = t.sessions.activate(t.socket.id);
        assert!(replay.is_none() && follows.is_empty());
        assert_eq!(seqs(&mut t.packets, "inbox").await, [11], "held until live");
        assert!(t.sessions.offer(&message(&inbox(), 11)).is_empty());
        assert!(t.sessions.offer(&message(&inbox(), 9)).is_empty());
        assert_eq!(t.metrics.duplicates_dropped.get(), 2);
        assert_eq!(
            t.sessions.offer(&message(&inbox(), 14)),
            [Follow::Fill(inbox())]
        );
        assert_eq!(
            t.sessions.offer(&message(&inbox(), 13)),
            [Follow::Fill(inbox())]
        );
        assert!(
            seqs(&mut t.packets, "inbox").await.is_empty(),
            "13 and 14 wait for 12"
        );
        assert_eq!(t.sessions.fill_from(&inbox(), false), Some(11));
        assert_eq!(t.sessions.offer(&message(&inbox(), 12)), []);
        assert_eq!(seqs(&mut t.packets, "inbox").await, [12, 13, 14]);
        assert_eq!(t.sessions.fill_from(&inbox(), false), None, "nothing waits");
        assert_eq!(t.sessions.fill_from(&inbox(), true), Some(14));
        // A fill that overlaps what was shown shows only what is new.
        let (n, _) = t.sessions.fill(
            &inbox(),
            &[
                message(&inbox(), 13),
                message(&inbox(), 14),
                message(&inbox(), 15),
            ],
        );
        assert_eq!(n, 1);
        assert_eq!(seqs(&mut t.packets, "inbox").await, [15]);
    }

    #[tokio::test]
    async fn a_removal_is_the_last_entry_of_the_channel_even_when_only_the_inbox_copy_arrives() {
        let mut t = session_in(vec![general()]).await;
        t.sessions.activate(t.socket.id);
        t.sessions.offer(&message(&general(), 11));
        // The channel's copy of the removal (at 13) is lost; its inbox
        // copy arrives: the channel is read up to 13, never further.
        let follows = t.sessions.offer(&change(&inbox(), 11, Change::Removed, 13));
        assert_eq!(follows, [Follow::Fill(general())]);
        assert_eq!(t.sessions.fill_from(&general(), false), Some(11));
        t.sessions.offer(&message(&general(), 14));
        let (_, follows) = t.sessions.fill(
            &general(),
            &[
                message(&general(), 12),
                change(&general(), 13, Change::Removed, 13),
                message(&general(), 14),
            ],
        );
        assert_eq!(follows, [Follow::Release(general().route_key())]);
        let shown = events(&mut t.packets).await;
        let channel: Vec<(String, i64)> = shown
            .iter()
            .filter(|(_, s, _)| s == "channel:general")
            .map(|(e, _, q)| (e.clone(), *q))
            .collect();
        assert_eq!(
            channel,
            [
                ("GROUP_MESSAGE_RECEIVE".to_owned(), 11),
                ("GROUP_MESSAGE_RECEIVE".to_owned(), 12),
                ("MEMBERSHIP_CHANGE".to_owned(), 13),
            ]
        );
        assert!(t.sessions.offer(&message(&general(), 15)).is_empty());
        assert!(
            events(&mut t.packets).await.is_empty(),
            "nothing after the removal"
        );
        assert!(!t.sessions.user_in_channel("alice", "general"));
    }

    #[tokio::test]
    async fn the_channel_copy_of_a_removal_ends_the_stream_at_its_position() {
        let mut t = session_in(vec![general()]).await;
        t.sessions.activate(t.socket.id);
        t.sessions.offer(&message(&general(), 13));
        let follows = t
            .sessions
            .offer(&change(&general(), 12, Change::Removed, 12));
        assert_eq!(follows, [Follow::Fill(general())], "11 is missing");
        let (_, follows) = t.sessions.fill(&general(), &[message(&general(), 11)]);
        assert_eq!(follows, [Follow::Release(general().route_key())]);
        assert_eq!(seqs(&mut t.packets, "channel:general").await, [11, 12]);
    }

    #[tokio::test]
    async fn an_addition_opens_the_channel_at_its_entry_after_the_bind() {
        let mut t = session_in(vec![]).await;
        t.sessions.activate(t.socket.id);
        let sid = t.socket.id;
        let follows = t.sessions.offer(&change(&inbox(), 11, Change::Added, 5));
        assert_eq!(
            follows,
            [Follow::Join {
                sid,
                channel: "general".into()
            }]
        );
        assert!(t.sessions.is_joining(sid, "general"));
        // Live entries of the channel wait for the bind and the fill.
        assert!(t.sessions.offer(&message(&general(), 7)).is_empty());
        assert_eq!(t.sessions.fill_from(&general(), true), None, "joining");
        assert!(t.sessions.joined(sid, "general"));
        assert_eq!(t.sessions.fill_from(&general(), true), Some(4));
        t.sessions.fill(
            &general(),
            &[
                change(&general(), 5, Change::Added, 5),
                message(&general(), 6),
            ],
        );
        assert_eq!(seqs(&mut t.packets, "channel:general").await, [5, 6, 7]);
        assert!(!t.sessions.joined(sid, "general"), "joined once");
    }

    #[tokio::test]
    async fn a_replay_comes_before_live_entries_without_a_duplicate_at_the_seam() {
        let mut t = session_in(vec![]).await;
        let sid = t.socket.id;
        t.sessions.remove(sid);
        t.sessions
            .add_pending(
                t.socket.clone(),
                "alice",
                vec![StreamStart {
                    stream: inbox(),
                    last: 10,
                    ends_at: None,
                    bound: true,
                }],
                Some(vec![ReplayStream {
                    stream: inbox(),
                    from: 10,
                    incomplete: false,
                }]),
            )
            .expect("room");
        t.sessions.offer(&message(&inbox(), 13));
        let (replay, _) = t.sessions.activate(sid);
        assert_eq!(replay.map(|r| r.len()), Some(1));
        t.sessions.offer(&message(&inbox(), 14));
        assert!(
            events(&mut t.packets).await.is_empty(),
            "held through the replay"
        );
        let (written, _) = t.sessions.replay(
            sid,
            vec![(
                inbox(),
                10,
                vec![
                    message(&inbox(), 11),
                    message(&inbox(), 12),
                    message(&inbox(), 13),
                ],
            )],
        );
        let written: Vec<i64> = written.iter().map(|i| i.seq()).collect();
        assert_eq!(
            written,
            [11, 12, 13, 14],
            "what waited contiguously joins the replay"
        );
        assert!(
            events(&mut t.packets).await.is_empty(),
            "the caller writes the replay"
        );
        t.sessions.offer(&message(&inbox(), 15));
        t.sessions.finish_replay(sid);
        assert_eq!(seqs(&mut t.packets, "inbox").await, [15]);
    }

    #[tokio::test]
    async fn a_session_keeping_more_than_its_buffer_is_cut_off() {
        let mut t = session_in(vec![]).await;
        t.sessions.activate(t.socket.id);
        for seq in 12..=20 {
            t.sessions.offer(&message(&inbox(), seq));
        }
        assert_eq!(t.metrics.slow_client_disconnects.get(), 1);
        t.sessions.offer(&message(&inbox(), 11));
        assert!(
            seqs(&mut t.packets, "inbox").await.is_empty(),
            "cut off: nothing more"
        );
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
}
