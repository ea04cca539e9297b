//! The clients of a fault run and the bookkeeping that accounts for every
//! message afterwards.
//!
//! Each user behaves like a stock Socket.IO client with retries: one
//! connection at a time, re-established on another gateway when it drops;
//! sends go out one after another from a queue (socket.io-client's
//! `retries` mode), each repeated with the same `clientMsgId` until it is
//! acked. Every event received is recorded with the session it came on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use fanout::auth::Tokens;

use super::FaultError;

/// Longer than a gateway takes to answer a send in any fault (broker
/// timeout plus a database lookup that waits for the pool).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_START: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// A delivery later than this after the message was composed is late.
pub const LATE: Duration = Duration::from_secs(1);
/// A recipient whose session was down within this long after a message
/// reached the other recipients counts as offline for it: a message the
/// gateway was writing when it died is lost with the session, not online.
pub const SESSION_GRACE: Duration = Duration::from_secs(1);

/// Where a message goes.
#[derive(Debug, Clone, Copy)]
pub enum Dest {
    /// A user, by index.
    User(usize),
    /// A channel, by index.
    Channel(usize),
}

/// One message a user composed, and what became of its sends.
#[derive(Debug, Clone)]
pub struct SendRecord {
    /// Sender, by index.
    pub sender: usize,
    /// Its `clientMsgId`.
    pub cmid: String,
    /// Target.
    pub dest: Dest,
    /// When it was composed (the user pressed "send").
    pub composed: Instant,
    /// Sends made (1 when the first one was acked).
    pub attempts: u32,
    /// When and with which id it was acked.
    pub acked: Option<(Instant, String)>,
    /// Why earlier attempts failed, in order (`timeout`, `closed`, codes).
    pub failures: Vec<String>,
    /// Refused `not_member` after its sender was removed from the channel
    /// on purpose (`removed_while_disconnected`): not a message of the run.
    pub withdrawn: bool,
}

/// One event received.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// Receiving user.
    pub user: usize,
    /// The connection it came on (unique over the run).
    pub session: u64,
    /// `senderId`.
    pub sender: String,
    /// `clientMsgId` (empty when absent).
    pub cmid: String,
    /// Message `id`.
    pub id: String,
    /// Arrival.
    pub at: Instant,
    /// The event's name (`MESSAGE_RECEIVE`, `GROUP_MESSAGE_RECEIVE`,
    /// `MEMBERSHIP_CHANGE`).
    pub event: String,
    /// Its `stream`.
    pub stream: String,
    /// Its `seq` (0 when absent).
    pub seq: u64,
    /// For `MEMBERSHIP_CHANGE`: `userId` and `change`.
    pub change: Option<(String, String)>,
}

impl Receipt {
    /// A chat message (as opposed to a membership change).
    pub fn is_message(&self) -> bool {
        self.event != "MEMBERSHIP_CHANGE"
    }
}

/// A member removed from a channel during the run.
#[derive(Debug, Clone, Copy)]
pub struct Removal {
    /// The removed user, by index.
    pub user: usize,
    /// The channel, by index.
    pub channel: usize,
    /// When the DELETE was sent: channel messages acked before are due to
    /// the removed user; later ones are decided by position.
    pub requested: Instant,
}

/// A user of the run.
#[derive(Debug)]
pub struct User {
    /// User id.
    pub name: String,
    /// Gateway it connects to first.
    pub home: usize,
    /// Its 1:1 partner.
    pub partner: usize,
    /// Its channel.
    pub channel: usize,
    client: watch::Sender<Option<Arc<Client>>>,
    /// Intervals without a session: `(lost, re-established)`.
    pub offline: Mutex<Vec<(Instant, Option<Instant>)>>,
}

/// A channel of the run.
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    /// Channel id.
    pub id: String,
    /// Members, by user index.
    pub members: Vec<usize>,
}

