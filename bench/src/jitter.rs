//! The `jitter` workload: chat while every client's connection is torn
//! down at random and resumed on a random gateway (issue 12, the
//! contract's "Positions and resume").
//!
//! Half the users chat in 1:1 pairs, half in channels of `members`
//! (created through `POST /api/channels` before the run). Every client's
//! TCP connection is reset (`SO_LINGER` 0, no Socket.IO or WebSocket
//! close) at a uniformly random moment of `close_after_ms`, stays offline
//! for a random `offline_ms`, then reconnects to a random gateway with
//! `auth: { token, resume: { inbox: n, "channel:<id>": m, … } }`: the
//! highest `seq` it received per stream. A client's first connection
//! resumes from `{ inbox: 0 }`, so it is shown every stream from its
//! start (the channels it was added to included) and knows every position.
//! After the sending time, no more resets: clients still offline come
//! back, and the run drains before anything is counted.
//!
//! Each client records what it saw (a [`Seen`] log per client); senders
//! record which sends were accepted (ack `ok`, with the message id). The
//! counts are one pure function over those logs, [`account`]: delivered
//! and lost against every recipient (the sender included: its own inbox or
//! channel copy is a delivery), duplicates by message id across a client's
//! connections, and position violations: per client and stream, across
//! reconnects, every entry must be the last one's `seq + 1`; a stream a
//! `RESUMED` named `incomplete` may jump forward once in that connection
//! (counted apart).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientError};
use crate::load::{check_shape, create_channels, LoadError};
use fanout::auth::Tokens;

/// What to run.
#[derive(Debug, Clone)]
pub struct JitterSpec {
    /// Gateway base URLs; clients start round-robin and reconnect at random.
    pub urls: Vec<String>,
    /// Clients (one connection each at a time): half in pairs, half in
    /// channels, each half rounded up to whole pairs and channels.
    pub users: usize,
    /// Members per channel.
    pub members: usize,
    /// Sends per second, all clients together (only online clients send).
    pub rate: f64,
    /// Sending time; resets happen during it only.
    pub duration: Duration,
    /// `content` bytes (at least the header).
    pub size: usize,
    /// A connection lives a uniformly random time in this range, ms.
    pub close_after_ms: [u64; 2],
    /// A reset client stays offline a uniformly random time in this range, ms.
    pub offline_ms: [u64; 2],
    /// Once every client is back online and every send answered, how long
    /// to keep them connected before counting.
    pub drain: Duration,
    /// Prefix of the user and channel ids, unique per run.
    pub user_prefix: String,
    /// A progress line with this label every 5 s, when set.
    pub progress: Option<String>,
}

/// One thing a client saw, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A connection was established (every later entry until the next
    /// `Session` arrived on it).
    Session,
    /// A positioned event: a message or a membership change.
    Entry {
        /// `stream`, if the event had one.
        stream: Option<String>,
        /// `seq`, if the event had one.
        seq: Option<u64>,
        /// The message id (`None` for a membership change).
        message: Option<String>,
    },
    /// `RESUMED`.
    Resumed {
        /// `complete`.
        complete: bool,
        /// `incomplete`: streams the gateway could not replay exactly.
        incomplete: Vec<String>,
        /// From the start of a reconnect (before the TCP connect) to this
        /// event, µs; `None` on a client's first connection.
        replay_us: Option<u64>,
    },
}

