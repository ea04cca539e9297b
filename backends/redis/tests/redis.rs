//! What only Redis's own tooling can check, beyond the conformance suite,
//! against a real Redis: crashes (child processes killed with SIGKILL), a
//! killed subscriber connection and its counters, a Redis restart (on a
//! private `redis-server`), trimming, partition leases, stream overflow.
//! Timings are printed so `--nocapture` shows the measured windows the
//! docs quote.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanout_backend::{
    BackendError, ConsumeOptions, FanoutBackend, IncomingDelivery, IncomingEvent, OrderingKey,
    RouteKey, RouteOutcome, ServerEvent, ServerId, ServerStream,
};
use fanout_redis::{RedisBackend, RedisConfig};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Set in a child process: which role to play.
const CHILD_ROLE: &str = "FANOUT_REDIS_TEST_CHILD";
/// Set in a child process: the namespace to play it in.
const CHILD_NS: &str = "FANOUT_REDIS_TEST_NS";

fn sid(s: &str) -> ServerId {
    ServerId::new(s).expect("valid server id")
}

fn user(s: &str) -> RouteKey {
    RouteKey::user(s).expect("valid user id")
}

fn event(id: &str, key: &str, body: &str) -> IncomingEvent {
    IncomingEvent {
        id: id.to_owned(),
        ordering_key: OrderingKey::channel(key),
        payload: Bytes::from(body.to_owned()),
    }
}

/// Config used by a parent test and its child process alike.
fn crash_config(base: RedisConfig) -> RedisConfig {
    RedisConfig {
        partitions: 4,
        lease_ttl: Duration::from_secs(2),
        claim_idle: Duration::from_secs(1),
        ..base
    }
}

type Incoming = BoxStream<'static, Result<IncomingDelivery, BackendError>>;

async fn next_delivery(stream: &mut Incoming, within: Duration) -> IncomingDelivery {
    tokio::time::timeout(within, stream.next())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("delivery ok")
}

async fn next_message(stream: &mut ServerStream, within: Duration) -> (RouteKey, Bytes) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(ServerEvent::Message(m))) => return (m.key, m.payload),
            Ok(Some(ServerEvent::RoutesLost)) => continue,
            Ok(None) => panic!("server stream ended"),
            Err(_) => panic!("no message within {within:?}"),
        }
    }
}

/// The next event must be `RoutesLost`.
async fn expect_routes_lost(stream: &mut ServerStream, within: Duration) {
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(ServerEvent::RoutesLost)) => {}
        Ok(Some(ServerEvent::Message(m))) => panic!("unexpected {m:?} before RoutesLost"),
        Ok(None) => panic!("stream ended"),
        Err(_) => panic!("no RoutesLost within {within:?}"),
    }
}

/// Runs this test binary again as a child playing `role` (the ignored test
/// named `test` picks it up), and returns it with its stdout lines.
async fn spawn_child(
    test: &str,
    role: &str,
    ns: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = tokio::process::Command::new(exe)
        .args([
            test,
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ROLE, role)
        .env(CHILD_NS, ns)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    (child, BufReader::new(stdout).lines())
}

/// A consumer stream named `name` taking `prefetch` deliveries at a time.
async fn consumer(b: &RedisBackend, name: &str, prefetch: u16) -> Incoming {
    b.consume_incoming(ConsumeOptions {
        consumer_name: name.into(),
        prefetch,
    })
    .await
    .expect("consume")
}

/// Lines the child prints before `READY`.
async fn until_ready(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("child ready in time")
            .expect("read child stdout")
            .expect("child exited before READY");
        // The test harness prints "test name ... " without a newline first.
        if line.trim_end().ends_with("READY") {
            return seen;
        }
        seen.push(line);
    }
}

fn child_role(expected: &str) -> Option<String> {
    match (std::env::var(CHILD_ROLE), std::env::var(CHILD_NS)) {
        (Ok(role), Ok(ns)) if role == expected => Some(ns),
        _ => None,
    }
}

