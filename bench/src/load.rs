//! The load generator: virtual users on real gateways, speaking Socket.IO
//! over WebSocket ([`crate::client`]), sending on a fixed open-loop
//! schedule. Latency is measured from each message's *intended* send time,
//! so a stalled system cannot hide its latency by slowing the sender down
//! (coordinated omission).
//!
//! Every message carries `sender:seq:intended_us:` at the start of its
//! content. Receivers use it for latency, and a per-sender ledger counts
//! each message's deliveries against the recipients it should reach, so
//! losses, duplicates (per session), reorderings and misrouted deliveries
//! are counted exactly, not inferred from totals.
//!
//! Patterns ([`Pattern`]):
//! - `personal`: users paired (0↔1, 2↔3, …), partners on different gateways;
//! - `group`: channels of `members` users spread over the gateways, each
//!   member sending to its channel (one publish, `members - 1` deliveries);
//! - `offline`: pairs where a share of the recipients never connects, so
//!   their messages are stored but unroutable;
//! - `churn`: `personal` chat while other users connect and disconnect at a
//!   fixed rate (route binding and unbinding under load).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::{Client, ClientError};
use fanout::auth::Tokens;

/// Who sends to whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "pattern", rename_all = "lowercase", deny_unknown_fields)]
pub enum Pattern {
    /// 1:1 across gateways.
    Personal,
    /// Channels of `members` users.
    Group {
        /// Members per channel (at least 2).
        members: usize,
    },
    /// 1:1 with a share of the recipients offline.
    Offline {
        /// Share of the pairs whose recipient never connects, 0 to 1.
        offline_share: f64,
    },
    /// 1:1 while other users connect and disconnect.
    Churn {
        /// Connections opened (and later closed) per second.
        connects_per_sec: f64,
        /// How long each churning session stays, in milliseconds.
        hold_ms: u64,
    },
    /// Pairs and channels while every connection is reset at random and
    /// resumed on a random gateway ([`crate::jitter`]).
    Jitter {
        /// Members per channel.
        members: usize,
        /// A connection lives a random time in this range, ms.
        close_after_ms: [u64; 2],
        /// Then stays offline a random time in this range, ms.
        offline_ms: [u64; 2],
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Gateway base URLs (`http://host:port`); users are spread over them.
    pub urls: Vec<String>,
    /// Who sends to whom.
    pub pattern: Pattern,
    /// Virtual users (rounded up to whole pairs or channels).
    pub users: usize,
    /// Messages sent per second, all users together.
    pub rate: f64,
    /// Sending time, warm-up included.
    pub duration: Duration,
    /// Leading part of `duration` whose latencies are not recorded.
    pub warmup: Duration,
    /// `content` size in bytes (at least the 32-byte header).
    pub size: usize,
    /// After the last send, how long to wait without any delivery before
    /// counting what is missing as lost.
    pub drain: Duration,
    /// Prefix of the user and channel ids, unique per run.
    pub user_prefix: String,
    /// When set, a progress line with this label goes to stderr every
    /// few seconds.
    pub progress: Option<String>,
}

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Quantiles dense enough to draw a CDF out to the 99.99th.
fn cdf(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    const Q: [f64; 16] = [
        0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0,
    ];
    Q.iter()
        .map(|q| [*q, h.value_at_quantile(*q) as f64 / 1000.0])
        .collect()
}

/// One second of a run, by receive time.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SeriesPoint {
    /// Seconds since sending started.
    pub t: f64,
    /// Deliveries received in this second.
    pub delivered: u64,
    /// p99 end-to-end latency of those deliveries, ms.
    pub p99_ms: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    /// Messages per second asked for.
    pub offered_rate: f64,
    /// Sends issued.
    pub sent: u64,
    /// Sends acked `ok`.
    pub acked: u64,
    /// Sends refused or not acked in time.
    pub send_errors: u64,
    /// Deliveries the acked messages should have made (online recipients).
    pub expected: u64,
    /// Distinct (message, session) deliveries.
    pub delivered: u64,
    /// Expected deliveries of acked messages that never came.
    pub lost: u64,
    /// Deliveries a session received more than once.
    pub duplicated: u64,
    /// Deliveries received after a later message of the same sender.
    pub reordered: u64,
    /// Deliveries to a session that should not have received the message.
    pub misrouted: u64,
    /// Sessions established per second during set-up.
    pub connects_per_sec: f64,
    /// Messages acked per second over the measured window.
    pub acked_per_sec: f64,
    /// Deliveries per second over the measured window.
    pub delivered_per_sec: f64,
    /// Intended send -> recipient receive.
    pub e2e_ms: Percentiles,
    /// The end-to-end distribution: `[quantile, ms]` pairs for a CDF.
    pub e2e_cdf: Vec<[f64; 2]>,
    /// Intended send -> ack.
    pub ack_ms: Percentiles,
    /// Churn: connect start -> connected (routes bound).
    pub connect_ms: Percentiles,
    /// Churn: sessions opened and closed while the chat ran.
    pub churned: u64,
    /// Churn: connects that failed.
    pub connect_errors: u64,
    /// Seconds measured (duration minus warm-up).
    pub measured_secs: f64,
    /// Per-second deliveries and p99.
    pub series: Vec<SeriesPoint>,
}

