//! Connection loss and recovery: under traffic, the backend's connections
//! are killed on the broker (`rabbitmqctl close_connection`, only ours) or
//! cut by a proxy. Publishing, consuming and routing must resume, nothing
//! whose publish was confirmed may be lost, unsettled events come back, and
//! each gateway stream says `RoutesLost` so its keys are bound again.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fanout_backend::{
    BackendError, ConsumeOptions, FanoutBackend, IncomingDelivery, IncomingEvent, RouteOutcome,
    ServerEvent, ServerStream,
};
use fanout_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use futures::StreamExt;

/// Publishes until the broker confirms, retrying what fails (as a gateway
/// does for a client's retry). Returns how many attempts failed.
async fn publish_until_ok(b: &dyn FanoutBackend, e: IncomingEvent) -> usize {
    let mut failures = 0;
    loop {
        match b.publish_incoming(e.clone()).await {
            Ok(()) => return failures,
            Err(err) => {
                assert!(err.is_temporary(), "publish failed for good: {err}");
                failures += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Waits for the next `RoutesLost`, skipping messages.
async fn wait_routes_lost(stream: &mut ServerStream, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(ServerEvent::RoutesLost)) => return,
            Ok(Some(ServerEvent::Message(_))) => continue,
            Ok(None) => panic!("server stream ended"),
            Err(_) => panic!("no RoutesLost within {within:?}"),
        }
    }
}

async fn next_message(stream: &mut ServerStream) -> Bytes {
    match tokio::time::timeout(Duration::from_secs(15), stream.next()).await {
        Ok(Some(ServerEvent::Message(m))) => m.payload,
        Ok(Some(ServerEvent::RoutesLost)) => panic!("unexpected RoutesLost"),
        Ok(None) => panic!("server stream ended"),
        Err(_) => panic!("no message in time"),
    }
}

/// A backend connected through a new [`Proxy`] (settings `tweak`ed from
/// [`config`]), with gateway `gw1` registered and bound to `user`; `None`
/// when the broker is unreachable.
async fn gateway_via_proxy(
    user: &str,
    tweak: impl FnOnce(RabbitMqConfig) -> RabbitMqConfig,
) -> Option<(Proxy, RabbitMqBackend, ServerStream)> {
    if !broker_available().await {
        return None;
    }
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let ns = fresh_namespace();
    let a = connect(tweak(RabbitMqConfig {
        url: proxy.url(),
        ..config(&ns)
    }))
    .await;
    let stream = a.register_server(&sid("gw1")).await.expect("register");
    a.bind(&sid("gw1"), &key(user)).await.expect("bind");
    Some((proxy, a, stream))
}

/// After a loss: `gw1` binds `user` again and receives `payload` published
/// to it; then the namespace goes.
async fn rebind_and_receive(
    a: RabbitMqBackend,
    mut stream: ServerStream,
    user: &str,
    payload: &'static [u8],
) {
    a.bind(&sid("gw1"), &key(user)).await.expect("bind again");
    a.publish_outgoing(&key(user), Bytes::from_static(payload))
        .await
        .expect("publish");
    assert_eq!(next_message(&mut stream).await, Bytes::from_static(payload));
    a.delete_namespace().await.expect("delete namespace");
    a.shutdown().await.expect("shutdown");
}

/// What the consumer saw.
#[derive(Default)]
struct Seen {
    /// Ids whose ack the broker took.
    acked: BTreeSet<String>,
    /// Every delivery: (id, attempt).
    deliveries: Vec<(String, u32)>,
    /// `Err` items the stream surfaced.
    errors: usize,
}

/// The scenario both kill methods share. `kill` cuts the backend `a`'s
/// connections; `heal` lets them come back (a no-op for rabbitmqctl).
async fn traffic_survives_connection_loss(
    a: Arc<RabbitMqBackend>,
    p: Arc<RabbitMqBackend>,
    kill: impl FnOnce(),
    heal: impl FnOnce(),
    outage: Duration,
) {
    let s1 = sid("gw1");
    let mut stream = a.register_server(&s1).await.expect("register");
    for k in ["alice", "channel:c1"] {
        a.bind(&s1, &key(k)).await.expect("bind");
    }
    p.publish_outgoing(&key("alice"), Bytes::from_static(b"before"))
        .await
        .expect("publish");
    assert_eq!(
        next_message(&mut stream).await,
        Bytes::from_static(b"before")
    );

    // A worker on `a` that acks everything except the first delivery of
    // "hold", which it keeps unsettled across the connection loss.
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let held: Arc<Mutex<Vec<IncomingDelivery>>> = Arc::default();
    let mut consumer = a
        .consume_incoming(ConsumeOptions {
            consumer_name: "worker".into(),
            prefetch: 16,
        })
        .await
        .expect("consume");
    let worker = {
        let (seen, held) = (seen.clone(), held.clone());
        tokio::spawn(async move {
            while let Some(item) = consumer.next().await {
                let d = match item {
                    Ok(d) => d,
                    Err(e) => {
                        assert!(e.is_temporary(), "stream error: {e}");
                        seen.lock().expect("lock").errors += 1;
                        continue;
                    }
                };
                let (id, attempt) = (d.event.id.clone(), d.attempt);
                seen.lock()
                    .expect("lock")
                    .deliveries
                    .push((id.clone(), attempt));
                if id == "hold" && attempt == 1 {
                    held.lock().expect("lock").push(d);
                    continue;
                }
                if d.ack().await.is_ok() {
                    seen.lock().expect("lock").acked.insert(id);
                }
            }
        })
    };

    // Publishers on both backends, sequential, each retrying until the
    // broker confirms: the set of confirmed ids must all be consumed.
    let confirmed: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let failed_attempts = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let first = Arc::new(AtomicBool::new(true));
    let mut publishers = Vec::new();
    for (name, b) in [("a", a.clone()), ("p", p.clone())] {
        let (confirmed, failed, stop, first) = (
            confirmed.clone(),
            failed_attempts.clone(),
            stop.clone(),
            first.clone(),
        );
        publishers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let id = if name == "a" && first.swap(false, Ordering::SeqCst) {
                    "hold".to_owned()
                } else {
                    format!("{name}-{n}")
                };
                let k = format!("k{}", n % 7);
                failed.fetch_add(
                    publish_until_ok(b.as_ref(), event(&id, &k)).await,
                    Ordering::SeqCst,
                );
                confirmed.lock().expect("lock").insert(id);
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }

    // Let traffic flow, then kill.
    eventually(Duration::from_secs(20), "traffic before the kill", || {
        seen.lock().expect("lock").acked.len() >= 100 && !held.lock().expect("lock").is_empty()
    })
    .await;
    let reconnects = a.reconnect_count();
    kill();
    // While the connection is down, calls fail fast instead of hanging.
    let started = Instant::now();
    let outcome = a
        .publish_outgoing(&key("alice"), Bytes::from_static(b"during"))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a call during the outage took {:?}",
        started.elapsed()
    );
    if let Err(e) = &outcome {
        assert!(matches!(e, BackendError::Unavailable(_)), "got {e:?}");
    }
    tokio::time::sleep(outage).await;
    heal();
    eventually(Duration::from_secs(30), "reconnect", || {
        a.reconnect_count() > reconnects && a.is_connected()
    })
    .await;

    // Routing: the gateway is told its routes are gone, binds them again,
    // and messages flow.
    wait_routes_lost(&mut stream, Duration::from_secs(15)).await;
    for k in ["alice", "channel:c1"] {
        a.bind(&s1, &key(k)).await.expect("bind again");
    }
    let out = p
        .publish_outgoing(&key("channel:c1"), Bytes::from_static(b"after"))
        .await
        .expect("publish after reconnect");
    assert_eq!(out, RouteOutcome::Routed { servers: None });
    assert_eq!(
        next_message(&mut stream).await,
        Bytes::from_static(b"after")
    );

    // More traffic after the reconnect, then stop publishing.
    let acked_before = seen.lock().expect("lock").acked.len();
    eventually(
        Duration::from_secs(30),
        "traffic after the reconnect",
        || seen.lock().expect("lock").acked.len() >= acked_before + 100,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in publishers {
        t.await.expect("publisher");
    }

    // Nothing confirmed is lost: every confirmed event is acked by the
    // worker, eventually (some twice: at-least-once).
    let confirmed = confirmed.lock().expect("lock").clone();
    eventually(
        Duration::from_secs(30),
        "every confirmed event consumed",
        || {
            let seen = seen.lock().expect("lock");
            confirmed.iter().all(|id| seen.acked.contains(id))
        },
    )
    .await;

    // The event held unsettled across the loss came back as a redelivery,
    // and its stale handle cannot settle it any more.
    {
        let seen = seen.lock().expect("lock");
        let hold: Vec<u32> = seen
            .deliveries
            .iter()
            .filter(|(id, _)| id == "hold")
            .map(|(_, a)| *a)
            .collect();
        assert!(hold.len() >= 2, "hold delivered {hold:?}");
        assert!(
            hold[1..].iter().all(|a| *a >= 2),
            "redelivery attempts {hold:?}"
        );
        assert!(seen.acked.contains("hold"));
        eprintln!(
            "confirmed {} events ({} publish attempts failed during the outage), {} deliveries, {} stream errors",
            confirmed.len(),
            failed_attempts.load(Ordering::SeqCst),
            seen.deliveries.len(),
            seen.errors
        );
    }
    let stale = held.lock().expect("lock").pop().expect("held delivery");
    assert!(
        stale.ack().await.is_err(),
        "a delivery from the lost connection cannot be acked"
    );

    worker.abort();
    a.delete_namespace().await.expect("delete namespace");
    a.shutdown().await.expect("shutdown");
    p.shutdown().await.expect("shutdown");
}

/// The broker closes our connections (`rabbitmqctl close_connection` on
/// this backend's named connections only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_by_broker_under_traffic() {
    if !broker_available().await || !rabbitmqctl_available() {
        return;
    }
    let ns = fresh_namespace();
    let a = Arc::new(connect(config(&ns)).await);
    let p = Arc::new(connect(config(&ns)).await);
    let names = a.connection_names().to_vec();
    traffic_survives_connection_loss(
        a,
        p,
        move || {
            let closed = kill_connections(&names);
            assert!(closed >= 1, "no connection named {names:?} found");
        },
        || {},
        Duration::ZERO,
    )
    .await;
}