/// Child: a worker that takes deliveries and never settles them, until
/// the parent kills it. Run only by
/// `crashed_worker_pending_entries_are_taken_over`, which spawns this
/// binary with `--ignored --exact child_worker`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of crashed_worker_pending_entries_are_taken_over, which runs it"]
async fn child_worker() {
    let Some(ns) = child_role("worker") else {
        // `--ignored` without the parent's variables: no role to play.
        return;
    };
    let b = RedisBackend::connect(crash_config(common::config(&ns)))
        .await
        .expect("connect");
    let mut c = consumer(&b, "doomed", 8).await;
    let mut held = Vec::new();
    while held.len() < 8 {
        let d = next_delivery(&mut c, Duration::from_secs(10)).await;
        println!("GOT {} {}", d.event.id, d.attempt);
        held.push(d);
    }
    println!("READY");
    std::future::pending::<()>().await;
}

/// Child: a gateway with routes, killed by the parent. Run only by the
/// crashed- and restarted-gateway tests, which spawn this binary with
/// `--ignored --exact child_gateway`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of the crashed-gateway tests, which run it"]
async fn child_gateway() {
    let Some(ns) = child_role("gateway") else {
        // `--ignored` without the parent's variables: no role to play.
        return;
    };
    let server = std::env::var("FANOUT_REDIS_TEST_SERVER").unwrap_or_else(|_| "gw-dead".into());
    let keys: usize = std::env::var("FANOUT_REDIS_TEST_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let b = RedisBackend::connect(common::config(&ns))
        .await
        .expect("connect");
    let _stream = b.register_server(&sid(&server)).await.expect("register");
    for i in 0..keys {
        b.bind(&sid(&server), &user(&format!("u{i}")))
            .await
            .expect("bind");
    }
    b.bind(&sid(&server), &RouteKey::channel("c1").expect("valid"))
        .await
        .expect("bind");
    println!("READY");
    std::future::pending::<()>().await;
}

/// A worker killed with SIGKILL while holding unsettled deliveries (and more
/// read but not yet yielded): another consumer takes its partitions over
/// once the leases expire, delivers those entries again first, in order,
/// and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_worker_pending_entries_are_taken_over() {
    let Some((cleanup, b)) = common::fresh(crash_config).await else {
        return;
    };
    let ns = &cleanup.0;
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
    let per_key = 10;
    for n in 0..per_key {
        for k in keys {
            b.publish_incoming(event(&format!("{k}-{n}"), k, &format!("{k}#{n}")))
                .await
                .expect("publish");
        }
    }
    let (mut child, mut lines) = spawn_child("child_worker", "worker", ns).await;
    let got = until_ready(&mut lines).await;
    let held: HashSet<String> = got
        .iter()
        .filter_map(|l| l.split("GOT ").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert_eq!(held.len(), 8, "child held {got:?}");
    sigkill(&mut child).await;
    let killed = Instant::now();

    let mut c = consumer(&b, "survivor", 16).await;
    let mut order: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut attempts: HashMap<String, u32> = HashMap::new();
    let mut first_after = None;
    let total = keys.len() * per_key;
    while attempts.len() < total {
        let d = next_delivery(&mut c, Duration::from_secs(15)).await;
        first_after.get_or_insert_with(|| killed.elapsed());
        let body = String::from_utf8(d.event.payload.to_vec()).expect("utf8");
        let (k, n) = body.split_once('#').expect("key#n");
        order
            .entry(k.to_owned())
            .or_default()
            .push(n.parse().expect("n"));
        attempts.insert(d.event.id.clone(), d.attempt);
        d.ack().await.expect("ack");
    }
    let takeover = first_after.expect("at least one delivery");
    println!("worker SIGKILL -> first redelivery by the survivor: {takeover:?} (lease_ttl 2 s, claim_idle 1 s)");
    for (k, ns_seen) in &order {
        let expected: Vec<u32> = (0..per_key as u32).collect();
        assert_eq!(ns_seen, &expected, "key {k} out of order or duplicated");
    }
    for id in &held {
        assert!(
            attempts[id] >= 2,
            "{id} was delivered to the dead worker, so its redelivery says attempt >= 2"
        );
    }
    assert!(
        takeover >= Duration::from_millis(1500),
        "the dead worker's partitions must not move before its lease expires ({takeover:?})"
    );
    assert!(
        b.dead_letters(10).await.expect("dead letters").is_empty(),
        "nothing dead-lettered"
    );
    b.shutdown().await.expect("shutdown");
}

/// Runs `child_gateway` until it holds its 201 routes as `gw-dead`, and
/// returns it still running.
async fn gateway_child(b: &RedisBackend, ns: &str) -> tokio::process::Child {
    let (child, mut lines) = spawn_child("child_gateway", "gateway", ns).await;
    until_ready(&mut lines).await;
    assert_eq!(b.route_key_count().await.expect("count"), 201);
    child
}

/// Kills a child with SIGKILL (no chance to clean up) and reaps it.
async fn sigkill(child: &mut tokio::process::Child) {
    child.start_kill().expect("SIGKILL the child");
    let _ = child.wait().await;
}

/// The route and server keys of a namespace that exist now.
async fn route_keys(ns: &str) -> Vec<String> {
    common::keys_of(ns)
        .await
        .into_iter()
        .filter(|k| k.contains(":server:") || k.contains(":route:"))
        .collect()
}

/// A gateway killed with SIGKILL leaves routes; the janitor (of any other
/// backend value in the namespace) removes them once its liveness key
/// expires. Measures the window with the default `liveness_ttl` (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_gateway_routes_are_removed_within_the_bound() {
    let mut ttl = Duration::ZERO;
    let Some((cleanup, b)) = common::fresh(|config| {
        ttl = config.liveness_ttl;
        config
    })
    .await
    else {
        return;
    };
    let ns = &cleanup.0;
    let mut child = gateway_child(&b, ns).await;
    assert!(matches!(
        b.publish_outgoing(&user("u1"), Bytes::from_static(b"x"))
            .await
            .expect("publish"),
        RouteOutcome::Routed { servers: Some(1) }
    ));
    sigkill(&mut child).await;
    let killed = Instant::now();

    // The stale route no longer reaches anyone, and publish says so.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let out = b
            .publish_outgoing(&user("u1"), Bytes::from_static(b"x"))
            .await
            .expect("publish");
        if out == RouteOutcome::Unroutable {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still routed after the kill: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1.375 × liveness_ttl (see the janitor), plus a second of slack for a
    // loaded test machine.
    let documented = ttl + ttl * 3 / 8;
    let bound = documented + Duration::from_secs(1);
    let window = loop {
        let n = b.route_key_count().await.expect("count");
        if n == 0 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < bound,
            "{n} stale route keys survive {:?} after the kill (bound {bound:?})",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "gateway SIGKILL -> stale routes gone after {window:?} (liveness_ttl {ttl:?}, bound {documented:?})"
    );
    let leftovers = route_keys(ns).await;
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let mut raw = common::raw().await;
    let servers: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{ns}:servers"))
        .query_async(&mut raw)
        .await
        .expect("SMEMBERS");
    assert!(servers.is_empty(), "servers set still lists {servers:?}");
    assert!(b.stats().janitor_routes_removed <= 201);
    b.shutdown().await.expect("shutdown");
}

/// A gateway restarted with the id of one that crashed starts with no
/// routes, at once, without waiting for the janitor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_gateway_does_not_inherit_routes() {
    let Some((cleanup, b)) = common::fresh(|c| c).await else {
        return;
    };
    let ns = &cleanup.0;
    let mut child = gateway_child(&b, ns).await;
    sigkill(&mut child).await;
    let mut again = b
        .register_server(&sid("gw-dead"))
        .await
        .expect("the id of a dead gateway can be registered at once");
    assert_eq!(
        b.route_key_count().await.expect("count"),
        0,
        "the new holder wiped its predecessor's routes"
    );
    b.bind(&sid("gw-dead"), &user("u7")).await.expect("bind");
    b.publish_outgoing(&user("u7"), Bytes::from_static(b"new"))
        .await
        .expect("publish");
    assert_eq!(
        next_message(&mut again, Duration::from_secs(5)).await,
        (user("u7"), Bytes::from_static(b"new"))
    );
    b.shutdown().await.expect("shutdown");
    assert_eq!(
        route_keys(ns).await.len(),
        0,
        "shutdown removes every route"
    );
}

