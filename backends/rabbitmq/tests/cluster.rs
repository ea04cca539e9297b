//! The backend on a three-node RabbitMQ cluster (`common::cluster`, started
//! once for this binary, ~30 s): partition leaders spread over the nodes;
//! a node killed under traffic loses no confirmed event and its gateway
//! recovers on another node; a gateway holding 10,000 bindings killed or
//! stopped does not stall publishers (rabbitmq-server #12926); and, ignored
//! by default, the cost of binding churn on one node against three.
//!
//! The tests that kill nodes or measure run one at a time
//! (`cluster::exclusive`) and leave every node running when they end.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{cluster, exclusive, wait_for, Cluster};
use common::*;
use fanout_backend::{BackendError, ConsumeOptions, FanoutBackend, RouteKey, ServerEvent};
use fanout_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use futures::StreamExt;

/// Settings of a backend on the whole cluster.
fn cluster_config(c: &Cluster, ns: &str) -> RabbitMqConfig {
    RabbitMqConfig {
        url: c.url_list(),
        partitions: 6,
        ..config(ns)
    }
}

/// The node a backend is connected to now.
fn node_of(c: &Cluster, b: &RabbitMqBackend) -> Option<usize> {
    b.connected_node().and_then(|u| c.node_of(&u))
}

/// `x-queue-leader-locator: balanced`: the partition queues' leaders are
/// on every node, not all on the node the declaring process used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leaders_are_spread_over_the_nodes() {
    let Some(c) = cluster().await else { return };
    let _one_at_a_time = exclusive().await;
    let ns = fresh_namespace();
    let b = connect(cluster_config(c, &ns)).await;
    let prefix = format!("{ns}.in.");
    let leaders = tokio::task::spawn_blocking(move || c.leaders(&prefix))
        .await
        .expect("rabbitmqctl task")
        .expect("list the leaders");
    assert_eq!(leaders.len(), 6, "{leaders:?}");
    let nodes: BTreeSet<&str> = leaders.iter().map(|(_, l)| l.as_str()).collect();
    println!("partition leaders: {leaders:?}");
    assert_eq!(
        nodes.len(),
        3,
        "leaders should be on all three nodes: {leaders:?}"
    );
    b.delete_namespace().await.expect("delete namespace");
    b.shutdown().await.expect("shutdown");
}

/// Counts of the node-loss scenario, shared with its tasks.
#[derive(Default)]
struct Traffic {
    /// Incoming events whose publish returned Ok.
    confirmed: Mutex<BTreeSet<String>>,
    /// Incoming events the worker acked.
    consumed: Mutex<BTreeSet<String>>,
    incoming_failed: AtomicUsize,
    outgoing_ok: AtomicUsize,
    outgoing_failed: AtomicUsize,
    /// Messages the gateway received.
    received: AtomicUsize,
    /// Milliseconds since the start of the test at which the gateway's
    /// stream said RoutesLost / had bound its keys again / received its
    /// first message after that (0: not yet).
    routes_lost_at: AtomicU64,
    rebound_at: AtomicU64,
    received_again_at: AtomicU64,
    stop: AtomicBool,
}