/// Latency figures in milliseconds, exact (from every sample).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    fn of(mut us: Vec<u64>) -> Latency {
        if us.is_empty() {
            return Latency::default();
        }
        us.sort_unstable();
        let at = |q: f64| {
            let i = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1;
            us[i] as f64 / 1000.0
        };
        Latency {
            count: us.len() as u64,
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// The counts over a run's logs ([`account`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    /// Accepted sends times their recipients: (client, message) pairs due.
    pub expected: u64,
    /// Of those, how many arrived (live or replayed).
    pub delivered: u64,
    /// `delivered / expected`, percent (100 when nothing was expected).
    pub delivered_pct: f64,
    /// `expected - delivered`.
    pub lost: u64,
    /// A message id a client had already seen, on any of its connections.
    pub duplicates: u64,
    /// An entry whose `seq` was not the last one's + 1 on its stream at its
    /// client (across reconnects).
    pub position_violations: u64,
    /// Forward jumps on a stream the connection's `RESUMED` named
    /// `incomplete` (one allowed per stream and connection; not violations).
    pub incomplete_jumps: u64,
    /// Events without `stream` or `seq`.
    pub unpositioned: u64,
    /// `RESUMED` events.
    pub resumed: u64,
    /// `RESUMED` events with `complete: false`.
    pub resumed_incomplete: u64,
    /// Connections (all resume) that never saw a `RESUMED`.
    pub resumed_missing: u64,
    /// An accepted message arriving at a client that is not a recipient.
    pub misrouted: u64,
    /// Messages whose send was never acked (the reset took the ack) but
    /// that arrived: not expected, not a fault.
    pub unacked_arrivals: u64,
    /// Reconnect start -> `RESUMED`.
    pub replay_ms: Latency,
}

/// The counts of a run: `accepted` is every acked message with its
/// recipients (client indices), `logs[c]` what client `c` saw.
///
/// A log starts with [`Seen::Session`] (anything before it is ignored). A
/// client starts at `inbox` 0 (its first connection resumes from there);
/// the first entry of any other stream sets where that stream starts for
/// it (the entry that added it to the channel).
pub fn account(accepted: &[(String, Vec<usize>)], logs: &[Vec<Seen>]) -> Tally {
    let mut t = Tally::default();
    let due: HashMap<&str, &[usize]> = accepted
        .iter()
        .map(|(id, r)| (id.as_str(), r.as_slice()))
        .collect();
    t.expected = accepted.iter().map(|(_, r)| r.len() as u64).sum();
    let mut replay = Vec::new();
    for (client, log) in logs.iter().enumerate() {
        let mut last: HashMap<&str, u64> = HashMap::from([("inbox", 0)]);
        let mut seen: HashSet<&str> = HashSet::new();
        for session in log.split(|s| *s == Seen::Session).skip(1) {
            // The jump an incomplete replay allows may come before the
            // `RESUMED` that announces it: read the connection's answer first.
            let mut jump_allowed: HashSet<&str> = HashSet::new();
            let mut answered = false;
            for s in session {
                if let Seen::Resumed {
                    complete,
                    incomplete,
                    replay_us,
                } = s
                {
                    answered = true;
                    t.resumed += 1;
                    if !complete {
                        t.resumed_incomplete += 1;
                    }
                    jump_allowed.extend(incomplete.iter().map(String::as_str));
                    replay.extend(*replay_us);
                }
            }
            if !answered {
                t.resumed_missing += 1;
            }
            for s in session {
                let Seen::Entry {
                    stream,
                    seq,
                    message,
                } = s
                else {
                    continue;
                };
                match (stream.as_deref(), *seq) {
                    (Some(stream), Some(seq)) => match last.get_mut(stream) {
                        None => {
                            last.insert(stream, seq);
                        }
                        Some(l) => {
                            if seq != *l + 1 {
                                if seq > *l + 1 && jump_allowed.remove(stream) {
                                    t.incomplete_jumps += 1;
                                } else {
                                    t.position_violations += 1;
                                }
                            }
                            *l = (*l).max(seq);
                        }
                    },
                    _ => t.unpositioned += 1,
                }
                let Some(id) = message.as_deref() else {
                    continue;
                };
                if !seen.insert(id) {
                    t.duplicates += 1;
                    continue;
                }
                match due.get(id) {
                    Some(r) if r.contains(&client) => t.delivered += 1,
                    Some(_) => t.misrouted += 1,
                    None => t.unacked_arrivals += 1,
                }
            }
        }
    }
    t.lost = t.expected.saturating_sub(t.delivered);
    t.delivered_pct = if t.expected == 0 {
        100.0
    } else {
        t.delivered as f64 * 100.0 / t.expected as f64
    };
    t.replay_ms = Latency::of(replay);
    t
}