/// Why a run could not proceed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A session could not connect.
    #[error("connecting user {user}: {source}")]
    Connect {
        /// The user.
        user: String,
        /// Why.
        source: ClientError,
    },
    /// Setting up channels over HTTP failed.
    #[error("setting up: {0}")]
    Setup(String),
    /// A bad spec.
    #[error("{0}")]
    Spec(String),
}

/// Where one virtual user's messages go.
#[derive(Debug, Clone)]
enum Target {
    User(String),
    Channel(String),
}

/// The users of a run: who connects where, who sends to whom, and how many
/// sessions each message should reach.
#[derive(Debug)]
struct Plan {
    names: Vec<String>,
    /// Gateway index per user; `None` for users that never connect.
    gateway: Vec<Option<usize>>,
    /// Target per user; `None` for users that only receive.
    target: Vec<Option<Target>>,
    /// Online recipient sessions per message of each user.
    expected: Vec<u64>,
    /// Channels to create: id and members.
    channels: Vec<(String, Vec<usize>)>,
}

impl Plan {
    fn new(spec: &LoadSpec) -> Result<Plan, LoadError> {
        let gateways = spec.urls.len();
        let name = |i: usize| format!("{}{i}", spec.user_prefix);
        match &spec.pattern {
            Pattern::Personal | Pattern::Churn { .. } | Pattern::Offline { .. } => {
                let share = match spec.pattern {
                    Pattern::Offline { offline_share } => offline_share,
                    _ => 0.0,
                };
                if !(0.0..=1.0).contains(&share) {
                    return Err(LoadError::Spec("offline_share must be 0 to 1".into()));
                }
                let users = spec.users.div_ceil(2) * 2;
                let offline = |p: usize| is_offline_pair(p, share);
                let mut plan = Plan {
                    names: (0..users).map(name).collect(),
                    gateway: Vec::with_capacity(users),
                    target: Vec::with_capacity(users),
                    expected: Vec::with_capacity(users),
                    channels: Vec::new(),
                };
                for i in 0..users {
                    let (pair, second) = (i / 2, i % 2 == 1);
                    let off = offline(pair);
                    // Partners sit on different gateways when there are several.
                    let gw = (pair + usize::from(second)) % gateways;
                    plan.gateway
                        .push(if off && second { None } else { Some(gw) });
                    plan.target.push(if off && second {
                        None
                    } else {
                        Some(Target::User(name(i ^ 1)))
                    });
                    plan.expected.push(u64::from(!off || second));
                }
                Ok(plan)
            }
            Pattern::Jitter { .. } => Err(LoadError::Spec(
                "the jitter pattern runs through `fanout bench` (bench/src/jitter.rs)".into(),
            )),
            Pattern::Group { members } => {
                let k = *members;
                if k < 2 {
                    return Err(LoadError::Spec("group members must be at least 2".into()));
                }
                let channels = spec.users.div_ceil(k).max(1);
                let users = channels * k;
                let mut plan = Plan {
                    names: (0..users).map(name).collect(),
                    // Round-robin over gateways: a channel's members spread.
                    gateway: (0..users).map(|i| Some(i % gateways)).collect(),
                    target: Vec::with_capacity(users),
                    expected: vec![(k - 1) as u64; users],
                    channels: Vec::with_capacity(channels),
                };
                for c in 0..channels {
                    let id = format!("{}c{c}", spec.user_prefix);
                    plan.channels
                        .push((id.clone(), (c * k..(c + 1) * k).collect()));
                    for _ in 0..k {
                        plan.target.push(Some(Target::Channel(id.clone())));
                    }
                }
                Ok(plan)
            }
        }
    }
}