/// Under steady traffic (a gateway publishing incoming events and holding
/// ten keys, two workers of one consumer group consuming them, one of them
/// publishing to those keys), the node the gateway and one worker are
/// connected to is killed with SIGKILL. Every event whose publish returned
/// Ok is consumed; the gateway's stream says `RoutesLost`, it reconnects to
/// another node, binds again and receives again; the worker reconnects to
/// another node and the group goes on. Prints the recovery times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_confirmed_event_and_its_gateway_moves() {
    let Some(c) = cluster().await else { return };
    let _one_at_a_time = exclusive().await;
    let ns = fresh_namespace();
    let cfg = cluster_config(c, &ns);
    let gateway = Arc::new(connect(cfg.clone()).await);
    let victim = node_of(c, &gateway).expect("gateway connected");
    // One worker on the node that will die (each backend starts at a
    // random node: draw until one lands there) and one elsewhere, so the
    // consumer group loses a member and gets it back on another node.
    let mut worker = None;
    let mut other = None;
    for _ in 0..50 {
        let b = connect(cfg.clone()).await;
        match node_of(c, &b) {
            Some(n) if n == victim && worker.is_none() => worker = Some(Arc::new(b)),
            Some(n) if n != victim && other.is_none() => other = Some(Arc::new(b)),
            _ => b.shutdown().await.expect("shutdown"),
        }
        if worker.is_some() && other.is_some() {
            break;
        }
    }
    let (Some(worker), Some(other)) = (worker, other) else {
        panic!("no backend landed on node {victim} and another in 50 connections");
    };
    println!(
        "gateway and worker on node {victim}, second worker on node {:?}",
        node_of(c, &other)
    );
    let t0 = Instant::now();
    let ms = move || t0.elapsed().as_millis() as u64;
    let traffic: Arc<Traffic> = Arc::default();
    let keys: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();

    let server = sid("gw1");
    let mut stream = gateway.register_server(&server).await.expect("register");
    for k in &keys {
        gateway.bind(&server, &key(k)).await.expect("bind");
    }

    // The gateway's stream: count messages; on RoutesLost bind every key
    // again (retrying while the cluster settles), as the gateway does.
    let reader = {
        let (t, g, keys, server) = (
            traffic.clone(),
            gateway.clone(),
            keys.clone(),
            server.clone(),
        );
        tokio::spawn(async move {
            while let Some(ev) = stream.next().await {
                match ev {
                    ServerEvent::Message(_) => {
                        t.received.fetch_add(1, Ordering::SeqCst);
                        if t.rebound_at.load(Ordering::SeqCst) > 0 {
                            let _ = t.received_again_at.compare_exchange(
                                0,
                                ms(),
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            );
                        }
                    }
                    ServerEvent::RoutesLost => {
                        let _ = t.routes_lost_at.compare_exchange(
                            0,
                            ms(),
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        for k in &keys {
                            while let Err(e) = g.bind(&server, &key(k)).await {
                                assert!(e.is_temporary(), "bind failed for good: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                        t.rebound_at.store(ms(), Ordering::SeqCst);
                    }
                }
            }
        })
    };

    // The workers (one consumer group): ack everything, remember what
    // was acked.
    let mut consuming = Vec::new();
    for w in [&worker, &other] {
        let mut consumer = w
            .consume_incoming(ConsumeOptions {
                consumer_name: "worker".into(),
                prefetch: 32,
            })
            .await
            .expect("consume");
        let t = traffic.clone();
        consuming.push(tokio::spawn(async move {
            while let Some(item) = consumer.next().await {
                let Ok(d) = item else { continue };
                let id = d.event.id.clone();
                if d.ack().await.is_ok() {
                    t.consumed.lock().expect("lock").insert(id);
                }
            }
        }));
    }

    // The worker's outgoing publishes to the gateway's keys.
    let outgoing = {
        let (t, w, keys) = (traffic.clone(), other.clone(), keys.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !t.stop.load(Ordering::SeqCst) {
                let k = key(&keys[n % keys.len()]);
                match w.publish_outgoing(&k, Bytes::from_static(b"m")).await {
                    Ok(_) => t.outgoing_ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => t.outgoing_failed.fetch_add(1, Ordering::SeqCst),
                };
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // The gateway's incoming publishes, each a new event; an Ok must
    // never be lost.
    let incoming = {
        let (t, g) = (traffic.clone(), gateway.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !t.stop.load(Ordering::SeqCst) {
                let id = format!("e{n}");
                match g
                    .publish_incoming(event(&id, &format!("c{}", n % 13)))
                    .await
                {
                    Ok(()) => {
                        t.confirmed.lock().expect("lock").insert(id);
                    }
                    Err(e) => {
                        assert!(e.is_temporary(), "publish failed for good: {e}");
                        t.incoming_failed.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };

    wait_for(Duration::from_secs(30), "traffic before the kill", || {
        traffic.consumed.lock().expect("lock").len() >= 200
            && traffic.received.load(Ordering::SeqCst) >= 50
    })
    .await;
    let confirmed_before = traffic.confirmed.lock().expect("lock").len();
    let killed_at = ms();
    tokio::task::spawn_blocking(move || c.kill(victim))
        .await
        .expect("kill task")
        .expect("kill the node");
    println!(
        "killed node {victim} at {killed_at} ms (SIGKILL took {} ms)",
        ms() - killed_at
    );

    wait_for(Duration::from_secs(60), "gateway on another node", || {
        node_of(c, &gateway).is_some_and(|n| n != victim)
    })
    .await;
    let moved = ms() - killed_at;
    wait_for(Duration::from_secs(60), "RoutesLost and rebinding", || {
        traffic.rebound_at.load(Ordering::SeqCst) > 0
    })
    .await;
    wait_for(Duration::from_secs(60), "a message after rebinding", || {
        traffic.received_again_at.load(Ordering::SeqCst) > 0
    })
    .await;
    wait_for(
        Duration::from_secs(60),
        "the worker on another node",
        || node_of(c, &worker).is_some_and(|n| n != victim),
    )
    .await;
    // The consumer group goes on: events published after the kill are
    // consumed.
    wait_for(
        Duration::from_secs(60),
        "events published after the kill consumed",
        || {
            let confirmed = traffic.confirmed.lock().expect("lock");
            let consumed = traffic.consumed.lock().expect("lock");
            confirmed.len() > confirmed_before + 50 && consumed.len() > confirmed_before + 50
        },
    )
    .await;
    let consumed_again = ms() - killed_at;
    tokio::time::sleep(Duration::from_secs(2)).await;
    traffic.stop.store(true, Ordering::SeqCst);
    let _ = incoming.await;
    let _ = outgoing.await;

    let drained = wait_for(
        Duration::from_secs(90),
        "every confirmed event consumed",
        || {
            let confirmed = traffic.confirmed.lock().expect("lock");
            let consumed = traffic.consumed.lock().expect("lock");
            confirmed.is_subset(&consumed)
        },
    )
    .await;
    let confirmed = traffic.confirmed.lock().expect("lock").len();
    let lost = traffic
        .confirmed
        .lock()
        .expect("lock")
        .difference(&traffic.consumed.lock().expect("lock"))
        .count();
    let at = |a: &AtomicU64| a.load(Ordering::SeqCst).saturating_sub(killed_at);
    println!(
        "node {victim} killed: gateway reconnected to node {:?} after {} ms; RoutesLost after {} ms; \
         keys bound again after {} ms; first message after {} ms; 50 events published after the kill consumed after {} ms; \
         incoming confirmed {confirmed}, failed {} (retried by clients), acked-but-lost {lost}; \
         outgoing ok {}, failed {}; drained in {} ms",
        node_of(c, &gateway),
        moved,
        at(&traffic.routes_lost_at),
        at(&traffic.rebound_at),
        at(&traffic.received_again_at),
        consumed_again,
        traffic.incoming_failed.load(Ordering::SeqCst),
        traffic.outgoing_ok.load(Ordering::SeqCst),
        traffic.outgoing_failed.load(Ordering::SeqCst),
        drained.as_millis(),
    );
    assert_eq!(lost, 0);

    // Leave the cluster whole for the next test.
    tokio::task::spawn_blocking(move || c.start_node(victim))
        .await
        .expect("start task")
        .expect("start the node again");
    for task in consuming {
        task.abort();
    }
    reader.abort();
    gateway.delete_namespace().await.expect("delete namespace");
    for b in [&gateway, &worker, &other] {
        b.shutdown().await.expect("shutdown");
    }
}

/// How a gateway with many bindings goes away.
#[derive(Debug, Clone, Copy)]
enum Departure {
    /// Its process dies: the TCP connections close without a word (a proxy
    /// drops them), and the broker deletes its exclusive queue with every
    /// binding at once: the case of rabbitmq-server #12926.
    Killed,
    /// It shuts down: `deregister_server` unbinds in batches, then deletes
    /// the queue.
    Stopped,
    /// Its node dies (SIGKILL): the other nodes delete the dead node's
    /// exclusive queues and their bindings from the shared metadata.
    NodeKilled,
}

/// A gateway holding `big` bindings through node 1 goes away, while a
/// publisher on node 2 publishes, one after another, to a key that a
/// gateway on node 3 holds. Returns the longest publish (confirm
/// included), from just before the departure until the queue is gone from
/// the broker and 2 s after, and what `deregister_server` returned
/// (`Stopped`; `Ok` otherwise).
async fn longest_publish_while_a_big_gateway_goes(
    c: &'static Cluster,
    how: Departure,
    big: usize,
) -> (Duration, Result<(), BackendError>) {
    let ns = fresh_namespace();
    let upstream: &'static str = Box::leak(format!("127.0.0.1:{}", 5681).into_boxed_str());
    let proxy = Proxy::start(upstream).await;
    let single = |url: String| RabbitMqConfig {
        url,
        partitions: 2,
        ..config(&ns)
    };
    let g = connect(single(proxy.url())).await;
    let p = connect(single(c.url(2))).await;
    let h = connect(single(c.url(3))).await;

    let probe_server = sid("probe");
    let mut probe = h.register_server(&probe_server).await.expect("register");
    h.bind(&probe_server, &key("probe")).await.expect("bind");
    let drain = tokio::spawn(async move { while probe.next().await.is_some() {} });

    let server = sid("big");
    let _big_stream = g.register_server(&server).await.expect("register");
    let t = Instant::now();
    futures::stream::iter(0..big)
        .map(|i| {
            let (g, server) = (&g, &server);
            async move {
                let k = key(&format!("user{i}"));
                g.bind(server, &k).await.expect("bind");
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
    println!(
        "{how:?}: {big} bindings through node 1 in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The publisher, sequential, timing each publish.
    let stop = Arc::new(AtomicBool::new(false));
    let longest = Arc::new(Mutex::new(Duration::ZERO));
    let count = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (stop, longest, count) = (stop.clone(), longest.clone(), count.clone());
        tokio::spawn(async move {
            let k = key("probe");
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let r = p.publish_outgoing(&k, Bytes::from_static(b"x")).await;
                let took = started.elapsed();
                r.expect("probe publish");
                count.fetch_add(1, Ordering::SeqCst);
                {
                    let mut l = longest.lock().expect("lock");
                    *l = (*l).max(took);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            p
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = *longest.lock().expect("lock");
    let t = Instant::now();
    let mut departed = Ok(());
    match how {
        Departure::Killed => proxy.cut(),
        Departure::Stopped => {
            departed = g.deregister_server(&server).await;
            if let Err(e) = &departed {
                println!("{how:?}: deregister_server failed: {e}");
            }
        }
        Departure::NodeKilled => {
            tokio::task::spawn_blocking(move || c.kill(1))
                .await
                .expect("kill task")
                .expect("kill node 1");
        }
    }
    let call = t.elapsed();
    // Polled on a thread of its own: rabbitmqctl blocks for a while, and
    // the runtime's threads must stay free for the publisher being timed.
    let queue = format!("{ns}.gw.big");
    let gone = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        while c
            .ctl_any(&["list_queues", "name", "-q", "--no-table-headers"])
            .expect("list the queues")
            .lines()
            .any(|l| l.trim() == queue)
        {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the big queue is still there after 120 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        t.elapsed()
    })
    .await
    .expect("poll task");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let p = publisher.await.expect("publisher");
    let longest = *longest.lock().expect("lock");
    println!(
        "{how:?}: the departure took {:.1} s, then the queue with {big} bindings was gone after {:.1} s; \
         {} publishes, longest {} ms (before the departure: {} ms)",
        call.as_secs_f64(),
        gone.as_secs_f64(),
        count.load(Ordering::SeqCst),
        longest.as_millis(),
        before.as_millis()
    );
    drain.abort();
    let _ = g.shutdown().await;
    if matches!(how, Departure::NodeKilled) {
        // Leave the cluster whole for the next test.
        tokio::task::spawn_blocking(move || c.start_node(1))
            .await
            .expect("start task")
            .expect("start node 1 again");
    }
    h.delete_namespace().await.expect("delete namespace");
    for b in [&h, &p] {
        b.shutdown().await.expect("shutdown");
    }
    (longest, departed)
}

/// rabbitmq-server #12926: deleting a queue with thousands of bindings
/// stalled publisher confirms for 20-70 s. A gateway with 10,000 bindings
/// that is killed (its connection dropped: the broker deletes the queue and
/// its bindings at once), stopped (batched unbinds first), or whose node
/// dies, must not stall another gateway's publishes through another node
/// for more than 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_10000_bindings_leaving_never_stalls_publishes() {
    let Some(c) = cluster().await else { return };
    let _one_at_a_time = exclusive().await;
    for how in [Departure::Killed, Departure::Stopped, Departure::NodeKilled] {
        let (longest, departed) = longest_publish_while_a_big_gateway_goes(c, how, 10_000).await;
        departed.expect("deregister_server");
        assert!(
            longest <= Duration::from_secs(1),
            "{how:?}: a publish took {longest:?} while the gateway's 10,000 bindings went"
        );
    }
}

/// Binds then unbinds `n` keys for one gateway, `in_flight` at a time;
/// (binds/s, unbinds/s).
async fn churn(b: &RabbitMqBackend, n: usize, in_flight: usize) -> (f64, f64) {
    let server = sid("churn");
    let _stream = b.register_server(&server).await.expect("register");
    let keys: Vec<RouteKey> = (0..n).map(|i| key(&format!("k{i}"))).collect();
    let t = Instant::now();
    futures::stream::iter(&keys)
        .map(|k| async { b.bind(&server, k).await.expect("bind") })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
    let binds = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    futures::stream::iter(&keys)
        .map(|k| async { b.unbind(&server, k).await.expect("unbind") })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
    let unbinds = n as f64 / t.elapsed().as_secs_f64();
    b.deregister_server(&server).await.expect("deregister");
    (binds, unbinds)
}

/// The cost of binding churn: binds and unbinds per second on the machine's
/// single broker (`FANOUT_RABBITMQ_URL`, default 127.0.0.1:5672) and on the
/// three-node cluster, one at a time and 256 in flight. A measurement:
/// `cargo test -p fanout-rabbitmq --release --test cluster -- --ignored
/// --nocapture binding_churn`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn binding_churn_one_node_against_three() {
    let Some(c) = cluster().await else { return };
    if !broker_available().await {
        return;
    }
    let _one_at_a_time = exclusive().await;
    for (name, url) in [("1 node", url()), ("3 nodes", c.url_list())] {
        for (n, in_flight) in [(1_000, 1), (5_000, 256)] {
            let ns = fresh_namespace();
            let b = connect(RabbitMqConfig {
                url: url.clone(),
                partitions: 2,
                ..config(&ns)
            })
            .await;
            let (binds, unbinds) = churn(&b, n, in_flight).await;
            println!(
                "{name}: {n} keys, {in_flight} in flight: {binds:.0} binds/s, {unbinds:.0} unbinds/s (via {:?})",
                b.connected_node()
            );
            b.delete_namespace().await.expect("delete namespace");
            b.shutdown().await.expect("shutdown");
        }
    }
}

/// The stall check with 10,000 and 30,000 bindings, printed only:
/// `cargo test -p fanout-rabbitmq --release --test cluster -- --ignored
/// --nocapture big_gateway`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn big_gateway_departures_measured() {
    let Some(c) = cluster().await else { return };
    let _one_at_a_time = exclusive().await;
    for big in [10_000, 30_000] {
        for how in [Departure::Killed, Departure::Stopped, Departure::NodeKilled] {
            let (longest, departed) = longest_publish_while_a_big_gateway_goes(c, how, big).await;
            println!(
                "{how:?} with {big} bindings: longest publish {longest:?}, departure {departed:?}"
            );
        }
    }
}