/// What a jitter run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JitterReport {
    /// Clients.
    pub clients: u64,
    /// 1:1 pairs among them.
    pub pairs: u64,
    /// Channels among them.
    pub channels: u64,
    /// Sends/s asked for (all clients; offline clients skip theirs).
    pub offered_rate: f64,
    /// Sends issued.
    pub sent: u64,
    /// Sends acked `ok`.
    pub acked: u64,
    /// Sends refused, or whose ack never came (most: the reset took it).
    pub unacked: u64,
    /// Connections reset by the client (`SO_LINGER` 0).
    pub resets: u64,
    /// Connections the server ended.
    pub server_disconnects: u64,
    /// Reconnections established.
    pub reconnects: u64,
    /// Reconnect attempts that failed (refused or timed out; retried).
    pub reconnect_errors: u64,
    /// The first reconnect failure, for the report.
    pub first_reconnect_error: Option<String>,
    /// Seconds of sending.
    pub duration_secs: f64,
    /// Seconds from the end of sending to the count.
    pub drain_secs: f64,
    /// The counts.
    #[serde(flatten)]
    pub tally: Tally,
}

impl JitterReport {
    /// The correctness problems: what fails CI.
    pub fn problems(&self) -> Vec<String> {
        let t = &self.tally;
        [
            ("deliveries lost", t.lost),
            ("duplicate deliveries", t.duplicates),
            ("position violations", t.position_violations),
            ("events without a position", t.unpositioned),
            ("misrouted deliveries", t.misrouted),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{n} {what}"))
        .collect()
    }
}

/// Who is who: pairs first, then channels.
#[derive(Debug)]
struct Plan {
    names: Vec<String>,
    /// What each client sends to: a user (its partner) or a channel.
    target: Vec<Value>,
    /// Recipients of each client's messages (itself included).
    recipients: Vec<Arc<Vec<usize>>>,
    channels: Vec<(String, Vec<usize>)>,
    pairs: usize,
}

impl Plan {
    fn new(spec: &JitterSpec) -> Result<Plan, LoadError> {
        let k = spec.members;
        if k < 2 {
            return Err(LoadError::Spec("jitter members must be at least 2".into()));
        }
        let channels = (spec.users / 2).div_ceil(k).max(1);
        let pairs = spec.users.saturating_sub(channels * k).div_ceil(2).max(1);
        let users = 2 * pairs + channels * k;
        let name = |i: usize| format!("{}{i}", spec.user_prefix);
        let mut plan = Plan {
            names: (0..users).map(name).collect(),
            target: Vec::with_capacity(users),
            recipients: Vec::with_capacity(users),
            channels: Vec::with_capacity(channels),
            pairs,
        };
        for p in 0..pairs {
            let both = Arc::new(vec![2 * p, 2 * p + 1]);
            for i in [2 * p, 2 * p + 1] {
                plan.target.push(json!({ "to": name(i ^ 1) }));
                plan.recipients.push(both.clone());
            }
        }
        for c in 0..channels {
            let id = format!("{}c{c}", spec.user_prefix);
            let members: Vec<usize> = (2 * pairs + c * k..2 * pairs + (c + 1) * k).collect();
            let all = Arc::new(members.clone());
            for _ in 0..k {
                plan.target.push(json!({ "channelId": id }));
                plan.recipients.push(all.clone());
            }
            plan.channels.push((id, members));
        }
        Ok(plan)
    }
}

/// What the clients share while they run.
struct Shared {
    urls: Vec<String>,
    start: Instant,
    duration: Duration,
    period: Duration,
    size: usize,
    close_after_ms: [u64; 2],
    offline_ms: [u64; 2],
    stop: CancellationToken,
    accepted: Mutex<Vec<(String, usize)>>,
    sent: AtomicU64,
    acked: AtomicU64,
    unacked: AtomicU64,
    arrivals: AtomicU64,
    resets: AtomicU64,
    server_disconnects: AtomicU64,
    reconnects: AtomicU64,
    reconnect_errors: AtomicU64,
    first_reconnect_error: Mutex<Option<String>>,
    online: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn sending(&self) -> bool {
        self.start.elapsed() < self.duration
    }

