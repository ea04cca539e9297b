//! The load generator: virtual users on real gateways, speaking Socket.IO
//! over WebSocket ([`crate::client`]), sending on a fixed open-loop
//! schedule. Latency is measured from each message's *intended* send time,
//! so a stalled system cannot hide its latency by slowing the sender down
//! (coordinated omission).
//!
//! Workload `personal`: users are paired (0↔1, 2↔3, …), the two of a pair on
//! different gateways when there are several; each sends to its partner.
//! Every message carries `sender:seq:intended_us:` so the receiver can
//! compute latency and count losses, duplicates and reorderings.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

use crate::auth::Tokens;
use crate::client::{Client, ClientError};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Gateway base URLs (`http://host:port`); users are spread over them.
    pub urls: Vec<String>,
    /// Virtual users (rounded up to an even number).
    pub users: usize,
    /// Messages per second, all users together.
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
    /// Prefix of the user ids, unique per run.
    pub user_prefix: String,
}

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
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

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Sends issued.
    pub sent: u64,
    /// Sends acked `ok`.
    pub acked: u64,
    /// Sends refused or not acked in time.
    pub send_errors: u64,
    /// Distinct messages received by their recipient.
    pub delivered: u64,
    /// Acked messages not received once deliveries stopped coming for the
    /// drain time.
    pub lost: u64,
    /// Messages a recipient's session received more than once.
    pub duplicated: u64,
    /// Messages received after a later message of the same sender.
    pub reordered: u64,
    /// Sessions established per second during set-up.
    pub connects_per_sec: f64,
    /// Messages received per second over the measured window.
    pub delivered_per_sec: f64,
    /// Intended send -> recipient receive.
    pub e2e_ms: Percentiles,
    /// Intended send -> ack.
    pub ack_ms: Percentiles,
    /// Seconds measured (duration minus warm-up).
    pub measured_secs: f64,
}

/// Why a run could not proceed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A session could not connect.
    #[error("connecting user {user}: {source}")]
    Connect {
        /// The user.
        user: String,
        /// Why.
        source: ClientError,
    },
    /// A bad spec.
    #[error("{0}")]
    Spec(String),
}