/// The network between the backend and the broker goes away for two
/// seconds (a proxy drops the connections and refuses new ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_outage_under_traffic() {
    if !broker_available().await {
        return;
    }
    let proxy = Arc::new(Proxy::start("127.0.0.1:5672").await);
    let ns = fresh_namespace();
    let a = Arc::new(
        connect(RabbitMqConfig {
            url: proxy.url(),
            ..config(&ns)
        })
        .await,
    );
    let p = Arc::new(connect(config(&ns)).await);
    let (cut, heal) = (proxy.clone(), proxy.clone());
    traffic_survives_connection_loss(
        a,
        p,
        move || cut.cut(),
        move || heal.restore(),
        Duration::from_secs(2),
    )
    .await;
}

/// While the broker is unreachable every call answers at once with
/// `Unavailable` (never hangs), `health` says so, and all of it works again
/// after the network comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_fast_while_disconnected() {
    let Some((proxy, a, mut stream)) = gateway_via_proxy("bob", |c| c).await else {
        return;
    };
    let s1 = sid("gw1");
    a.health().await.expect("healthy");

    proxy.cut();
    eventually(Duration::from_secs(10), "the loss is noticed", || {
        !a.is_connected()
    })
    .await;
    let mut timings: HashMap<&str, Duration> = HashMap::new();
    macro_rules! fast_fail {
        ($name:literal, $call:expr) => {{
            let t = Instant::now();
            let r = $call.await;
            timings.insert($name, t.elapsed());
            match r {
                Err(BackendError::Unavailable(_)) => {}
                other => panic!("{}: expected Unavailable, got {other:?}", $name),
            }
        }};
    }
    fast_fail!("health", a.health());
    fast_fail!("publish_incoming", a.publish_incoming(event("x", "k")));
    fast_fail!(
        "publish_outgoing",
        a.publish_outgoing(&key("bob"), Bytes::from_static(b"x"))
    );
    fast_fail!("bind", a.bind(&s1, &key("carol")));
    fast_fail!("dead_letters", a.dead_letters(10));
    for (name, t) in &timings {
        assert!(*t < Duration::from_millis(500), "{name} took {t:?}");
    }

    proxy.restore();
    wait_routes_lost(&mut stream, Duration::from_secs(30)).await;
    a.health().await.expect("healthy again");
    rebind_and_receive(a, stream, "bob", b"back").await;
}

/// A network that silently stops carrying packets (no reset): the
/// connections look open, calls time out, the supervisor probes, gives the
/// session up and reconnects once packets flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_network_failure_is_detected() {
    let Some((proxy, a, mut stream)) = gateway_via_proxy("dan", |c| RabbitMqConfig {
        operation_timeout: Duration::from_secs(1),
        ..c
    })
    .await
    else {
        return;
    };
    let reconnects = a.reconnect_count();

    proxy.freeze();
    // Calls are bounded by the operation timeout, and fail as Unavailable.
    let t = Instant::now();
    match a.publish_incoming(event("x", "k")).await {
        Err(BackendError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    eventually(
        Duration::from_secs(15),
        "the dead connection is given up",
        || !a.is_connected(),
    )
    .await;
    proxy.thaw();
    wait_routes_lost(&mut stream, Duration::from_secs(30)).await;
    assert!(a.reconnect_count() > reconnects);
    rebind_and_receive(a, stream, "dan", b"again").await;
}