    fn settled(&self) -> bool {
        self.acked.load(Ordering::Relaxed) + self.unacked.load(Ordering::Relaxed)
            >= self.sent.load(Ordering::Relaxed)
    }
}

/// Runs the workload against running gateways; tokens signed with `tokens`.
pub async fn run(spec: &JitterSpec, tokens: &Tokens) -> Result<JitterReport, LoadError> {
    check_shape(&spec.urls, spec.users, spec.rate, spec.duration)?;
    let ordered = |r: [u64; 2]| r[0] > 0 && r[0] <= r[1];
    if !ordered(spec.close_after_ms) || !ordered(spec.offline_ms) {
        return Err(LoadError::Spec(
            "close_after_ms and offline_ms must be [min, max] with 0 < min <= max".into(),
        ));
    }
    let plan = Plan::new(spec)?;
    create_channels(&spec.urls[0], tokens, &plan.names, &plan.channels).await?;

    let mut auth = Vec::with_capacity(plan.names.len());
    for user in &plan.names {
        auth.push(
            tokens
                .mint(user, 3600)
                .map_err(|e| LoadError::Setup(e.to_string()))?,
        );
    }
    // First connections, 64 at a time: each resumes from inbox 0.
    let clients: Vec<Client> = futures::stream::iter(0..plan.names.len())
        .map(|i| {
            let url = spec.urls[i % spec.urls.len()].clone();
            let token = auth[i].clone();
            let user = plan.names[i].clone();
            async move {
                Client::connect(&url, json!({ "token": token, "resume": { "inbox": 0 } }))
                    .await
                    .map_err(|source| LoadError::Connect { user, source })
            }
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    let n = clients.len();
    let shared = Arc::new(Shared {
        urls: spec.urls.clone(),
        start: Instant::now() + Duration::from_millis(200),
        duration: spec.duration,
        period: Duration::from_secs_f64(n as f64 / spec.rate),
        size: spec.size,
        close_after_ms: spec.close_after_ms,
        offline_ms: spec.offline_ms,
        stop: CancellationToken::new(),
        accepted: Mutex::new(Vec::new()),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        unacked: AtomicU64::new(0),
        arrivals: AtomicU64::new(0),
        resets: AtomicU64::new(0),
        server_disconnects: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        reconnect_errors: AtomicU64::new(0),
        first_reconnect_error: Mutex::new(None),
        online: AtomicUsize::new(n),
    });
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let user = User {
                me: i,
                token: auth[i].clone(),
                target: plan.target[i].clone(),
                offset: shared.period.mul_f64(i as f64 / n as f64),
                rng: rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9)),
                shared: shared.clone(),
            };
            tokio::spawn(user.run(c))
        })
        .collect();
    let ticker = spec
        .progress
        .clone()
        .map(|label| tokio::spawn(report_progress(label, shared.clone(), n)));

    // Sending and resets end with the duration; then every client back
    // online, every send answered, and `drain` connected (longer while
    // deliveries still arrive, up to 30 s more) before counting.
    tokio::time::sleep_until(tokio::time::Instant::from_std(shared.start + spec.duration)).await;
    let end_of_sending = Instant::now();
    let cap = end_of_sending + spec.drain + Duration::from_secs(30);
    while Instant::now() < cap && (shared.online.load(Ordering::Relaxed) < n || !shared.settled()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut quiet_until = Instant::now() + spec.drain;
    let mut arrivals = shared.arrivals.load(Ordering::Relaxed);
    while Instant::now() < quiet_until.min(cap) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = shared.arrivals.load(Ordering::Relaxed);
        if now != arrivals {
            arrivals = now;
            quiet_until = quiet_until.max(Instant::now() + Duration::from_secs(1));
        }
    }
    let drain_secs = end_of_sending.elapsed().as_secs_f64();
    shared.stop.cancel();
    let mut logs = Vec::with_capacity(n);
    for t in tasks {
        logs.push(t.await.unwrap_or_default());
    }
    if let Some(t) = ticker {
        t.abort();
    }

    let accepted: Vec<(String, Vec<usize>)> = std::mem::take(&mut *lock(&shared.accepted))
        .into_iter()
        .map(|(id, sender)| (id, plan.recipients[sender].to_vec()))
        .collect();
    let tally = account(&accepted, &logs);
    let first_reconnect_error = lock(&shared.first_reconnect_error).clone();
    Ok(JitterReport {
        clients: n as u64,
        pairs: plan.pairs as u64,
        channels: plan.channels.len() as u64,
        offered_rate: spec.rate,
        sent: shared.sent.load(Ordering::Relaxed),
        acked: shared.acked.load(Ordering::Relaxed),
        unacked: shared.unacked.load(Ordering::Relaxed),
        resets: shared.resets.load(Ordering::Relaxed),
        server_disconnects: shared.server_disconnects.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        reconnect_errors: shared.reconnect_errors.load(Ordering::Relaxed),
        first_reconnect_error,
        duration_secs: spec.duration.as_secs_f64(),
        drain_secs,
        tally,
    })
}