struct Recorder {
    start: Instant,
    warmup: Duration,
    e2e: Mutex<Histogram<u64>>,
    ack: Mutex<Histogram<u64>>,
    sent: AtomicU64,
    acked: AtomicU64,
    send_errors: AtomicU64,
    delivered: AtomicU64,
    delivered_measured: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits; the bounds are constants.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

impl Recorder {
    fn record(&self, h: &Mutex<Histogram<u64>>, intended_us: u64, at: Instant) {
        if Duration::from_micros(intended_us) < self.warmup {
            return;
        }
        let latency = at.saturating_duration_since(self.start + Duration::from_micros(intended_us));
        let us = (latency.as_micros() as u64).max(1);
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record(us);
    }
}

/// Runs the `personal` workload against running gateways.
pub async fn run_personal(spec: &LoadSpec, tokens: &Tokens) -> Result<LoadReport, LoadError> {
    if spec.urls.is_empty() || spec.users == 0 || spec.rate <= 0.0 {
        return Err(LoadError::Spec(
            "need at least one gateway URL, one user and a positive rate".into(),
        ));
    }
    let users = spec.users.div_ceil(2) * 2;
    let name = |i: usize| format!("{}{i}", spec.user_prefix);
    // Partners sit on different gateways when there are several.
    let gateway_of = |i: usize| (i / 2 + i % 2) % spec.urls.len();

    let t_connect = Instant::now();
    let clients: Vec<Client> = futures::stream::iter(0..users)
        .map(|i| {
            let url = spec.urls[gateway_of(i)].clone();
            let user = name(i);
            let token = tokens.mint(&user, 3600).unwrap_or_default();
            async move {
                Client::connect(&url, json!({ "token": token }))
                    .await
                    .map_err(|source| LoadError::Connect { user, source })
            }
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let connects_per_sec = users as f64 / t_connect.elapsed().as_secs_f64().max(1e-9);
    let clients: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();

    let rec = Arc::new(Recorder {
        start: Instant::now() + Duration::from_millis(200),
        warmup: spec.warmup,
        e2e: Mutex::new(histogram()),
        ack: Mutex::new(histogram()),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        delivered_measured: AtomicU64::new(0),
        duplicated: AtomicU64::new(0),
        reordered: AtomicU64::new(0),
    });

    let receivers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(receive(c.clone(), name(i), rec.clone())))
        .collect();

    let period = Duration::from_secs_f64(users as f64 / spec.rate);
    let senders: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, rec) = (c.clone(), rec.clone());
            let to = name(i ^ 1);
            let offset = period.mul_f64(i as f64 / users as f64);
            let (duration, size) = (spec.duration, spec.size);
            tokio::spawn(async move {
                let first = tokio::time::Instant::from_std(rec.start + offset);
                let mut tick = tokio::time::interval_at(first, period);
                // Late ticks fire at once: the schedule, not the system,
                // decides when a message was meant to go.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut seq = 0u64;
                loop {
                    let intended = tick.tick().await.into_std();
                    let intended_us =
                        intended.saturating_duration_since(rec.start).as_micros() as u64;
                    if Duration::from_micros(intended_us) >= duration {
                        break;
                    }
                    seq += 1;
                    let mut content = format!("{i}:{seq}:{intended_us}:");
                    if content.len() < size {
                        content.push_str(&"x".repeat(size - content.len()));
                    }
                    rec.sent.fetch_add(1, Ordering::Relaxed);
                    match c.emit_with_ack("sendMessage", &json!({ "to": to, "content": content })) {
                        Ok(ack) => {
                            let rec = rec.clone();
                            tokio::spawn(async move {
                                match tokio::time::timeout(Duration::from_secs(30), ack).await {
                                    Ok(Ok(v)) if v["ok"] == json!(true) => {
                                        rec.acked.fetch_add(1, Ordering::Relaxed);
                                        rec.record(&rec.ack, intended_us, Instant::now());
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
            })
        })
        .collect();
    for s in senders {
        let _ = s.await;
    }
    // Wait for every acked message to arrive. A backlog still draining is
    // not loss: the wait ends only after `drain` without any progress.
    let mut deadline = Instant::now() + spec.drain;
    let mut last_delivered = 0;
    loop {
        let settled = rec.acked.load(Ordering::Relaxed) + rec.send_errors.load(Ordering::Relaxed)
            >= rec.sent.load(Ordering::Relaxed);
        let delivered = rec.delivered.load(Ordering::Relaxed);
        if settled && delivered >= rec.acked.load(Ordering::Relaxed) {
            break;
        }
        if delivered > last_delivered {
            last_delivered = delivered;
            deadline = Instant::now() + spec.drain;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in receivers {
        r.abort();
    }
    let measured_secs = spec
        .duration
        .saturating_sub(spec.warmup)
        .as_secs_f64()
        .max(1e-9);
    let acked = rec.acked.load(Ordering::Relaxed);
    let delivered = rec.delivered.load(Ordering::Relaxed);
    let e2e = Percentiles::of(&rec.e2e.lock().unwrap_or_else(|p| p.into_inner()));
    let ack = Percentiles::of(&rec.ack.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(LoadReport {
        sent: rec.sent.load(Ordering::Relaxed),
        acked,
        send_errors: rec.send_errors.load(Ordering::Relaxed),
        delivered,
        lost: acked.saturating_sub(delivered),
        duplicated: rec.duplicated.load(Ordering::Relaxed),
        reordered: rec.reordered.load(Ordering::Relaxed),
        connects_per_sec,
        delivered_per_sec: rec.delivered_measured.load(Ordering::Relaxed) as f64 / measured_secs,
        e2e_ms: e2e,
        ack_ms: ack,
        measured_secs,
    })
}

/// Counts what one user receives from its partner.
async fn receive(c: Arc<Client>, me: String, rec: Arc<Recorder>) {
    let mut last_seq: HashMap<u64, u64> = HashMap::new();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    loop {
        let Ok(e) = c.next_event(Duration::from_secs(3600)).await else {
            return;
        };
        if e.name != "MESSAGE_RECEIVE" || e.data["senderId"].as_str() == Some(me.as_str()) {
            continue;
        }
        let Some((sender, seq, intended_us)) = e.data["content"].as_str().and_then(parse_header)
        else {
            continue;
        };
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
        rec.delivered.fetch_add(1, Ordering::Relaxed);
        if Duration::from_micros(intended_us) >= rec.warmup {
            rec.delivered_measured.fetch_add(1, Ordering::Relaxed);
        }
        rec.record(&rec.e2e, intended_us, e.at);
    }
}

fn parse_header(content: &str) -> Option<(u64, u64, u64)> {
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
}