/// The id of the subscriber connection of `server` in `CLIENT LIST`.
async fn subscriber_client_id(ns: &str, server: &str) -> Option<String> {
    let mut raw = common::raw().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut raw)
        .await
        .expect("CLIENT LIST");
    let name = format!("name={ns}:sub:{server}");
    list.lines()
        .find(|l| l.split_whitespace().any(|f| f == name))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
}

/// The subscriber connection is killed by Redis (`CLIENT KILL`): the
/// backend reconnects, resubscribes and yields `RoutesLost`; after the
/// gateway binds again, routing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_subscriber_yields_routes_lost_and_routing_resumes() {
    let Some((cleanup, b)) = common::fresh(|c| c).await else {
        return;
    };
    let ns = &cleanup.0;
    let mut s1 = b.register_server(&sid("s1")).await.expect("register");
    b.bind(&sid("s1"), &user("alice")).await.expect("bind");
    b.publish_outgoing(&user("alice"), Bytes::from_static(b"before"))
        .await
        .expect("publish");
    assert_eq!(
        next_message(&mut s1, Duration::from_secs(5)).await.1,
        Bytes::from_static(b"before")
    );

    let id = subscriber_client_id(ns, "s1")
        .await
        .expect("the subscriber connection is named");
    let mut raw = common::raw().await;
    // Filtered by id AND type: it is our connection, and Redis counts it as
    // a Pub/Sub client.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut raw)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1, "killed our subscriber connection");
    let started = Instant::now();
    expect_routes_lost(&mut s1, Duration::from_secs(10)).await;
    let gap = started.elapsed();
    println!("subscriber killed -> RoutesLost after {gap:?}");
    let stats = b.stats();
    assert_eq!(stats.subscriber_reconnects, 1);
    assert!(stats.routes_lost >= 1);
    assert_ne!(
        subscriber_client_id(ns, "s1").await,
        Some(id),
        "a new connection"
    );

    // The gateway binds everything again, as it does on RoutesLost.
    b.bind(&sid("s1"), &user("alice")).await.expect("re-bind");
    b.publish_outgoing(&user("alice"), Bytes::from_static(b"after"))
        .await
        .expect("publish");
    assert_eq!(
        next_message(&mut s1, Duration::from_secs(5)).await.1,
        Bytes::from_static(b"after")
    );
    b.shutdown().await.expect("shutdown");
}