async fn report_progress(label: String, s: Arc<Shared>, clients: usize) {
    let total = s.duration.as_secs_f64();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tick.tick().await;
        let t = s.start.elapsed().as_secs_f64();
        let phase = if t < total { "sending" } else { "draining" };
        eprintln!(
            "[bench] {label}: {phase} {:.0}/{total:.0} s, online {}/{clients}, resets {}, reconnects {} ({} failed), sent {}, acked {}, events {}",
            t.min(total),
            s.online.load(Ordering::Relaxed),
            s.resets.load(Ordering::Relaxed),
            s.reconnects.load(Ordering::Relaxed),
            s.reconnect_errors.load(Ordering::Relaxed),
            s.sent.load(Ordering::Relaxed),
            s.acked.load(Ordering::Relaxed),
            s.arrivals.load(Ordering::Relaxed),
        );
    }
}

/// One virtual user: its connection's life, what it saw, what it sends.
struct User {
    me: usize,
    token: String,
    target: Value,
    offset: Duration,
    rng: rand::rngs::StdRng,
    shared: Arc<Shared>,
}

/// How a connection ended.
enum End {
    /// The client reset it.
    Reset,
    /// The server (or the network) closed it.
    Lost,
    /// The run is over.
    Stop,
}

impl User {
    fn pick(&mut self, range: [u64; 2]) -> Duration {
        Duration::from_millis(self.rng.random_range(range[0]..=range[1]))
    }

