//! The ceiling: a workload's message pattern pushed through a backend crate
//! directly — publish on the incoming side, consume, publish on the
//! outgoing side to the recipients' keys, receive on registered servers —
//! with no gateway, worker, Socket.IO or database. Closed loop with a
//! window of messages in flight, so it measures the most the broker path
//! can carry on this machine, not a latency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use fanout_backend::{
    BackendError, ConsumeOptions, DynBackend, IncomingEvent, OrderingKey, RouteKey, ServerEvent,
    ServerId,
};

use crate::load::Pattern;

/// What the broker alone carried.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RawResult {
    /// Messages through both sides per second.
    pub msgs_per_sec: f64,
    /// Deliveries per second (a group message counts once per member).
    pub deliveries_per_sec: f64,
    /// Seconds measured.
    pub secs: f64,
}

/// How to run it.
#[derive(Debug, Clone)]
pub struct RawSpec {
    /// Who sends to whom (the workload's).
    pub pattern: Pattern,
    /// Users (the workload's).
    pub users: usize,
    /// Payload bytes.
    pub size: usize,
    /// Measuring time.
    pub duration: Duration,
    /// Simulated gateways.
    pub servers: usize,
    /// Incoming consumers (as the workers' total).
    pub consumers: usize,
    /// Prefix of server ids (`{namespace}-raw`).
    pub server_prefix: String,
}

/// Messages in flight on each side.
const WINDOW: usize = 256;

/// Runs the pattern through `backend`, which must be fresh (its own
/// namespace); deregisters its servers afterwards.
pub async fn run(backend: DynBackend, spec: &RawSpec) -> Result<RawResult, BackendError> {
    let servers: Vec<ServerId> = (0..spec.servers.max(1))
        .map(|i| ServerId::new(format!("{}-{i}", spec.server_prefix)))
        .collect::<Result<_, _>>()?;
    let routes = Routes::new(&spec.pattern, spec.users, servers.len())?;

    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (s, server) in servers.iter().enumerate() {
        let mut stream = backend.register_server(server).await?;
        for (key, local) in &routes.bound[s] {
            if *local > 0 {
                backend.bind(server, key).await?;
            }
        }
        let local: HashMap<String, u64> = routes.bound[s]
            .iter()
            .map(|(k, n)| (k.as_routing_key(), *n))
            .collect();
        let delivered = delivered.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = stream.next().await {
                if let ServerEvent::Message(m) = ev {
                    let n = local.get(&m.key.as_routing_key()).copied().unwrap_or(0);
                    delivered.fetch_add(n, Ordering::Relaxed);
                }
            }
        }));
    }

    let routed = Arc::new(AtomicU64::new(0));
    for c in 0..spec.consumers.max(1) {
        let incoming = backend
            .consume_incoming(ConsumeOptions {
                consumer_name: format!("{}-consumer-{c}", spec.server_prefix),
                prefetch: 512,
            })
            .await?;
        let (backend, routed, stop) = (backend.clone(), routed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            incoming
                .take_while(|_| std::future::ready(!stop.load(Ordering::Relaxed)))
                .for_each_concurrent(WINDOW, |d| {
                    let (backend, routed) = (backend.clone(), routed.clone());
                    async move {
                        let Ok(d) = d else { return };
                        // The payload starts with the route key and a space.
                        let key = d
                            .event
                            .payload
                            .split(|b| *b == b' ')
                            .next()
                            .and_then(|k| std::str::from_utf8(k).ok())
                            .and_then(RouteKey::parse);
                        if let Some(key) = key {
                            if backend
                                .publish_outgoing(&key, d.event.payload.clone())
                                .await
                                .is_ok()
                            {
                                routed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        let _ = d.ack().await;
                    }
                })
                .await;
        }));
    }

    // Publish for the whole duration; count what got through in it.
    let start = Instant::now();
    let deadline = start + spec.duration;
    let (routed0, delivered0) = (
        routed.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
    );
    let padding = "x".repeat(spec.size);
    futures::stream::iter(0u64..)
        .take_while(|_| std::future::ready(Instant::now() < deadline))
        .for_each_concurrent(WINDOW, |n| {
            let (backend, routes, padding) = (backend.clone(), &routes, &padding);
            async move {
                let (key, ordering) = routes.message(n as usize);
                let event = IncomingEvent {
                    id: format!("raw-{n}"),
                    ordering_key: ordering,
                    payload: Bytes::from(format!("{} {padding}", key.as_routing_key())),
                };
                let _ = backend.publish_incoming(event).await;
                // An in-process backend is always ready: without a yield
                // the publisher would starve the consumers it measures.
                tokio::task::yield_now().await;
            }
        })
        .await;
    // Let what is in flight land, so the rate counts whole messages (a
    // backlog that is still draining is part of what was carried).
    let mut last = (u64::MAX, u64::MAX);
    let mut last_change = Instant::now();
    let settle_until = last_change + Duration::from_secs(10);
    loop {
        let now = (
            routed.load(Ordering::Relaxed),
            delivered.load(Ordering::Relaxed),
        );
        if now == last || Instant::now() > settle_until {
            break;
        }
        last = now;
        last_change = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = last_change.duration_since(start).as_secs_f64().max(1e-9);
    let msgs = routed.load(Ordering::Relaxed) - routed0;
    let deliveries = delivered.load(Ordering::Relaxed) - delivered0;
    stop.store(true, Ordering::Relaxed);
    for server in &servers {
        let _ = backend.deregister_server(server).await;
    }
    for t in tasks {
        t.abort();
    }
    Ok(RawResult {
        msgs_per_sec: msgs as f64 / secs,
        deliveries_per_sec: deliveries as f64 / secs,
        secs,
    })
}