/// All clients of one run.
#[derive(Debug)]
pub struct Traffic {
    urls: Vec<String>,
    tokens: Tokens,
    /// The users.
    pub users: Vec<User>,
    /// The channels.
    pub channels: Vec<ChannelSpec>,
    sends: Mutex<Vec<SendRecord>>,
    /// Each user's send queue, once sending started.
    queues: Mutex<Vec<mpsc::UnboundedSender<usize>>>,
    receipts: Mutex<Vec<Receipt>>,
    next_session: AtomicU64,
    reconnects: AtomicU64,
    /// Every message goes to the sender's channel (a busy channel).
    all_to_channel: bool,
    /// Members removed during the run.
    removals: Mutex<Vec<Removal>>,
    /// Ends the connections.
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Traffic {
    /// `users` users spread round-robin over `urls`, paired with their
    /// neighbour (always on another gateway), and `channels` channels whose
    /// members span every gateway.
    #[cfg(test)]
    pub fn new(urls: Vec<String>, tokens: Tokens, users: usize, channels: usize) -> Arc<Traffic> {
        Traffic::with_mix(urls, tokens, users, channels, false)
    }

    /// As [`Traffic::new`]; with `all_to_channel` every message goes to
    /// the sender's channel (none to the partner).
    pub fn with_mix(
        urls: Vec<String>,
        tokens: Tokens,
        users: usize,
        channels: usize,
        all_to_channel: bool,
    ) -> Arc<Traffic> {
        let users = users.max(2).div_ceil(2) * 2;
        let channels = channels.max(1);
        let gateways = urls.len().max(1);
        // Runs of `gateways` consecutive users (one per gateway) go to
        // the channels in turn, so every channel has members everywhere.
        let channel_of = |i: usize| (i / gateways) % channels;
        let channel_specs = (0..channels)
            .map(|c| ChannelSpec {
                id: format!("g{c}"),
                members: (0..users).filter(|&i| channel_of(i) == c).collect(),
            })
            .collect();
        Arc::new(Traffic {
            users: (0..users)
                .map(|i| User {
                    name: format!("u{i:02}"),
                    home: i % gateways,
                    partner: i ^ 1,
                    channel: channel_of(i),
                    client: watch::channel(None).0,
                    offline: Mutex::new(Vec::new()),
                })
                .collect(),
            channels: channel_specs,
            urls,
            tokens,
            sends: Mutex::new(Vec::new()),
            queues: Mutex::new(Vec::new()),
            receipts: Mutex::new(Vec::new()),
            next_session: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            all_to_channel,
            removals: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
        })
    }

    /// A token for user `u`.
    pub fn token(&self, u: usize) -> Result<String, FaultError> {
        self.tokens
            .mint(&self.users[u].name, 3600)
            .map_err(|e| FaultError::Client(format!("minting a token: {e}")))
    }

    /// Starts every user's connection and waits until all are connected.
    pub async fn connect_all(self: &Arc<Self>) -> Result<(), FaultError> {
        let mut tokens = Vec::with_capacity(self.users.len());
        for u in 0..self.users.len() {
            tokens.push(self.token(u)?);
        }
        for (u, token) in tokens.into_iter().enumerate() {
            tokio::spawn(self.clone().connection(u, token));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.users.iter().any(|u| u.client.borrow().is_none()) {
            if Instant::now() > deadline {
                return Err(FaultError::Client(
                    "not every user connected within 30 s; see the gateways' logs".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Closes every connection.
    pub fn close(&self) {
        self.stop.cancel();
    }

    /// Sessions re-established after a loss.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Messages acked so far.
    pub fn acked_count(&self) -> u64 {
        lock(&self.sends)
            .iter()
            .filter(|s| s.acked.is_some())
            .count() as u64
    }

    /// Receipts so far.
    pub fn receipt_count(&self) -> usize {
        lock(&self.receipts).len()
    }

    /// Records that `user` is being removed from `channel` now: from here
    /// on it composes nothing more to it.
    pub fn removing(&self, user: usize, channel: usize) {
        lock(&self.removals).push(Removal {
            user,
            channel,
            requested: Instant::now(),
        });
    }

    /// Members removed so far.
    pub fn removals(&self) -> Vec<Removal> {
        lock(&self.removals).clone()
    }

    fn is_removed(&self, user: usize, channel: usize) -> bool {
        lock(&self.removals)
            .iter()
            .any(|r| r.user == user && r.channel == channel)
    }

    /// Every event received so far, in arrival order per session.
    pub fn receipts(&self) -> Vec<Receipt> {
        lock(&self.receipts).clone()
    }

    /// One user's connection: connect (home gateway first, then the
    /// others in turn), record what arrives, and on loss go again.
    async fn connection(self: Arc<Self>, u: usize, token: String) {
        let auth = json!({ "token": token });
        let mut gw = self.users[u].home;
        let mut connected_before = false;
        loop {
            let client = loop {
                if self.stop.is_cancelled() {
                    return;
                }
                let attempt = tokio::time::timeout(
                    Duration::from_secs(5),
                    Client::connect(&self.urls[gw], auth.clone()),
                );
                match attempt.await {
                    Ok(Ok(c)) => break Arc::new(c),
                    // Refused (gateway gone) or `unavailable` (its database
                    // is): try the next gateway after a pause, like a
                    // client behind a load balancer.
                    _ => {
                        gw = (gw + 1) % self.urls.len();
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                        }
                    }
                }
            };
            let session = self.next_session.fetch_add(1, Ordering::Relaxed);
            if connected_before {
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                if let Some(last) = lock(&self.users[u].offline).last_mut() {
                    last.1 = Some(Instant::now());
                }
            }
            connected_before = true;
            self.users[u].client.send_replace(Some(client.clone()));
            loop {
                let event = tokio::select! {
                    _ = self.stop.cancelled() => {
                        self.users[u].client.send_replace(None);
                        if let Ok(c) = Arc::try_unwrap(client) {
                            c.close().await;
                        }
                        return;
                    }
                    e = client.next_event(Duration::from_secs(3600)) => e,
                };
                let Ok(e) = event else { break };
                if !matches!(
                    e.name.as_str(),
                    "MESSAGE_RECEIVE" | "GROUP_MESSAGE_RECEIVE" | "MEMBERSHIP_CHANGE"
                ) {
                    continue;
                }
                let field = |k: &str| e.data[k].as_str().unwrap_or_default().to_owned();
                let change =
                    (e.name == "MEMBERSHIP_CHANGE").then(|| (field("userId"), field("change")));
                lock(&self.receipts).push(Receipt {
                    user: u,
                    session,
                    sender: field("senderId"),
                    cmid: field("clientMsgId"),
                    id: field("id"),
                    at: e.at,
                    stream: field("stream"),
                    seq: e.data["seq"].as_u64().unwrap_or(0),
                    change,
                    event: e.name,
                });
            }
            // The connection is gone (gateway killed, or it cut us off).
            lock(&self.users[u].offline).push((Instant::now(), None));
            self.users[u].client.send_replace(None);
            gw = (gw + 1) % self.urls.len();
        }
    }

    /// Starts every user's sending: in all `rate` messages per second, two
    /// in three to the partner, one in three to the user's channel, until
    /// `stop_sending`; then each user works off its queue, retrying, until
    /// it is empty or `give_up`. The handle ends when every queue has.
    pub fn start_sending(
        self: &Arc<Self>,
        rate: f64,
        stop_sending: CancellationToken,
        give_up: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let n = self.users.len();
        let period = Duration::from_secs_f64(n as f64 / rate.max(0.1));
        let mut tasks = Vec::with_capacity(2 * n);
        for u in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            lock(&self.queues).push(tx.clone());
            let offset = period.mul_f64(u as f64 / n as f64);
            tasks.push(tokio::spawn(self.clone().compose(
                u,
                period,
                offset,
                stop_sending.clone(),
                tx,
            )));
            tasks.push(tokio::spawn(self.clone().send_queue(
                u,
                rx,
                give_up.clone(),
            )));
        }
        // A send queue ends when every sender of it is gone: the burst
        // handles go when composing stops.
        let this = self.clone();
        let stopped = stop_sending.clone();
        tokio::spawn(async move {
            stopped.cancelled().await;
            lock(&this.queues).clear();
        });
        tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
        })
    }

    /// Composes `count` messages at once, spread over the users (two in
    /// three to the partner, one in three to the channel), behind whatever
    /// each user's queue holds: a burst that builds a backlog as fast as
    /// the gateways ack. Needs [`Traffic::start_sending`] first.
    pub fn burst(&self, count: usize) {
        let queues = lock(&self.queues).clone();
        if queues.is_empty() {
            return;
        }
        for i in 0..count {
            let u = i % queues.len();
            let user = &self.users[u];
            let dest = if i % 3 == 2 {
                Dest::Channel(user.channel)
            } else {
                Dest::User(user.partner)
            };
            let idx = self.record(u, format!("{}-b{i}", user.name), dest);
            let _ = queues[u].send(idx);
        }
    }

    fn record(&self, sender: usize, cmid: String, dest: Dest) -> usize {
        let mut sends = lock(&self.sends);
        sends.push(SendRecord {
            sender,
            cmid,
            dest,
            composed: Instant::now(),
            attempts: 0,
            acked: None,
            failures: Vec::new(),
            withdrawn: false,
        });
        sends.len() - 1
    }

    async fn compose(
        self: Arc<Self>,
        u: usize,
        period: Duration,
        offset: Duration,
        stop: CancellationToken,
        queue: mpsc::UnboundedSender<usize>,
    ) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let user = &self.users[u];
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            seq += 1;
            let dest = if (self.all_to_channel || seq.is_multiple_of(3))
                && !self.is_removed(u, user.channel)
            {
                Dest::Channel(user.channel)
            } else {
                Dest::User(user.partner)
            };
            let idx = self.record(u, format!("{}-{seq}", user.name), dest);
            if queue.send(idx).is_err() {
                return;
            }
        }
    }

    async fn send_queue(
        self: Arc<Self>,
        u: usize,
        mut queue: mpsc::UnboundedReceiver<usize>,
        give_up: CancellationToken,
    ) {
        while let Some(idx) = queue.recv().await {
            if give_up.is_cancelled() {
                // Composed but never sent: counted as not acked.
                continue;
            }
            self.send_until_acked(u, idx, &give_up).await;
        }
    }

    async fn send_until_acked(&self, u: usize, idx: usize, give_up: &CancellationToken) {
        let payload = {
            let sends = lock(&self.sends);
            let s = &sends[idx];
            let content = format!("fault run {}", s.cmid);
            match s.dest {
                Dest::User(p) => {
                    json!({ "to": self.users[p].name, "content": content, "clientMsgId": s.cmid })
                }
                Dest::Channel(c) => {
                    json!({ "channelId": self.channels[c].id, "content": content, "clientMsgId": s.cmid })
                }
            }
        };
        let mut session = self.users[u].client.subscribe();
        let mut pause = RETRY_START;
        loop {
            let client = loop {
                if let Some(c) = session.borrow_and_update().clone() {
                    break c;
                }
                tokio::select! {
                    _ = give_up.cancelled() => return,
                    r = session.changed() => if r.is_err() { return },
                }
            };
            lock(&self.sends)[idx].attempts += 1;
            let failure = match client.emit_with_ack(fanout::protocol::SEND_MESSAGE, &payload) {
                Err(_) => "closed".to_owned(),
                Ok(ack) => tokio::select! {
                    r = tokio::time::timeout(ACK_TIMEOUT, ack) => match r {
                        Ok(Ok(v)) if v["ok"] == json!(true) => {
                            let id = v["id"].as_str().unwrap_or_default().to_owned();
                            lock(&self.sends)[idx].acked = Some((Instant::now(), id));
                            return;
                        }
                        Ok(Ok(v)) => {
                            let code = v["error"]["code"].as_str().unwrap_or("refused").to_owned();
                            let removed = match lock(&self.sends)[idx].dest {
                                Dest::Channel(c) => self.is_removed(u, c),
                                Dest::User(_) => false,
                            };
                            if code == "not_member" && removed {
                                lock(&self.sends)[idx].withdrawn = true;
                                return;
                            }
                            code
                        }
                        Ok(Err(_)) => "closed".to_owned(),
                        Err(_) => "timeout".to_owned(),
                    },
                    // The session ended under the send: its ack will never
                    // come; send again on the next one.
                    _ = session.changed() => "closed".to_owned(),
                    _ = give_up.cancelled() => return,
                },
            };
            lock(&self.sends)[idx].failures.push(failure);
            tokio::select! {
                _ = give_up.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    /// The first arrival of each message id, at any recipient.
    pub fn first_arrivals(&self) -> HashMap<String, Instant> {
        let mut out: HashMap<String, Instant> = HashMap::new();
        for r in lock(&self.receipts).iter() {
            out.entry(r.id.clone())
                .and_modify(|t| *t = (*t).min(r.at))
                .or_insert(r.at);
        }
        out
    }

    /// Accounts for every message against what the database holds.
    pub fn account(&self, stored: &[StoredRow], fault_at: Instant, now: Instant) -> Accounting {
        let sends: Vec<SendRecord> = lock(&self.sends)
            .iter()
            .filter(|s| !s.withdrawn)
            .cloned()
            .collect();
        let receipts: Vec<Receipt> = lock(&self.receipts)
            .iter()
            .filter(|r| r.is_message())
            .cloned()
            .collect();
        let removals = lock(&self.removals).clone();
        let offline: Vec<Vec<(Instant, Option<Instant>)>> = self
            .users
            .iter()
            .map(|u| lock(&u.offline).clone())
            .collect();
        let mut a = account(
            self, &sends, &receipts, &offline, stored, fault_at, now, &removals,
        );
        let all = lock(&self.receipts).clone();
        a.position_violations = position_violations(&all);
        a
    }
}

/// A stored message, as read back from the database.
#[derive(Debug, Clone)]
pub struct StoredRow {
    /// Message id.
    pub id: String,
    /// Sender.
    pub sender: String,
    /// Its `clientMsgId`.
    pub cmid: Option<String>,
}

/// What the accounting found.
#[derive(Debug, Clone, Default)]
pub struct Accounting {
    pub sent: u64,
    pub acked: u64,
    pub retried: u64,
    pub never_acked: u64,
    pub stored: u64,
    pub acked_not_stored: u64,
    pub stored_not_acked: u64,
    pub ack_id_differs: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub delivered_late: u64,
    pub duplicates: u64,
    /// First arrivals in a session that came after a later message of the
    /// same sender to the same conversation.
    pub reordered: u64,
    pub unknown_deliveries: u64,
    pub not_delivered_online: u64,
    pub not_delivered_offline: u64,
    pub recovery: Option<Duration>,
    /// The longest time a user was without a session (until `now` if it
    /// never got one back).
    pub longest_offline: Duration,
    /// Why sends had to be repeated, with counts.
    pub failures: Vec<(String, u64)>,
    /// Events whose `seq` was not the last one of their stream in their
    /// session plus one (a repeat, a skip, or a step back); the first event
    /// of a stream in a session sets where it starts.
    pub position_violations: u64,
}

/// Per session and stream, every event after the first must be at
/// `last + 1`; counts those that are not. `receipts` in arrival order per
/// session (as recorded).
pub fn position_violations(receipts: &[Receipt]) -> u64 {
    let mut last: HashMap<(u64, &str), u64> = HashMap::new();
    let mut n = 0;
    for r in receipts {
        match last.insert((r.session, r.stream.as_str()), r.seq) {
            Some(prev) if r.seq != prev + 1 => {
                n += 1;
                tracing::warn!(
                    user = r.user,
                    session = r.session,
                    stream = %r.stream,
                    prev,
                    seq = r.seq,
                    event = %r.event,
                    "position violation"
                );
            }
            _ => {}
        }
    }
    n
}

#[allow(clippy::too_many_arguments)]
fn account(
    t: &Traffic,
    sends: &[SendRecord],
    receipts: &[Receipt],
    offline: &[Vec<(Instant, Option<Instant>)>],
    stored: &[StoredRow],
    fault_at: Instant,
    now: Instant,
    removals: &[Removal],
) -> Accounting {
    let mut a = Accounting {
        sent: sends.len() as u64,
        ..Accounting::default()
    };
    let stored_by: HashMap<(&str, &str), &StoredRow> = stored
        .iter()
        .filter_map(|r| Some(((r.sender.as_str(), r.cmid.as_deref()?), r)))
        .collect();
    a.stored = stored.len() as u64;

    // Per (sender, cmid): first arrival per user, last arrival overall;
    // per session: how many times each message arrived.
    let mut first_at: HashMap<(&str, &str), HashMap<usize, Instant>> = HashMap::new();
    let mut last_at: HashMap<(&str, &str), Instant> = HashMap::new();
    let mut per_session: HashMap<(u64, &str, &str), u64> = HashMap::new();
    for r in receipts {
        let key = (r.sender.as_str(), r.cmid.as_str());
        match stored_by.get(&key) {
            Some(row) if row.id == r.id => {}
            // Shown but not stored, or under another id than the stored
            // one: the contract forbids both.
            _ => a.unknown_deliveries += 1,
        }
        *per_session.entry((r.session, key.0, key.1)).or_default() += 1;
        first_at
            .entry(key)
            .or_default()
            .entry(r.user)
            .and_modify(|t| *t = (*t).min(r.at))
            .or_insert(r.at);
        last_at
            .entry(key)
            .and_modify(|t| *t = (*t).max(r.at))
            .or_insert(r.at);
    }
    a.duplicates = per_session.values().map(|n| n - 1).sum();
    a.reordered = reordered(t, sends, receipts);
    a.longest_offline = offline
        .iter()
        .flatten()
        .map(|&(lost, back)| back.unwrap_or(now).saturating_duration_since(lost))
        .max()
        .unwrap_or_default();

    let was_offline = |user: usize, from: Instant, to: Instant| {
        offline[user]
            .iter()
            .any(|&(lost, back)| lost <= to && back.is_none_or(|b| b >= from))
    };

    let mut failures: HashMap<String, u64> = HashMap::new();
    // Messages composed after the fault: (composed, healthy).
    let mut after_fault: Vec<(Instant, bool)> = Vec::new();
    // When the last message the fault disturbed was settled.
    let mut disturbed_until: Option<Instant> = None;
    for s in sends {
        let sender = t.users[s.sender].name.as_str();
        let key = (sender, s.cmid.as_str());
        for f in &s.failures {
            *failures.entry(f.clone()).or_default() += 1;
        }
        if s.acked.is_some() {
            a.acked += 1;
        } else {
            a.never_acked += 1;
        }
        if s.attempts > 1 || s.acked.is_none() {
            a.retried += 1;
        }
        let row = stored_by.get(&key);
        let mut healthy = s.attempts == 1 && s.acked.is_some() && row.is_some();
        // Composed, acked, and shown to every recipient that got it.
        let mut settled = s
            .acked
            .as_ref()
            .map_or(s.composed, |(at, _)| (*at).max(s.composed));
        match (&s.acked, row) {
            (Some(_), None) => a.acked_not_stored += 1,
            (None, Some(_)) => a.stored_not_acked += 1,
            (Some((_, id)), Some(row)) if *id != row.id => a.ack_id_differs += 1,
            _ => {}
        }
        if row.is_some() {
            let recipients: Vec<usize> = match s.dest {
                Dest::User(p) => vec![s.sender, p],
                // A removed member is due the messages acked before the
                // removal was asked for; later ones are judged by position
                // (`FaultResult::after_removal`).
                Dest::Channel(c) => t.channels[c]
                    .members
                    .iter()
                    .copied()
                    .filter(|&m| {
                        !removals.iter().any(|r| {
                            r.user == m
                                && r.channel == c
                                && s.acked.as_ref().is_none_or(|(at, _)| *at >= r.requested)
                        })
                    })
                    .collect(),
            };
            let arrivals = first_at.get(&key);
            // The message's life: from composing until it reached the
            // last recipient that got it (or its ack, or now).
            let end = [
                s.acked.as_ref().map(|(at, _)| *at),
                last_at.get(&key).copied(),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(now);
            for r in recipients {
                a.expected_deliveries += 1;
                match arrivals.and_then(|m| m.get(&r)) {
                    Some(at) => {
                        a.delivered += 1;
                        settled = settled.max(*at);
                        if at.saturating_duration_since(s.composed) > LATE {
                            a.delivered_late += 1;
                            healthy = false;
                        }
                    }
                    None if was_offline(r, s.composed, end + SESSION_GRACE) => {
                        a.not_delivered_offline += 1;
                    }
                    None => {
                        a.not_delivered_online += 1;
                        healthy = false;
                    }
                }
            }
        }
        if s.composed >= fault_at {
            after_fault.push((s.composed, healthy));
        }
        if !healthy && settled >= fault_at {
            disturbed_until = Some(disturbed_until.map_or(settled, |d| d.max(settled)));
        }
    }
    // Recovered once the last disturbed message (not acked at the first
    // send, late, or lost to an online recipient) was settled — provided
    // the messages composed last were all served normally again.
    after_fault.sort_by_key(|(at, _)| *at);
    a.recovery = match after_fault.last() {
        Some((_, false)) => None,
        _ => {
            Some(disturbed_until.map_or(Duration::ZERO, |d| d.saturating_duration_since(fault_at)))
        }
    };
    let mut failures: Vec<(String, u64)> = failures.into_iter().collect();
    failures.sort();
    a.failures = failures;
    a
}

/// Counts, per session, first arrivals older (by composing time) than a
/// message of the same sender to the same conversation shown before them.
/// Each sender composes one message at a time, so composing order is the
/// order its sends were acked in.
fn reordered(t: &Traffic, sends: &[SendRecord], receipts: &[Receipt]) -> u64 {
    let composed: HashMap<(&str, &str), (Instant, DestKey)> = sends
        .iter()
        .map(|s| {
            let dest = match s.dest {
                Dest::User(u) => DestKey::User(u),
                Dest::Channel(c) => DestKey::Channel(c),
            };
            (
                (t.users[s.sender].name.as_str(), s.cmid.as_str()),
                (s.composed, dest),
            )
        })
        .collect();
    let mut arrivals: Vec<&Receipt> = receipts.iter().collect();
    arrivals.sort_by_key(|r| r.at);
    let mut seen: std::collections::HashSet<(u64, &str, &str)> = Default::default();
    let mut newest: HashMap<(u64, &str, DestKey), Instant> = HashMap::new();
    let mut n = 0;
    for r in arrivals {
        if !seen.insert((r.session, r.sender.as_str(), r.cmid.as_str())) {
            continue;
        }
        let Some(&(at, dest)) = composed.get(&(r.sender.as_str(), r.cmid.as_str())) else {
            continue;
        };
        // A 1:1 conversation is the same whichever way it goes: key it by
        // the sender and the other side.
        let newest = newest
            .entry((r.session, r.sender.as_str(), dest))
            .or_insert(at);
        if at < *newest {
            n += 1;
        } else {
            *newest = at;
        }
    }
    n
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DestKey {
    User(usize),
    Channel(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(sender: usize, cmid: &str, dest: Dest, composed: Instant) -> SendRecord {
        SendRecord {
            sender,
            cmid: cmid.into(),
            dest,
            composed,
            attempts: 1,
            acked: Some((composed + Duration::from_millis(5), format!("id-{cmid}"))),
            failures: Vec::new(),
            withdrawn: false,
        }
    }

    fn receipt(user: usize, session: u64, sender: &str, cmid: &str, at: Instant) -> Receipt {
        Receipt {
            user,
            session,
            sender: sender.into(),
            cmid: cmid.into(),
            id: format!("id-{cmid}"),
            at,
            event: "MESSAGE_RECEIVE".into(),
            stream: "inbox".into(),
            seq: 0,
            change: None,
        }
    }

    fn row(sender: &str, cmid: &str) -> StoredRow {
        StoredRow {
            id: format!("id-{cmid}"),
            sender: sender.into(),
            cmid: Some(cmid.into()),
        }
    }

    #[test]
    fn accounts_for_every_kind_of_outcome() {
        // 4 users on 2 gateways: u00-u01 and u02-u03 are partners.
        let t = Traffic::new(
            vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            Tokens::new(b"0123456789abcdef0123"),
            4,
            1,
        );
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let fault = ms(1000);
        let mut sends = vec![
            // Delivered to both, once each: fine.
            send(0, "u00-1", Dest::User(1), ms(0)),
            // Shown twice on u01's session: a duplicate.
            send(0, "u00-2", Dest::User(1), ms(100)),
            // Acked, never stored.
            send(2, "u02-1", Dest::User(3), ms(200)),
            // After the fault: u03 never gets it although online (lost),
            // and u02's copy is late.
            send(2, "u02-2", Dest::User(3), ms(1100)),
            // After the fault: u01 was offline then, so its miss is offline.
            send(0, "u00-3", Dest::User(1), ms(1200)),
            // The last one, healthy: the run recovered.
            send(0, "u00-4", Dest::User(1), ms(3000)),
        ];
        sends[3].attempts = 2;
        sends[3].failures.push("unavailable".into());
        let receipts = vec![
            receipt(0, 10, "u00", "u00-1", ms(10)),
            receipt(1, 11, "u00", "u00-1", ms(10)),
            receipt(0, 10, "u00", "u00-2", ms(110)),
            receipt(1, 11, "u00", "u00-2", ms(110)),
            receipt(1, 11, "u00", "u00-2", ms(150)),
            receipt(2, 12, "u02", "u02-2", ms(2500)),
            receipt(0, 10, "u00", "u00-3", ms(1210)),
            receipt(0, 10, "u00", "u00-4", ms(3010)),
            receipt(1, 13, "u00", "u00-4", ms(3010)),
            // A message nobody stored.
            receipt(3, 14, "u02", "u02-9", ms(3010)),
        ];
        let offline = vec![
            Vec::new(),
            vec![(ms(1150), Some(ms(1300)))],
            Vec::new(),
            Vec::new(),
        ];
        let stored = vec![
            row("u00", "u00-1"),
            row("u00", "u00-2"),
            row("u02", "u02-2"),
            row("u00", "u00-3"),
            row("u00", "u00-4"),
        ];
        let a = account(
            &t,
            &sends,
            &receipts,
            &offline,
            &stored,
            fault,
            ms(4000),
            &[],
        );
        assert_eq!(a.sent, 6);
        assert_eq!(a.acked, 6);
        assert_eq!(a.acked_not_stored, 1);
        assert_eq!(a.stored_not_acked, 0);
        assert_eq!(a.retried, 1);
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.unknown_deliveries, 1);
        assert_eq!(a.expected_deliveries, 10);
        assert_eq!(a.delivered, 8);
        assert_eq!(a.delivered_late, 1);
        assert_eq!(a.not_delivered_online, 1);
        assert_eq!(a.not_delivered_offline, 1);
        // The last disturbed message (u02-2) settled at 2.5 s.
        assert_eq!(a.recovery, Some(Duration::from_millis(1500)));
        assert_eq!(a.failures, vec![("unavailable".to_owned(), 1)]);
        assert_eq!(a.longest_offline, Duration::from_millis(150));

        // Had the last message been lost too, the run did not recover.
        let mut tail = receipts.clone();
        tail.retain(|r| !(r.cmid == "u00-4" && r.user == 1));
        let a = account(&t, &sends, &tail, &offline, &stored, fault, ms(4000), &[]);
        assert_eq!(a.recovery, None);
    }
}