    async fn run(mut self, first: Client) -> Vec<Seen> {
        let s = self.shared.clone();
        let mut log = vec![Seen::Session];
        let mut positions: BTreeMap<String, u64> = BTreeMap::from([("inbox".to_owned(), 0)]);
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::from_std(s.start + self.offset),
            s.period,
        );
        // A send due while the client was offline or connecting is not
        // made late: that moment passed.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sent = 0u64;
        let mut close_at = s.start + self.pick(s.close_after_ms);
        let mut client = first;
        let mut reconnect_start: Option<Instant> = None;
        loop {
            let end = self
                .session(
                    &client,
                    &mut log,
                    &mut positions,
                    &mut tick,
                    &mut sent,
                    close_at,
                    reconnect_start,
                )
                .await;
            s.online.fetch_sub(1, Ordering::Relaxed);
            match end {
                End::Stop => {
                    client.close().await;
                    return log;
                }
                End::Reset => {
                    client.reset().await;
                    s.resets.fetch_add(1, Ordering::Relaxed);
                    let offline = self.pick(s.offline_ms);
                    tokio::select! {
                        () = tokio::time::sleep(offline) => {}
                        () = s.stop.cancelled() => return log,
                    }
                }
                End::Lost => {
                    drop(client);
                    s.server_disconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Back, on a random gateway, from the positions it holds.
            loop {
                let url = s.urls[self.rng.random_range(0..s.urls.len())].clone();
                let started = Instant::now();
                let auth = json!({ "token": self.token, "resume": positions });
                let attempt = tokio::select! {
                    r = tokio::time::timeout(Duration::from_secs(10), Client::connect(&url, auth)) => {
                        r.unwrap_or(Err(ClientError::Timeout))
                    }
                    () = s.stop.cancelled() => return log,
                };
                match attempt {
                    Ok(c) => {
                        client = c;
                        reconnect_start = Some(started);
                        break;
                    }
                    Err(e) => {
                        s.reconnect_errors.fetch_add(1, Ordering::Relaxed);
                        lock(&s.first_reconnect_error).get_or_insert_with(|| format!("{url}: {e}"));
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                            () = s.stop.cancelled() => return log,
                        }
                    }
                }
            }
            s.reconnects.fetch_add(1, Ordering::Relaxed);
            s.online.fetch_add(1, Ordering::Relaxed);
            log.push(Seen::Session);
            close_at = Instant::now() + self.pick(s.close_after_ms);
        }
    }