/// Which keys each simulated server holds, with how many local recipients,
/// and where message `n` goes.
struct Routes {
    bound: Vec<Vec<(RouteKey, u64)>>,
    targets: Vec<(RouteKey, OrderingKey)>,
}

impl Routes {
    fn new(pattern: &Pattern, users: usize, servers: usize) -> Result<Routes, BackendError> {
        let user = |i: usize| format!("u{i}");
        let mut bound = vec![Vec::new(); servers];
        let mut targets = Vec::new();
        match pattern {
            Pattern::Group { members } => {
                let k = (*members).max(2);
                for c in 0..users.div_ceil(k).max(1) {
                    let id = format!("c{c}");
                    let key = RouteKey::channel(&id)?;
                    // Members round-robin over servers, as in the load test.
                    // Every member counts as a delivery here: there is no
                    // sender whose echo the load test would leave out.
                    for (s, b) in bound.iter_mut().enumerate() {
                        let local = (0..k).filter(|m| (c * k + m) % servers == s).count();
                        b.push((key.clone(), local as u64));
                    }
                    targets.push((key, OrderingKey::channel(&id)));
                }
            }
            // Jitter's pairs and channels are measured end to end only
            // (its workload has no raw baseline); its pairs are personal.
            Pattern::Personal
            | Pattern::Churn { .. }
            | Pattern::Offline { .. }
            | Pattern::Jitter { .. } => {
                let share = match pattern {
                    Pattern::Offline { offline_share } => *offline_share,
                    _ => 0.0,
                };
                let pairs = users.div_ceil(2).max(1);
                for p in 0..pairs {
                    let (a, b) = (user(2 * p), user(2 * p + 1));
                    let offline = crate::load::is_offline_pair(p, share);
                    let key = RouteKey::user(&b)?;
                    if !offline {
                        bound[(p + 1) % servers].push((key.clone(), 1));
                    }
                    targets.push((key, OrderingKey::direct(&a, &b)));
                }
            }
        }
        Ok(Routes { bound, targets })
    }

    fn message(&self, n: usize) -> (RouteKey, OrderingKey) {
        self.targets[n % self.targets.len()].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_backend_carries_the_pattern() {
        let backend: DynBackend = Arc::new(fanout_memory::MemoryBackend::new(
            fanout_memory::MemoryConfig::default(),
        ));
        for pattern in [
            Pattern::Personal,
            Pattern::Group { members: 4 },
            Pattern::Offline { offline_share: 1.0 },
        ] {
            let spec = RawSpec {
                pattern: pattern.clone(),
                users: 12,
                size: 16,
                duration: Duration::from_millis(300),
                servers: 3,
                consumers: 2,
                server_prefix: "raw".into(),
            };
            let r = run(backend.clone(), &spec).await.expect("raw run");
            assert!(r.msgs_per_sec > 0.0, "{pattern:?}: {r:?}");
            match pattern {
                Pattern::Offline { .. } => assert_eq!(r.deliveries_per_sec, 0.0),
                Pattern::Group { .. } => {
                    assert!(r.deliveries_per_sec > r.msgs_per_sec * 2.0, "{r:?}")
                }
                _ => assert!(r.deliveries_per_sec > 0.0),
            }
        }
    }
}
