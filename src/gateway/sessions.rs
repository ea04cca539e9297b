//! The gateway's local view: which sessions it holds, whose they are, which
//! channels they receive, and the ids each one was recently shown.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use serde_json::Value;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;

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

#[derive(Debug)]
struct Session {
    user: String,
    socket: SocketRef,
    channels: HashSet<String>,
    /// Channels joined while the session was live, with the membership's
    /// start: older channel messages still in flight are not shown, so the
    /// catch-up (which starts there) and the live stream stay in order.
    joined: HashMap<String, i64>,
    recent: RecentIds,
    /// `Some` until the client has seen `connect`: what was routed to the
    /// session meanwhile waits here, so nothing routed after the bind is
    /// lost in the gap before the session is live.
    pending: Option<Vec<Emit>>,
    added: std::time::Instant,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<Sid, Session>,
    by_user: HashMap<String, HashSet<Sid>>,
    by_channel: HashMap<String, HashSet<Sid>>,
}

/// The registry. A std mutex: every section is a few map operations and
/// none awaits.
#[derive(Debug)]
pub struct Sessions {
    inner: Mutex<Inner>,
    window: usize,
}

/// The outcome of emitting to sessions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EmitCount {
    /// Sessions the event was written to (or queued for, if pending).
    pub emitted: u64,
    /// Sessions that had already been shown this id.
    pub duplicates: u64,
    /// Sessions whose socket refused the write (closed or buffer full).
    pub failed: u64,
}

impl Sessions {
    /// An empty registry whose sessions remember `window` ids each.
    pub fn new(window: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            window,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a session that is not yet live (see [`Sessions::activate`]).
    pub fn add_pending(&self, socket: SocketRef, user: &str, channels: &[String]) {
        let mut g = self.lock();
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
                recent: RecentIds::new(self.window),
                pending: Some(Vec::new()),
                added: std::time::Instant::now(),
            },
        );
    }

    /// Marks a session live and emits what was routed to it meanwhile.
    pub fn activate(&self, sid: Sid) -> EmitCount {
        let mut g = self.lock();
        let mut count = EmitCount::default();
        if let Some(s) = g.sessions.get_mut(&sid) {
            for e in s.pending.take().unwrap_or_default() {
                if s.socket.emit(e.event, &e.data).is_ok() {
                    count.emitted += 1;
                } else {
                    count.failed += 1;
                }
            }
        }
        count
    }

    /// Removes a session; returns its user and channels if it was there.
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
        Some((s.user, s.channels.into_iter().collect()))
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
    /// channel messages created from `since` on; returns those sessions
    /// (each now needs one reference to the channel key).
    pub fn join_channel(&self, user: &str, channel: &str, since: i64) -> Vec<Sid> {
        let mut g = self.lock();
        let sids = user_sids(&g, user);
        let mut joined = Vec::new();
        for sid in sids {
            if let Some(s) = g.sessions.get_mut(&sid) {
                if s.channels.insert(channel.to_owned()) {
                    s.joined.insert(channel.to_owned(), since);
                    joined.push(sid);
                }
            }
        }
        for sid in &joined {
            g.by_channel
                .entry(channel.to_owned())
                .or_default()
                .insert(*sid);
        }
        joined
    }

    /// Removes `channel` from every session of `user`; returns those that
    /// had it (each gives back one reference to the channel key).
    pub fn leave_channel(&self, user: &str, channel: &str) -> Vec<Sid> {
        let mut g = self.lock();
        let sids = user_sids(&g, user);
        let mut left = Vec::new();
        for sid in sids {
            if let Some(s) = g.sessions.get_mut(&sid) {
                if s.channels.remove(channel) {
                    s.joined.remove(channel);
                    left.push(sid);
                }
            }
        }
        if let Some(set) = g.by_channel.get_mut(channel) {
            for sid in &left {
                set.remove(sid);
            }
            if set.is_empty() {
                g.by_channel.remove(channel);
            }
        }
        left
    }

    /// Emits to every session of `user`.
    pub fn emit_to_user(&self, user: &str, e: &Emit) -> (EmitCount, Vec<SocketRef>) {
        let mut g = self.lock();
        let sids = user_sids(&g, user);
        emit_to(&mut g, &sids, e)
    }

    /// Emits to every session that receives `channel`, except sessions
    /// that joined it after the message was created.
    pub fn emit_to_channel(&self, channel: &str, e: &Emit) -> (EmitCount, Vec<SocketRef>) {
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
        emit_to(&mut g, &sids, e)
    }

    /// Emits to the given sessions of `user` (a catch-up after a join).
    pub fn emit_to_sessions(&self, sids: &[Sid], e: &Emit) -> (EmitCount, Vec<SocketRef>) {
        let mut g = self.lock();
        emit_to(&mut g, sids, e)
    }

    /// Sessions whose end was never signalled: still pending long after
    /// their handshake (the connect packet could not be sent), or no longer
    /// connected though live. The caller ends them.
    pub fn stale(&self, pending_for: std::time::Duration) -> Vec<SocketRef> {
        let g = self.lock();
        g.sessions
            .values()
            .filter(|s| match s.pending {
                Some(_) => s.added.elapsed() > pending_for,
                None => !s.socket.connected(),
            })
            .map(|s| s.socket.clone())
            .collect()
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
/// never pass each other. Returns the sockets whose write failed; the
/// caller disconnects them (a client too slow to drain its buffer is cut
/// off rather than silently missing messages).
fn emit_to(g: &mut Inner, sids: &[Sid], e: &Emit) -> (EmitCount, Vec<SocketRef>) {
    let mut count = EmitCount::default();
    let mut failed = Vec::new();
    for sid in sids {
        let Some(s) = g.sessions.get_mut(sid) else {
            continue;
        };
        if !s.recent.insert(&e.id) {
            count.duplicates += 1;
            continue;
        }
        match &mut s.pending {
            Some(queue) => {
                queue.push(e.clone());
                count.emitted += 1;
            }
            None => {
                if s.socket.emit(e.event, &e.data).is_ok() {
                    count.emitted += 1;
                } else {
                    count.failed += 1;
                    failed.push(s.socket.clone());
                }
            }
        }
    }
    (count, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

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