    /// One connection: receive, send on schedule, until it is reset, lost
    /// or the run stops.
    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        c: &Client,
        log: &mut Vec<Seen>,
        positions: &mut BTreeMap<String, u64>,
        tick: &mut tokio::time::Interval,
        sent: &mut u64,
        close_at: Instant,
        reconnect_start: Option<Instant>,
    ) -> End {
        let s = &self.shared;
        // No resets after the sending time: the run drains connected.
        let reset_at = (close_at < s.start + s.duration).then_some(close_at);
        let reset = async {
            match reset_at {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(reset);
        loop {
            tokio::select! {
                e = c.next_event(Duration::from_secs(3600)) => {
                    let Ok(e) = e else { return End::Lost };
                    s.arrivals.fetch_add(1, Ordering::Relaxed);
                    if let Some(seen) = observe(&e.name, &e.data, e.at, reconnect_start) {
                        if let Seen::Entry { stream: Some(stream), seq: Some(seq), .. } = &seen {
                            let p = positions.entry(stream.clone()).or_insert(0);
                            *p = (*p).max(*seq);
                        }
                        log.push(seen);
                    }
                }
                t = tick.tick() => {
                    if s.sending() {
                        *sent += 1;
                        self.send(c, *sent, t.into_std());
                    }
                }
                () = &mut reset => return End::Reset,
                () = s.stop.cancelled() => return End::Stop,
            }
        }
    }

    fn send(&self, c: &Client, n: u64, intended: Instant) {
        let s = &self.shared;
        let me = self.me;
        let intended_us = intended.saturating_duration_since(s.start).as_micros();
        let mut content = format!("{me}:{n}:{intended_us}:");
        if content.len() < s.size {
            content.push_str(&"x".repeat(s.size - content.len()));
        }
        let mut payload = self.target.clone();
        payload["content"] = json!(content);
        payload["clientMsgId"] = json!(format!("j{me}-{n}"));
        s.sent.fetch_add(1, Ordering::Relaxed);
        let Ok(ack) = c.emit_with_ack("sendMessage", &payload) else {
            s.unacked.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let s = s.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), ack).await {
                Ok(Ok(v)) if v["ok"] == json!(true) => {
                    if let Some(id) = v["id"].as_str() {
                        lock(&s.accepted).push((id.to_owned(), me));
                    }
                    s.acked.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    s.unacked.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

/// What an event means to the accounting; `None` for events it ignores.
fn observe(
    name: &str,
    data: &Value,
    at: Instant,
    reconnect_start: Option<Instant>,
) -> Option<Seen> {
    match name {
        "MESSAGE_RECEIVE" | "GROUP_MESSAGE_RECEIVE" | "MEMBERSHIP_CHANGE" => Some(Seen::Entry {
            stream: data["stream"].as_str().map(str::to_owned),
            seq: data["seq"].as_u64(),
            message: if name == "MEMBERSHIP_CHANGE" {
                None
            } else {
                data["id"].as_str().map(str::to_owned)
            },
        }),
        "RESUMED" => Some(Seen::Resumed {
            complete: data["complete"].as_bool().unwrap_or(false),
            incomplete: data["incomplete"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            replay_us: reconnect_start
                .map(|t0| at.saturating_duration_since(t0).as_micros() as u64),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stream: &str, seq: u64, message: Option<&str>) -> Seen {
        Seen::Entry {
            stream: Some(stream.to_owned()),
            seq: Some(seq),
            message: message.map(str::to_owned),
        }
    }

    fn resumed(incomplete: &[&str], replay_ms: Option<u64>) -> Seen {
        Seen::Resumed {
            complete: incomplete.is_empty(),
            incomplete: incomplete.iter().map(|s| (*s).to_owned()).collect(),
            replay_us: replay_ms.map(|ms| ms * 1000),
        }
    }

    fn accepted(list: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>)> {
        list.iter()
            .map(|(id, r)| ((*id).to_owned(), r.to_vec()))
            .collect()
    }

    #[test]
    fn a_clean_run_across_reconnects_counts_nothing_wrong() {
        let acc = accepted(&[("m1", &[0, 1]), ("m2", &[0, 1]), ("g1", &[0])]);
        let logs = vec![
            vec![
                Seen::Session,
                entry("inbox", 1, None),
                entry("channel:c", 1, None),
                resumed(&[], None),
                entry("inbox", 2, Some("m1")),
                // reset; back on another gateway from inbox 2, channel 1
                Seen::Session,
                entry("inbox", 3, Some("m2")),
                entry("channel:c", 2, Some("g1")),
                resumed(&[], Some(40)),
            ],
            vec![
                Seen::Session,
                resumed(&[], None),
                entry("inbox", 1, Some("m1")),
                entry("inbox", 2, Some("m2")),
            ],
        ];
        let t = account(&acc, &logs);
        assert_eq!((t.expected, t.delivered, t.lost), (5, 5, 0));
        assert_eq!(t.delivered_pct, 100.0);
        assert_eq!(
            (t.duplicates, t.position_violations, t.unpositioned),
            (0, 0, 0)
        );
        assert_eq!(
            (t.resumed, t.resumed_incomplete, t.resumed_missing),
            (3, 0, 0)
        );
        assert_eq!(t.replay_ms.count, 1, "only a reconnect's replay is timed");
        assert_eq!(t.replay_ms.max, 40.0);
    }

    #[test]
    fn gaps_and_repeats_are_violations_across_connections() {
        let acc = accepted(&[("m1", &[0]), ("m2", &[0]), ("m3", &[0])]);
        let logs = vec![vec![
            Seen::Session,
            entry("inbox", 1, Some("m1")),
            resumed(&[], None),
            Seen::Session,
            // resumed from inbox 1, but 2 never came: a gap
            entry("inbox", 3, Some("m3")),
            resumed(&[], Some(10)),
            Seen::Session,
            // and then the same entry again: a repeat, and a duplicate
            entry("inbox", 3, Some("m3")),
            resumed(&[], Some(20)),
        ]];
        let t = account(&acc, &logs);
        assert_eq!(t.position_violations, 2);
        assert_eq!(t.duplicates, 1);
        assert_eq!((t.delivered, t.lost), (2, 1), "m2 never arrived");
        assert!((t.delivered_pct - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(t.replay_ms.count, 2);
        assert_eq!((t.replay_ms.p50, t.replay_ms.max), (10.0, 20.0));
    }

    #[test]
    fn a_stream_resumed_incomplete_may_jump_once_even_before_resumed() {
        let logs = vec![vec![
            Seen::Session,
            entry("inbox", 1, None),
            entry("channel:c", 4, None),
            Seen::Session,
            // the replay of channel:c starts after a jump, then RESUMED says so
            entry("channel:c", 9, None),
            entry("channel:c", 10, None),
            entry("inbox", 2, None),
            resumed(&["channel:c"], Some(5)),
            // a second jump on the same stream is a violation
            entry("channel:c", 12, None),
            // as is a jump on a stream not named incomplete
            entry("inbox", 5, None),
        ]];
        let t = account(&[], &logs);
        assert_eq!(t.incomplete_jumps, 1);
        assert_eq!(t.position_violations, 2);
        assert_eq!((t.resumed, t.resumed_incomplete), (1, 1));
        assert_eq!(t.resumed_missing, 1, "the first connection had no RESUMED");
    }

    #[test]
    fn inbox_starts_at_zero_other_streams_where_first_seen() {
        let logs = vec![
            // a first inbox entry of 3: 1 and 2 were skipped
            vec![Seen::Session, entry("inbox", 3, None), resumed(&[], None)],
            // a channel's first entry may be anywhere (where the client was added)
            vec![
                Seen::Session,
                entry("channel:c", 7, None),
                entry("channel:c", 8, None),
                resumed(&[], None),
            ],
        ];
        let t = account(&[], &logs);
        assert_eq!(t.position_violations, 1);
    }

    #[test]
    fn losses_misroutes_unacked_and_unpositioned_events() {
        let acc = accepted(&[("m1", &[0, 1]), ("m2", &[1])]);
        let logs = vec![
            vec![
                Seen::Session,
                entry("inbox", 1, Some("m1")),
                // m2 was for client 1 only
                entry("inbox", 2, Some("m2")),
                // an arrival whose ack the reset took
                entry("inbox", 3, Some("x")),
                Seen::Entry {
                    stream: None,
                    seq: None,
                    message: Some("m9".into()),
                },
            ],
            vec![Seen::Session],
        ];
        let t = account(&acc, &logs);
        assert_eq!((t.expected, t.delivered, t.lost), (3, 1, 2));
        assert_eq!(t.misrouted, 1);
        assert_eq!(t.unacked_arrivals, 2);
        assert_eq!(t.unpositioned, 1);
        assert_eq!(t.resumed_missing, 2);
        let r = JitterReport {
            tally: t,
            ..JitterReport::default()
        };
        assert_eq!(
            r.problems(),
            vec![
                "2 deliveries lost",
                "1 events without a position",
                "1 misrouted deliveries"
            ]
        );
    }

    #[test]
    fn plan_puts_half_in_pairs_half_in_channels() {
        let spec = JitterSpec {
            urls: vec!["a".into()],
            users: 1000,
            members: 10,
            rate: 1.0,
            duration: Duration::from_secs(1),
            size: 64,
            close_after_ms: [1, 2],
            offline_ms: [1, 2],
            drain: Duration::ZERO,
            user_prefix: "u".into(),
            progress: None,
        };
        let p = Plan::new(&spec).expect("plan");
        assert_eq!((p.names.len(), p.pairs, p.channels.len()), (1000, 250, 50));
        assert_eq!(*p.recipients[0], vec![0, 1]);
        assert_eq!(*p.recipients[1], vec![0, 1]);
        assert_eq!(*p.recipients[500], (500..510).collect::<Vec<_>>());
        assert_eq!(p.target[1], json!({ "to": "u0" }));
        let ci = Plan::new(&JitterSpec { users: 60, ..spec }).expect("plan");
        assert_eq!((ci.names.len(), ci.pairs, ci.channels.len()), (60, 15, 3));
    }
}