/// Trimming removes acked entries only: with 10 of 30 entries unsettled,
/// the janitor trims exactly the 20 acked ones, and the 10 are still
/// pending and settle normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_never_removes_unacked_entries() {
    let Some((cleanup, b)) = common::fresh(|c| RedisConfig {
        partitions: 1,
        max_stream_len: 10,
        ..c
    })
    .await
    else {
        return;
    };
    let ns = &cleanup.0;
    for i in 0..30 {
        b.publish_incoming(event(&format!("e{i}"), "t", &i.to_string()))
            .await
            .expect("publish");
    }
    let mut c = consumer(&b, "trim", 30).await;
    let mut held = Vec::new();
    for i in 0..30 {
        let d = next_delivery(&mut c, Duration::from_secs(10)).await;
        assert_eq!(d.event.id, format!("e{i}"));
        if i < 20 {
            d.ack().await.expect("ack");
        } else {
            held.push(d);
        }
    }
    let report = b.run_janitor_once().await.expect("janitor");
    assert_eq!(report.entries_trimmed, 20, "{report:?}");
    let mut raw = common::raw().await;
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("{ns}:in:0"))
        .query_async(&mut raw)
        .await
        .expect("XLEN");
    assert_eq!(len, 10, "the 10 unacked entries stay");
    let again = b.run_janitor_once().await.expect("janitor");
    assert_eq!(
        again.entries_trimmed, 0,
        "within the bound: nothing to trim"
    );
    for d in held {
        d.ack().await.expect("ack after the trim");
    }
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(format!("{ns}:in:0"))
        .arg("workers")
        .query_async(&mut raw)
        .await
        .expect("XPENDING");
    assert_eq!(
        pending.first(),
        Some(&redis::Value::Int(0)),
        "nothing pending"
    );
    b.shutdown().await.expect("shutdown");
}