/// Whether pair `p`'s recipient is offline when a `share` of them are:
/// the offline pairs are spread evenly, pair `p` being one when the running
/// count of offline pairs steps up at `p`. The raw baseline uses the same
/// rule, so both measure the same pattern.
pub fn is_offline_pair(p: usize, share: f64) -> bool {
    ((p + 1) as f64 * share).floor() > (p as f64 * share).floor()
}

/// Creates channel `id` as the user `token` names, with `members` besides
/// them, through a gateway's REST API.
pub async fn create_channel(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    id: &str,
    members: &[&str],
) -> Result<(), String> {
    let body = json!({ "id": id, "name": id, "members": members });
    let resp = http
        .post(format!("{url}/api/channels"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("creating channel {id}: {e}"))?;
    let status = resp.status();
    if status.as_u16() != 201 {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("creating channel {id}: {status} {text}"));
    }
    Ok(())
}

/// Per sender: which messages were acked and how many sessions got each.
#[derive(Debug, Default)]
struct Ledger {
    acked: Vec<bool>,
    got: Vec<u32>,
}

impl Ledger {
    fn slot(&mut self, seq: u64) -> usize {
        let i = seq as usize;
        if self.got.len() <= i {
            self.got.resize(i + 1, 0);
            self.acked.resize(i + 1, false);
        }
        i
    }
}

struct Recorder {
    start: Instant,
    warmup: Duration,
    duration: Duration,
    e2e: Mutex<Histogram<u64>>,
    ack: Mutex<Histogram<u64>>,
    connect: Mutex<Histogram<u64>>,
    series: Mutex<Vec<(u64, Histogram<u64>)>>,
    ledgers: Vec<Mutex<Ledger>>,
    expected_per_msg: Vec<u64>,
    sent: AtomicU64,
    acked: AtomicU64,
    acked_measured: AtomicU64,
    send_errors: AtomicU64,
    delivered: AtomicU64,
    delivered_measured: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    misrouted: AtomicU64,
    churned: AtomicU64,
    connect_errors: AtomicU64,
}