/// Owners of every partition's lease, by consumer token.
async fn lease_owners(ns: &str, partitions: u32) -> HashMap<String, usize> {
    let mut raw = common::raw().await;
    let mut owners = HashMap::new();
    for p in 0..partitions {
        let owner: Option<String> = redis::cmd("GET")
            .arg(format!("{ns}:lease:{p}"))
            .query_async(&mut raw)
            .await
            .expect("GET");
        if let Some(o) = owner {
            *owners.entry(o).or_insert(0) += 1;
        }
    }
    owners
}

/// Partitions spread evenly over live consumers, and move to the others
/// when one leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_spread_and_rebalanced() {
    let partitions = 12;
    let Some((cleanup, b)) = common::fresh(|c| RedisConfig { partitions, ..c }).await else {
        return;
    };
    let ns = &cleanup.0;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(consumer(&b, &format!("c{i}"), 4).await);
    }
    let wait_for = |want: Vec<usize>| {
        let ns = ns.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let owners = lease_owners(&ns, partitions).await;
                let mut counts: Vec<usize> = owners.values().copied().collect();
                counts.sort_unstable();
                if counts == want {
                    return Instant::now();
                }
                assert!(
                    Instant::now() < deadline,
                    "leases {owners:?}, wanted counts {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(vec![4, 4, 4]).await;
    let left = Instant::now();
    drop(streams.pop());
    let done = wait_for(vec![6, 6]).await;
    println!(
        "consumer left -> partitions rebalanced over the other two in {:?}",
        done - left
    );
    // The events still flow, in order, on the two survivors.
    for i in 0..20 {
        b.publish_incoming(event(&format!("r{i}"), &format!("k{}", i % 5), "x"))
            .await
            .expect("publish");
    }
    let mut got = 0;
    let mut merged = futures::stream::select_all(streams);
    while got < 20 {
        let d = tokio::time::timeout(Duration::from_secs(10), merged.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        d.ack().await.expect("ack");
        got += 1;
    }
    drop(merged);
    b.shutdown().await.expect("shutdown");
}

/// Unreachable Redis: every call fails with `Unavailable` within the
/// operation timeout instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_unavailable_not_a_hang() {
    let started = Instant::now();
    let err = RedisBackend::connect(RedisConfig {
        url: "redis://127.0.0.1:1".into(),
        operation_timeout: Duration::from_millis(500),
        ..RedisConfig::default()
    })
    .await
    .expect_err("nothing listens on port 1");
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A private redis-server on a free port, killed on drop.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    fn start(port: Option<u16>, dir: Option<std::path::PathBuf>) -> Option<Self> {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port")
        });
        let dir = dir.unwrap_or_else(|| {
            let d = std::env::temp_dir().join(format!("fanout-redis-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&d).expect("temp dir");
            d
        });
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(5) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child, port, dir })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL; the data goes with it (no persistence).
    fn kill(mut self) -> (u16, std::path::PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.port, self.dir.clone())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis dies and comes back empty (no persistence): calls fail fast with
/// `Unavailable` meanwhile; afterwards the gateway gets `RoutesLost`,
/// binds again and receives; the consumer group is recreated and incoming
/// events flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_fails_fast_then_recovers() {
    let Some(redis) = PrivateRedis::start(None, None) else {
        fanout_backend::conformance::skip_or_fail(
            "redis-server",
            "cannot start a private redis-server",
        );
        return;
    };
    let b = RedisBackend::connect(RedisConfig {
        url: redis.url(),
        namespace: "restart".into(),
        partitions: 2,
        operation_timeout: Duration::from_millis(500),
        liveness_ttl: Duration::from_secs(2),
        ..RedisConfig::default()
    })
    .await
    .expect("connect");
    let mut s1 = b.register_server(&sid("s1")).await.expect("register");
    b.bind(&sid("s1"), &user("alice")).await.expect("bind");
    let mut c = b
        .consume_incoming(ConsumeOptions::default())
        .await
        .expect("consume");

    let (port, dir) = redis.kill();
    let started = Instant::now();
    let err = b
        .publish_incoming(event("lost", "k", "x"))
        .await
        .expect_err("Redis is down");
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    let out = b
        .publish_outgoing(&user("alice"), Bytes::from_static(b"x"))
        .await;
    assert!(matches!(out, Err(BackendError::Unavailable(_))), "{out:?}");
    assert!(b.health().await.is_err());
    let took = started.elapsed();
    println!("three calls with Redis down answered in {took:?} (operation_timeout 500 ms)");
    assert!(
        took < Duration::from_secs(3),
        "calls must fail fast ({took:?})"
    );

    let redis = PrivateRedis::start(Some(port), Some(dir)).expect("restart redis-server");
    let started = Instant::now();
    expect_routes_lost(&mut s1, Duration::from_secs(20)).await;
    println!("Redis back -> RoutesLost after {:?}", started.elapsed());
    b.bind(&sid("s1"), &user("alice")).await.expect("re-bind");
    b.publish_outgoing(&user("alice"), Bytes::from_static(b"back"))
        .await
        .expect("publish");
    assert_eq!(
        next_message(&mut s1, Duration::from_secs(5)).await.1,
        Bytes::from_static(b"back")
    );

    // The streams and groups vanished with the data; a publish recreates
    // the stream, the consumer recreates the group (from id 0) and reads.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.publish_incoming(event("again", "k", "y")).await {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "publish never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let d = next_delivery(&mut c, Duration::from_secs(15)).await;
    assert_eq!(d.event.id, "again");
    d.ack().await.expect("ack");
    b.shutdown().await.expect("shutdown");
    let (_, dir) = redis.kill();
    let _ = std::fs::remove_dir_all(dir);
}

/// Throughput of the routing table and the publish script, and memory per
/// route. Ignored by default: `cargo test -p fanout-redis --test redis --
/// --ignored --nocapture binds_per_second`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn binds_per_second() {
    let Some((cleanup, b)) = common::fresh(|c| c).await else {
        return;
    };
    let ns = &cleanup.0;
    let b = std::sync::Arc::new(b);
    let server = sid("bench");
    let mut stream = b.register_server(&server).await.expect("register");
    let n = 20_000usize;
    let keys: Vec<RouteKey> = (0..n).map(|i| user(&format!("user{i:06}"))).collect();

    let sequential = 2_000;
    let t = Instant::now();
    for k in &keys[..sequential] {
        b.bind(&server, k).await.expect("bind");
    }
    let seq_rate = sequential as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    futures::stream::iter(keys[sequential..].iter().cloned())
        .map(|k| {
            let b = b.clone();
            let server = server.clone();
            async move { b.bind(&server, &k).await.expect("bind") }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let par_rate = (n - sequential) as f64 / t.elapsed().as_secs_f64();
    assert_eq!(b.route_key_count().await.expect("count"), n);

    // Memory: every route set, plus the server's own key set, per route.
    let mut raw = common::raw().await;
    let sample = 200;
    let mut route_bytes = 0u64;
    for k in &keys[..sample] {
        let m: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("{ns}:route:{}", k.as_routing_key()))
            .query_async(&mut raw)
            .await
            .expect("MEMORY USAGE");
        route_bytes += m;
    }
    let server_set: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("{ns}:server:bench:keys"))
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut raw)
        .await
        .expect("MEMORY USAGE");
    let per_route = route_bytes as f64 / sample as f64 + server_set as f64 / n as f64;

    let drain = tokio::spawn(async move {
        let mut got = 0usize;
        while got < 10_000 {
            match stream.next().await {
                Some(ServerEvent::Message(_)) => got += 1,
                Some(ServerEvent::RoutesLost) => {}
                None => break,
            }
        }
        got
    });
    let t = Instant::now();
    futures::stream::iter(0..10_000usize)
        .map(|i| {
            let b = b.clone();
            let k = keys[i % n].clone();
            async move {
                b.publish_outgoing(&k, Bytes::from_static(b"0123456789abcdef"))
                    .await
                    .expect("publish")
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<RouteOutcome>>()
        .await;
    let pub_rate = 10_000f64 / t.elapsed().as_secs_f64();
    let got = tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .expect("drained")
        .expect("task");
    assert_eq!(got, 10_000);

    let t = Instant::now();
    futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let b = b.clone();
            let server = server.clone();
            async move { b.unbind(&server, &k).await.expect("unbind") }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let unbind_rate = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(b.route_key_count().await.expect("count"), 0);

    println!("binds/s, one at a time:        {seq_rate:>9.0}");
    println!("binds/s, 64 in flight:         {par_rate:>9.0}");
    println!("unbinds/s, 64 in flight:       {unbind_rate:>9.0}");
    println!("publish_outgoing/s, 64 in flight (1 server, 16 B): {pub_rate:>9.0}");
    println!("memory per route (route SET + share of the server's key SET): {per_route:.0} bytes");
    b.shutdown().await.expect("shutdown");
}

/// A gateway that stops reading its stream while 70,000 messages are
/// published to it: the overflow is a route loss, never a silent drop.
/// The stream yields every message from before the first drop, in order,
/// then one `RoutesLost`, then only messages published after it; what was
/// dropped in between is counted (and exported as a backend counter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_server_stream_is_a_route_loss_and_counted() {
    if !common::available().await {
        return;
    }
    let ns = common::namespace();
    let b = RedisBackend::connect(common::config(&ns))
        .await
        .expect("connect");
    let server = sid("gw-slow");
    let mut stream = b.register_server(&server).await.expect("register");
    let key = user("flooded");
    b.bind(&server, &key).await.expect("bind");
    // The gateway reads nothing meanwhile: a slow consumer.
    const SENT: u64 = 70_000;
    let published = futures::stream::iter(0..SENT)
        .map(|n| {
            let b = &b;
            let key = &key;
            async move {
                b.publish_outgoing(key, Bytes::from(n.to_string()))
                    .await
                    .expect("publish")
            }
        })
        .buffered(256)
        .count()
        .await;
    assert_eq!(published as u64, SENT);
    // The last pushes may still be in flight from Redis to us: the buffer
    // holds 65,536, so every push has arrived once the rest are counted.
    fanout_backend::conformance::eventually(
        Duration::from_secs(10),
        "every push past the buffer counted as dropped",
        || {
            let dropped = b.stats().outgoing_dropped;
            async move { dropped >= SENT - 65_536 }
        },
    )
    .await;
    let dropped = b.stats().outgoing_dropped;
    assert!(
        dropped >= SENT - 65_536,
        "{dropped} dropped of {SENT} into a buffer of 65,536"
    );
    assert_eq!(b.stats().outgoing_overflows, 1, "one overflow, one loss");
    let exported: HashMap<&str, u64> = b.counters().into_iter().collect();
    assert_eq!(exported.get("outgoing_dropped"), Some(&dropped));

    // Every message before the first drop (published concurrently, so in
    // no set order), each once, then RoutesLost.
    let mut seen = HashSet::new();
    let lost_at = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream yields")
            .expect("the stream goes on");
        match ev {
            ServerEvent::Message(m) => {
                let n: u64 = std::str::from_utf8(&m.payload)
                    .expect("utf-8")
                    .parse()
                    .expect("a number");
                assert!(n < SENT && seen.insert(n), "{n} yielded once");
            }
            ServerEvent::RoutesLost => break seen.len() as u64,
        }
    };
    assert_eq!(
        lost_at + dropped,
        SENT,
        "what was not yielded before RoutesLost is exactly what was counted"
    );
    // After the loss, messages flow again.
    b.publish_outgoing(&key, Bytes::from_static(b"after"))
        .await
        .expect("publish");
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream yields")
        .expect("the stream goes on");
    assert!(
        matches!(&ev, ServerEvent::Message(m) if &m.payload[..] == b"after"),
        "{ev:?}"
    );
    println!(
        "overflow: {SENT} sent, {lost_at} yielded before RoutesLost, {dropped} dropped and counted"
    );
    drop(stream);
    b.shutdown().await.expect("shutdown");
    common::purge(&ns).await;
}