fn histogram(sigfig: u8) -> Histogram<u64> {
    // 1 µs to 10 min; the bounds are constants.
    Histogram::new_with_bounds(1, 600_000_000, sigfig).expect("constant bounds are valid")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recorder {
    fn new(
        start: Instant,
        warmup: Duration,
        duration: Duration,
        expected_per_msg: Vec<u64>,
    ) -> Self {
        Self {
            start,
            warmup,
            duration,
            e2e: Mutex::new(histogram(3)),
            ack: Mutex::new(histogram(3)),
            connect: Mutex::new(histogram(3)),
            series: Mutex::new(Vec::new()),
            ledgers: (0..expected_per_msg.len())
                .map(|_| Mutex::default())
                .collect(),
            expected_per_msg,
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_measured: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            delivered_measured: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            churned: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
        }
    }

    fn measured(&self, intended_us: u64) -> bool {
        Duration::from_micros(intended_us) >= self.warmup
    }

    fn latency_us(&self, intended_us: u64, at: Instant) -> u64 {
        let latency = at.saturating_duration_since(self.start + Duration::from_micros(intended_us));
        (latency.as_micros() as u64).max(1)
    }

    fn record_ack(&self, sender: usize, seq: u64, intended_us: u64, at: Instant) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = self.ledgers.get(sender) {
            let mut l = lock(l);
            let i = l.slot(seq);
            l.acked[i] = true;
        }
        if self.measured(intended_us) {
            self.acked_measured.fetch_add(1, Ordering::Relaxed);
            lock(&self.ack).saturating_record(self.latency_us(intended_us, at));
        }
    }

    fn record_delivery(&self, sender: usize, seq: u64, intended_us: u64, at: Instant) {
        let Some(ledger) = self.ledgers.get(sender) else {
            self.misrouted.fetch_add(1, Ordering::Relaxed);
            return;
        };
        {
            let mut l = lock(ledger);
            let i = l.slot(seq);
            l.got[i] += 1;
            if u64::from(l.got[i]) > self.expected_per_msg[sender] {
                self.misrouted.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let us = self.latency_us(intended_us, at);
        if self.measured(intended_us) {
            self.delivered_measured.fetch_add(1, Ordering::Relaxed);
            lock(&self.e2e).saturating_record(us);
        }
        let second = at.saturating_duration_since(self.start).as_secs();
        let mut series = lock(&self.series);
        let idx = second as usize;
        while series.len() <= idx {
            series.push((0, histogram(2)));
        }
        series[idx].0 += 1;
        series[idx].1.saturating_record(us);
    }

    /// Expected deliveries of acked messages, and how many of those came.
    fn tally(&self) -> (u64, u64) {
        let (mut expected, mut lost) = (0, 0);
        for (sender, l) in self.ledgers.iter().enumerate() {
            let want = self.expected_per_msg[sender];
            let l = lock(l);
            for (acked, got) in l.acked.iter().zip(&l.got) {
                if *acked {
                    expected += want;
                    lost += want.saturating_sub(u64::from(*got));
                }
            }
        }
        (expected, lost)
    }
}

/// Runs `spec` against running gateways; tokens are signed with `tokens`.
/// The checks every load shape shares: gateways, users, a rate and a
/// duration.
pub(crate) fn check_shape(
    urls: &[String],
    users: usize,
    rate: f64,
    duration: Duration,
) -> Result<(), LoadError> {
    if urls.is_empty() || users == 0 || rate.is_nan() || rate <= 0.0 || duration.is_zero() {
        return Err(LoadError::Spec(
            "need at least one gateway URL, one user, a positive rate and a duration".into(),
        ));
    }
    Ok(())
}

/// Creates each `(id, members)` channel through `url`, its first member
/// (an index into `names`) creating it with the others.
pub(crate) async fn create_channels(
    url: &str,
    tokens: &Tokens,
    names: &[String],
    channels: &[(String, Vec<usize>)],
) -> Result<(), LoadError> {
    let http = reqwest::Client::new();
    for (id, members) in channels {
        let token = tokens
            .mint(&names[members[0]], 3600)
            .map_err(|e| LoadError::Setup(e.to_string()))?;
        let others: Vec<&str> = members[1..].iter().map(|m| names[*m].as_str()).collect();
        create_channel(&http, url, &token, id, &others)
            .await
            .map_err(LoadError::Setup)?;
    }
    Ok(())
}

pub async fn run(spec: &LoadSpec, tokens: &Tokens) -> Result<LoadReport, LoadError> {
    check_shape(&spec.urls, spec.users, spec.rate, spec.duration)?;
    if spec.warmup >= spec.duration {
        return Err(LoadError::Spec(
            "warm-up must be shorter than the duration".into(),
        ));
    }
    let plan = Plan::new(spec)?;
    create_channels(&spec.urls[0], tokens, &plan.names, &plan.channels).await?;

    let t_connect = Instant::now();
    let online: Vec<usize> = (0..plan.names.len())
        .filter(|i| plan.gateway[*i].is_some())
        .collect();
    let clients: Vec<(usize, Arc<Client>)> = futures::stream::iter(online.iter().copied())
        .map(|i| {
            let url = spec.urls[plan.gateway[i].unwrap_or(0)].clone();
            let user = plan.names[i].clone();
            let token = tokens.mint(&user, 3600).unwrap_or_default();
            async move {
                Client::connect(&url, json!({ "token": token }))
                    .await
                    .map(|c| (i, Arc::new(c)))
                    .map_err(|source| LoadError::Connect { user, source })
            }
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let connects_per_sec = clients.len() as f64 / t_connect.elapsed().as_secs_f64().max(1e-9);

    let rec = Arc::new(Recorder::new(
        Instant::now() + Duration::from_millis(200),
        spec.warmup,
        spec.duration,
        plan.expected.clone(),
    ));
    let index: Arc<HashMap<String, usize>> = Arc::new(
        plan.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect(),
    );

    let receivers: Vec<_> = clients
        .iter()
        .map(|(i, c)| {
            tokio::spawn(receive(
                c.clone(),
                plan.names[*i].clone(),
                index.clone(),
                rec.clone(),
            ))
        })
        .collect();

    let senders: Vec<(usize, Arc<Client>, Target)> = clients
        .iter()
        .filter_map(|(i, c)| Some((*i, c.clone(), plan.target[*i].clone()?)))
        .collect();
    let period = Duration::from_secs_f64(senders.len() as f64 / spec.rate);
    let n_senders = senders.len();
    let sender_tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(k, (i, c, target))| {
            let offset = period.mul_f64(k as f64 / n_senders as f64);
            tokio::spawn(send_loop(
                c,
                i,
                target,
                offset,
                period,
                spec.size,
                rec.clone(),
            ))
        })
        .collect();
    let churn = match spec.pattern {
        Pattern::Churn {
            connects_per_sec,
            hold_ms,
        } if connects_per_sec > 0.0 => Some(tokio::spawn(churn_loop(
            spec.urls.clone(),
            tokens.clone(),
            format!("{}churn", spec.user_prefix),
            connects_per_sec,
            Duration::from_millis(hold_ms),
            rec.clone(),
        ))),
        _ => None,
    };
    let ticker = spec
        .progress
        .clone()
        .map(|label| tokio::spawn(report_progress(label, rec.clone())));
    for s in sender_tasks {
        let _ = s.await;
    }
    if let Some(c) = churn {
        let _ = c.await;
    }
    drain(&rec, spec.drain).await;
    if let Some(t) = ticker {
        t.abort();
    }
    for r in receivers {
        r.abort();
    }
    for (_, c) in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close().await;
        }
    }

    let measured_secs = spec
        .duration
        .saturating_sub(spec.warmup)
        .as_secs_f64()
        .max(1e-9);
    let (expected, lost) = rec.tally();
    let series = lock(&rec.series)
        .iter()
        .enumerate()
        .map(|(t, (n, h))| SeriesPoint {
            t: t as f64,
            delivered: *n,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        })
        .collect();
    let e2e_cdf = cdf(&lock(&rec.e2e));
    let (e2e_ms, ack_ms, connect_ms) = (
        Percentiles::of(&lock(&rec.e2e)),
        Percentiles::of(&lock(&rec.ack)),
        Percentiles::of(&lock(&rec.connect)),
    );
    Ok(LoadReport {
        offered_rate: spec.rate,
        sent: rec.sent.load(Ordering::Relaxed),
        acked: rec.acked.load(Ordering::Relaxed),
        send_errors: rec.send_errors.load(Ordering::Relaxed),
        expected,
        delivered: rec.delivered.load(Ordering::Relaxed),
        lost,
        duplicated: rec.duplicated.load(Ordering::Relaxed),
        reordered: rec.reordered.load(Ordering::Relaxed),
        misrouted: rec.misrouted.load(Ordering::Relaxed),
        connects_per_sec,
        acked_per_sec: rec.acked_measured.load(Ordering::Relaxed) as f64 / measured_secs,
        delivered_per_sec: rec.delivered_measured.load(Ordering::Relaxed) as f64 / measured_secs,
        e2e_ms,
        e2e_cdf,
        ack_ms,
        connect_ms,
        churned: rec.churned.load(Ordering::Relaxed),
        connect_errors: rec.connect_errors.load(Ordering::Relaxed),
        measured_secs,
        series,
    })
}

/// One user's sends on its fixed schedule until the duration ends.
async fn send_loop(
    c: Arc<Client>,
    me: usize,
    target: Target,
    offset: Duration,
    period: Duration,
    size: usize,
    rec: Arc<Recorder>,
) {
    let first = tokio::time::Instant::from_std(rec.start + offset);
    let mut tick = tokio::time::interval_at(first, period);
    // Late ticks fire at once: the schedule, not the system, decides when a
    // message was meant to go.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 0u64;
    loop {
        let intended = tick.tick().await.into_std();
        let intended_us = intended.saturating_duration_since(rec.start).as_micros() as u64;
        if Duration::from_micros(intended_us) >= rec.duration {
            return;
        }
        seq += 1;
        let mut content = format!("{me}:{seq}:{intended_us}:");
        if content.len() < size {
            content.push_str(&"x".repeat(size - content.len()));
        }
        let payload = match &target {
            Target::User(to) => json!({ "to": to, "content": content }),
            Target::Channel(id) => json!({ "channelId": id, "content": content }),
        };
        rec.sent.fetch_add(1, Ordering::Relaxed);
        match c.emit_with_ack("sendMessage", &payload) {
            Ok(ack) => {
                let rec = rec.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(30), ack).await {
                        Ok(Ok(v)) if v["ok"] == json!(true) => {
                            rec.record_ack(me, seq, intended_us, Instant::now());
                        }
                        _ => {
                            rec.send_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            Err(_) => {
                rec.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Opens sessions of fresh users at a fixed rate, each closed after `hold`.
async fn churn_loop(
    urls: Vec<String>,
    tokens: Tokens,
    prefix: String,
    per_sec: f64,
    hold: Duration,
    rec: Arc<Recorder>,
) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(rec.start),
        Duration::from_secs_f64(1.0 / per_sec),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for n in 0u64.. {
        let intended = tick.tick().await.into_std();
        if intended.saturating_duration_since(rec.start) >= rec.duration {
            break;
        }
        let url = urls[n as usize % urls.len()].clone();
        let token = tokens
            .mint(&format!("{prefix}{n}"), 600)
            .unwrap_or_default();
        let rec = rec.clone();
        tasks.push(tokio::spawn(async move {
            match Client::connect(&url, json!({ "token": token })).await {
                Ok(c) => {
                    let us = (intended.elapsed().as_micros() as u64).max(1);
                    lock(&rec.connect).saturating_record(us);
                    rec.churned.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(hold).await;
                    c.close().await;
                }
                Err(_) => {
                    rec.connect_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn report_progress(label: String, rec: Arc<Recorder>) {
    let total = rec.duration.as_secs_f64();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tick.tick().await;
        let t = rec.start.elapsed().as_secs_f64();
        let phase = if t < total { "sending" } else { "draining" };
        eprintln!(
            "[bench] {label}: {phase} {:.0}/{total:.0} s, sent {}, acked {}, delivered {}",
            t.min(total),
            rec.sent.load(Ordering::Relaxed),
            rec.acked.load(Ordering::Relaxed),
            rec.delivered.load(Ordering::Relaxed),
        );
    }
}

/// Waits for every acked message to arrive. A backlog still draining is not
/// loss: the wait ends only after `drain` without any progress.
async fn drain(rec: &Recorder, drain: Duration) {
    let mut deadline = Instant::now() + drain;
    let mut last_delivered = 0;
    loop {
        let sent = rec.sent.load(Ordering::Relaxed);
        let settled =
            rec.acked.load(Ordering::Relaxed) + rec.send_errors.load(Ordering::Relaxed) >= sent;
        let delivered = rec.delivered.load(Ordering::Relaxed);
        if settled && rec.tally().1 == 0 {
            return;
        }
        if delivered > last_delivered {
            last_delivered = delivered;
            deadline = Instant::now() + drain;
        }
        if Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts what one session receives from others.
async fn receive(
    c: Arc<Client>,
    me: String,
    index: Arc<HashMap<String, usize>>,
    rec: Arc<Recorder>,
) {
    let mut last_seq: HashMap<usize, u64> = HashMap::new();
    let mut seen: HashSet<(usize, u64)> = HashSet::new();
    loop {
        let Ok(e) = c.next_event(Duration::from_secs(3600)).await else {
            return;
        };
        if e.name != "MESSAGE_RECEIVE" && e.name != "GROUP_MESSAGE_RECEIVE" {
            continue;
        }
        // The sender's own sessions get an echo; it is not a delivery.
        if e.data["senderId"].as_str() == Some(me.as_str()) {
            continue;
        }
        let Some((sender, seq, intended_us)) = e.data["content"].as_str().and_then(parse_header)
        else {
            rec.misrouted.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // A header naming another sender than the event is not ours.
        let from = e.data["senderId"].as_str().and_then(|s| index.get(s));
        if from != Some(&sender) {
            rec.misrouted.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if !seen.insert((sender, seq)) {
            rec.duplicated.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let last = last_seq.entry(sender).or_insert(0);
        if seq < *last {
            rec.reordered.fetch_add(1, Ordering::Relaxed);
        } else {
            *last = seq;
        }
        rec.record_delivery(sender, seq, intended_us, e.at);
    }
}

fn parse_header(content: &str) -> Option<(usize, u64, u64)> {
    let mut it = content.splitn(4, ':');
    let sender = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    let intended = it.next()?.parse().ok()?;
    Some((sender, seq, intended))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        assert_eq!(parse_header("3:17:123456:xxxx"), Some((3, 17, 123456)));
        assert_eq!(parse_header("garbage"), None);
    }

    fn spec(pattern: Pattern, users: usize) -> LoadSpec {
        LoadSpec {
            urls: vec!["a".into(), "b".into(), "c".into()],
            pattern,
            users,
            rate: 10.0,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            size: 32,
            drain: Duration::from_secs(1),
            user_prefix: "u".into(),
            progress: None,
        }
    }

    #[test]
    fn personal_pairs_sit_on_different_gateways() {
        let p = Plan::new(&spec(Pattern::Personal, 7)).expect("plan");
        assert_eq!(p.names.len(), 8);
        for pair in 0..4 {
            assert_ne!(p.gateway[2 * pair], p.gateway[2 * pair + 1]);
        }
        assert!(p.expected.iter().all(|e| *e == 1));
    }

    #[test]
    fn offline_share_leaves_that_share_of_recipients_unconnected() {
        let p = Plan::new(&spec(
            Pattern::Offline {
                offline_share: 0.25,
            },
            40,
        ))
        .expect("plan");
        let offline = p.gateway.iter().filter(|g| g.is_none()).count();
        assert_eq!(offline, 5);
        let silent = p.expected.iter().filter(|e| **e == 0).count();
        assert_eq!(
            silent, 5,
            "each offline recipient's partner expects no delivery"
        );
    }

    #[test]
    fn group_members_spread_and_expect_the_others() {
        let p = Plan::new(&spec(Pattern::Group { members: 6 }, 10)).expect("plan");
        assert_eq!(p.channels.len(), 2);
        assert!(p.expected.iter().all(|e| *e == 5));
        let gws: HashSet<_> = p.channels[0].1.iter().map(|m| p.gateway[*m]).collect();
        assert_eq!(gws.len(), 3);
    }

    #[test]
    fn ledger_counts_missing_and_extra_deliveries() {
        let rec = Recorder::new(
            Instant::now(),
            Duration::ZERO,
            Duration::from_secs(1),
            vec![2, 1],
        );
        let now = Instant::now();
        rec.record_ack(0, 1, 0, now);
        rec.record_delivery(0, 1, 0, now);
        rec.record_ack(1, 1, 0, now);
        rec.record_delivery(1, 1, 0, now);
        rec.record_delivery(1, 1, 0, now);
        assert_eq!(rec.tally(), (3, 1), "sender 0's message reached 1 of 2");
        assert_eq!(rec.misrouted.load(Ordering::Relaxed), 1);
    }
}
