//! The conformance suite: one list of checks that every backend runs, each a
//! plain `async fn` over a [`Harness`] (the pattern of object_store's
//! `integration.rs`). A backend's test file calls [`conformance_tests!`]
//! once; the macro expands to one `#[tokio::test]` per check, so a failure
//! names the behaviour that broke.
//!
//! Every check asks the harness for backends in fresh random namespaces, so
//! concurrent runs against one shared broker never see each other. The
//! macro runs each check through a [`Recorder`], which notes every
//! namespace the check was handed and calls [`Harness::clean_up`] on each
//! once the check is over, even when it panicked: nothing of a failed run
//! stays on the shared broker.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};

use crate::{
    BackendError, ConsumeOptions, FanoutBackend, IncomingDelivery, IncomingEvent, OrderingKey,
    RouteKey, RouteOutcome, ServerEvent, ServerId, ServerStream,
};

/// Incoming-side settings the checks rely on.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Number of incoming partitions.
    pub partitions: u32,
}

/// Settings every check uses unless it says otherwise.
pub const SETTINGS: Settings = Settings { partitions: 8 };

/// Builds backends for the checks. Implemented by each backend's tests.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A backend whose broker names all live under `namespace`. Backends of
    /// different namespaces MUST share nothing, even on one broker.
    async fn backend(&self, namespace: &str, settings: Settings) -> Arc<dyn FanoutBackend>;

    /// Whether the backend's broker can be reached. A harness for a real
    /// broker returns `false` after [`skip_or_fail`] when it cannot (so a
    /// newcomer's laptop skips loudly and CI fails); the check is skipped.
    async fn available(&self) -> bool {
        true
    }

    /// Deletes everything the backends of `namespace` made on the broker.
    /// Called once per namespace after each check, passed or failed, when
    /// its backends are shut down or dropped. The default does nothing (a
    /// broker in the process goes with its values).
    async fn clean_up(&self, _namespace: &str) {}

    /// Cuts, from outside the backend (as a broker restart or a network
    /// fault would), the broker connections of every backend of
    /// `namespace`. Returns `false` where the harness cannot (the memory
    /// backend has no connection); the check that needs it then says it
    /// skipped.
    async fn sever(&self, _namespace: &str) -> bool {
        false
    }
}

/// Runs one check: hands the harness's backends to it, remembers their
/// namespaces, and cleans them all up when the check is over, even when it
/// panicked (the panic is then raised again, so the test still fails).
pub struct Recorder<'h> {
    harness: &'h dyn Harness,
    namespaces: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Recorder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("namespaces", &*lock(&self.namespaces))
            .finish_non_exhaustive()
    }
}

impl<'h> Recorder<'h> {
    /// A recorder in front of `harness`.
    pub fn new(harness: &'h dyn Harness) -> Self {
        Self {
            harness,
            namespaces: Mutex::new(Vec::new()),
        }
    }

    /// Awaits `check` (which uses this recorder as its harness), then
    /// cleans up every namespace it was handed.
    pub async fn run(&self, check: impl Future<Output = ()>) {
        let outcome = AssertUnwindSafe(check).catch_unwind().await;
        let namespaces = std::mem::take(&mut *lock(&self.namespaces));
        for ns in namespaces {
            self.harness.clean_up(&ns).await;
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

/// A poisoned lock only means another part of the check panicked; its
/// list is still the one to clean up.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Harness for Recorder<'_> {
    async fn backend(&self, namespace: &str, settings: Settings) -> Arc<dyn FanoutBackend> {
        {
            let mut seen = lock(&self.namespaces);
            if !seen.iter().any(|n| n == namespace) {
                seen.push(namespace.to_owned());
            }
        }
        self.harness.backend(namespace, settings).await
    }

    async fn available(&self) -> bool {
        self.harness.available().await
    }

    async fn clean_up(&self, namespace: &str) {
        self.harness.clean_up(namespace).await;
    }

    async fn sever(&self, namespace: &str) -> bool {
        self.harness.sever(namespace).await
    }
}

/// How long a check waits for something that should arrive.
const ARRIVE: Duration = Duration::from_secs(10);
/// How long a check listens to be sure that nothing arrives.
const QUIET: Duration = Duration::from_millis(300);
/// How often [`eventually`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it holds; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Set by `.ci/run`: an unreachable service is then a failure, never a skip.
pub const REQUIRE_SERVICES_ENV: &str = "FANOUT_TEST_REQUIRE_SERVICES";

/// Whether this run must have every service (see [`REQUIRE_SERVICES_ENV`]).
pub fn services_required() -> bool {
    std::env::var(REQUIRE_SERVICES_ENV).is_ok_and(|v| v == "1" || v == "true")
}

/// For a backend's tests when its broker is unreachable: panics if services
/// are required, else prints a loud line; the caller then returns early.
pub fn skip_or_fail(service: &str, why: &str) {
    if services_required() {
        panic!("{service} is required ({REQUIRE_SERVICES_ENV}=1) but unreachable: {why}");
    }
    eprintln!("\n*** SKIPPED: {service} unreachable ({why}); set {REQUIRE_SERVICES_ENV}=1 to make this a failure ***\n");
}

/// A namespace no other run uses.
pub fn fresh_namespace() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn key(s: &str) -> RouteKey {
    RouteKey::parse(s).expect("test keys are valid")
}

fn sid(s: &str) -> ServerId {
    ServerId::new(s).expect("test server ids are valid")
}

async fn next_message(stream: &mut ServerStream) -> (RouteKey, Bytes) {
    loop {
        match tokio::time::timeout(ARRIVE, stream.next()).await {
            Ok(Some(ServerEvent::Message(m))) => return (m.key, m.payload),
            Ok(Some(ServerEvent::RoutesLost)) => continue,
            Ok(None) => panic!("server stream ended while a message was expected"),
            Err(_) => panic!("no message arrived within {ARRIVE:?}"),
        }
    }
}

async fn assert_quiet(stream: &mut ServerStream, what: &str) {
    if let Ok(Some(ServerEvent::Message(m))) = tokio::time::timeout(QUIET, stream.next()).await {
        panic!("{what}: unexpected delivery {m:?}");
    }
}

/// A consumer stream of the incoming side.
type Incoming = futures::stream::BoxStream<'static, Result<IncomingDelivery, BackendError>>;

/// Registers `server` and binds it to `k`.
async fn register_bound(b: &dyn FanoutBackend, server: &str, k: &str) -> ServerStream {
    let stream = b.register_server(&sid(server)).await.expect("register");
    b.bind(&sid(server), &key(k)).await.expect("bind");
    stream
}

async fn publish(b: &dyn FanoutBackend, k: &str, body: &'static [u8]) -> RouteOutcome {
    b.publish_outgoing(&key(k), Bytes::from_static(body))
        .await
        .expect("publish")
}

async fn publish_in(b: &dyn FanoutBackend, id: &str, ordering: &OrderingKey, body: &str) {
    b.publish_incoming(event(id, ordering, body))
        .await
        .expect("publish");
}

/// A named consumer holding at most `prefetch` unsettled deliveries.
async fn consume_as(b: &dyn FanoutBackend, name: impl Into<String>, prefetch: u16) -> Incoming {
    b.consume_incoming(ConsumeOptions {
        consumer_name: name.into(),
        prefetch,
    })
    .await
    .expect("consume")
}

/// Where the backend can tell an unroutable message, `out` must say so.
fn assert_unroutable_if_reported(b: &dyn FanoutBackend, out: &RouteOutcome, what: &str) {
    if b.capabilities().reports_unroutable {
        assert_eq!(*out, RouteOutcome::Unroutable, "{what}");
    }
}

async fn consume(b: &dyn FanoutBackend) -> Incoming {
    b.consume_incoming(ConsumeOptions::default())
        .await
        .expect("consume")
}

/// Listens for [`QUIET`] and panics with `what` if a delivery arrives.
async fn assert_no_delivery(c: &mut Incoming, what: &str) {
    if let Ok(Some(d)) = tokio::time::timeout(QUIET, c.next()).await {
        panic!("{what}: {d:?}");
    }
}

fn event(id: &str, ordering: &OrderingKey, body: &str) -> IncomingEvent {
    IncomingEvent {
        id: id.to_owned(),
        ordering_key: ordering.clone(),
        payload: Bytes::from(body.to_owned()),
    }
}

/// A message published to a key reaches exactly the servers bound to it.
pub async fn routes_to_exactly_the_bound_servers(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let mut s1 = b.register_server(&sid("s1")).await.expect("register s1");
    let mut s2 = b.register_server(&sid("s2")).await.expect("register s2");
    b.bind(&sid("s1"), &key("alice")).await.expect("bind");
    b.bind(&sid("s2"), &key("channel:general"))
        .await
        .expect("bind");

    let out = publish(b.as_ref(), "alice", b"for alice").await;
    assert!(
        matches!(out, RouteOutcome::Routed { .. } | RouteOutcome::Unknown),
        "got {out:?}"
    );
    assert_eq!(
        next_message(&mut s1).await,
        (key("alice"), Bytes::from_static(b"for alice"))
    );
    assert_quiet(&mut s2, "s2 is not bound to alice").await;

    publish(b.as_ref(), "channel:general", b"hi all").await;
    assert_eq!(
        next_message(&mut s2).await,
        (key("channel:general"), Bytes::from_static(b"hi all"))
    );
    assert_quiet(&mut s1, "s1 is not bound to channel:general").await;
    b.shutdown().await.expect("shutdown");
}

/// After `unbind` returns, publishes to that key no longer reach the server.
pub async fn unbind_stops_delivery(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let mut s1 = register_bound(b.as_ref(), "s1", "bob").await;
    publish(b.as_ref(), "bob", b"1").await;
    assert_eq!(next_message(&mut s1).await.1, Bytes::from_static(b"1"));
    b.unbind(&sid("s1"), &key("bob")).await.expect("unbind");
    b.unbind(&sid("s1"), &key("bob"))
        .await
        .expect("unbind is idempotent");
    publish(b.as_ref(), "bob", b"2").await;
    assert_quiet(&mut s1, "after unbind").await;
    b.shutdown().await.expect("shutdown");
}

/// Binding twice is the same as binding once: one delivery, and one unbind
/// removes the route.
pub async fn bind_is_idempotent(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let mut s1 = register_bound(b.as_ref(), "s1", "carol").await;
    b.bind(&sid("s1"), &key("carol")).await.expect("bind again");
    publish(b.as_ref(), "carol", b"once").await;
    assert_eq!(next_message(&mut s1).await.1, Bytes::from_static(b"once"));
    assert_quiet(&mut s1, "a double bind must not double deliveries").await;
    b.unbind(&sid("s1"), &key("carol")).await.expect("unbind");
    publish(b.as_ref(), "carol", b"gone").await;
    assert_quiet(&mut s1, "one unbind undoes any number of binds").await;
    b.shutdown().await.expect("shutdown");
}

/// Two servers bound to one key both receive each message once.
pub async fn two_servers_on_one_key_both_receive(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let mut s1 = b.register_server(&sid("s1")).await.expect("register");
    let mut s2 = b.register_server(&sid("s2")).await.expect("register");
    for s in ["s1", "s2"] {
        b.bind(&sid(s), &key("channel:c1")).await.expect("bind");
    }
    let out = publish(b.as_ref(), "channel:c1", b"x").await;
    if let RouteOutcome::Routed { servers: Some(n) } = out {
        assert_eq!(n, 2);
    }
    assert_eq!(next_message(&mut s1).await.1, Bytes::from_static(b"x"));
    assert_eq!(next_message(&mut s2).await.1, Bytes::from_static(b"x"));
    assert_quiet(&mut s1, "one delivery per server").await;
    assert_quiet(&mut s2, "one delivery per server").await;
    b.shutdown().await.expect("shutdown");
}

/// A message to a key nobody is bound to is dropped, and said to be where
/// the backend can tell.
pub async fn unbound_key_is_dropped_and_reported(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let mut s1 = register_bound(b.as_ref(), "s1", "dave").await;
    let out = publish(b.as_ref(), "nobody", b"x").await;
    if b.capabilities().reports_unroutable {
        assert_eq!(out, RouteOutcome::Unroutable);
    } else {
        assert!(
            matches!(out, RouteOutcome::Unknown | RouteOutcome::Unroutable),
            "got {out:?}"
        );
    }
    assert_quiet(&mut s1, "nobody is bound to the key").await;
    b.shutdown().await.expect("shutdown");
}

/// Messages from one publisher to one key arrive in publish order.
pub async fn outgoing_order_per_key(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let mut s1 = register_bound(b.as_ref(), "s1", "erin").await;
    for i in 0..200u32 {
        b.publish_outgoing(&key("erin"), Bytes::from(i.to_string()))
            .await
            .expect("publish");
    }
    for i in 0..200u32 {
        assert_eq!(
            next_message(&mut s1).await.1,
            Bytes::from(i.to_string()),
            "message {i} out of order"
        );
    }
    b.shutdown().await.expect("shutdown");
}

/// Deregistering removes a server's routes, and a re-registered id starts
/// with no routes. (What a second registration or a bind for an unknown
/// server returns is [`error_variants_are_exact`].)
pub async fn registration_rules(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let s1 = register_bound(b.as_ref(), "s1", "frank").await;
    b.deregister_server(&sid("s1")).await.expect("deregister");
    b.deregister_server(&sid("s1"))
        .await
        .expect("deregister is idempotent");
    drop(s1);
    let out = publish(b.as_ref(), "frank", b"x").await;
    assert_unroutable_if_reported(b.as_ref(), &out, "deregistering removes the routes");
    let mut again = b.register_server(&sid("s1")).await.expect("re-register");
    publish(b.as_ref(), "frank", b"y").await;
    assert_quiet(
        &mut again,
        "a re-registered server must not inherit old routes",
    )
    .await;
    b.shutdown().await.expect("shutdown");
}

/// Events with one ordering key are processed in publish order with two
/// consumers competing, and the partitions are spread over both.
pub async fn incoming_order_per_key_with_two_consumers(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let seen: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let by_consumer: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let warmed: Arc<Mutex<std::collections::HashSet<usize>>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..2usize {
        let mut stream = consume_as(b.as_ref(), format!("c{c}"), 8).await;
        let (seen, by_consumer, warmed) = (seen.clone(), by_consumer.clone(), warmed.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(d) = stream.next().await {
                let d = d.expect("delivery");
                let body = String::from_utf8(d.event.payload.to_vec()).expect("utf8");
                let (k, n) = body.split_once('#').expect("key#n");
                if k.starts_with("warm") {
                    warmed.lock().expect("lock").insert(c);
                    d.ack().await.expect("ack");
                    continue;
                }
                let n: u32 = n.parse().expect("number");
                // Work of uneven length, so a consumer that does not own
                // its partitions would visibly reorder them.
                if n.is_multiple_of(7) {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                seen.lock()
                    .expect("lock")
                    .entry(k.to_owned())
                    .or_default()
                    .push(n);
                *by_consumer.lock().expect("lock").entry(c).or_default() += 1;
                d.ack().await.expect("ack");
            }
        }));
    }
    // Both consumers must have joined before the load starts: warm-up
    // events on every partition until each consumer has processed one.
    let mut round = 0u32;
    eventually(ARRIVE * 3, "both consumers take work", || {
        round += 1;
        let (b, warmed) = (b.clone(), warmed.clone());
        let round = round;
        async move {
            if warmed.lock().expect("lock").len() >= 2 {
                return true;
            }
            for p in 0..SETTINGS.partitions {
                let ok = OrderingKey::channel(&format!("warm{p}"));
                publish_in(
                    b.as_ref(),
                    &format!("w{round}-{p}"),
                    &ok,
                    &format!("warm{p}#{round}"),
                )
                .await;
            }
            false
        }
    })
    .await;
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    let per_key = 40u32;
    for n in 0..per_key {
        for k in &keys {
            let ok = OrderingKey::channel(k);
            publish_in(b.as_ref(), &format!("{k}-{n}"), &ok, &format!("{k}#{n}")).await;
        }
    }
    let total = keys.len() * per_key as usize;
    let deadline = tokio::time::Instant::now() + ARRIVE * 3;
    loop {
        let got: usize = seen.lock().expect("lock").values().map(Vec::len).sum();
        if got >= total {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {got} of {total} events consumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (k, ns) in seen.lock().expect("lock").iter() {
        let expected: Vec<u32> = (0..per_key).collect();
        assert_eq!(
            ns, &expected,
            "events of key {k} processed out of order or twice"
        );
    }
    let spread = by_consumer.lock().expect("lock").clone();
    assert_eq!(
        spread.len(),
        2,
        "partitions must be spread over both consumers, got {spread:?}"
    );
    for t in tasks {
        t.abort();
    }
    b.shutdown().await.expect("shutdown");
}

/// An event its consumer never settled is delivered again once that
/// consumer is gone.
pub async fn incoming_unacked_is_redelivered(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let ok = OrderingKey::direct("a", "b");
    publish_in(b.as_ref(), "m1", &ok, "first").await;
    publish_in(b.as_ref(), "m2", &ok, "second").await;
    {
        let mut c1 = consume(b.as_ref()).await;
        let d = next_delivery(&mut c1).await;
        assert_eq!(d.event.id, "m1");
        assert_eq!(d.attempt, 1);
        // Neither acked nor rejected: the consumer crashes.
        drop(d);
    }
    let mut c2 = consume(b.as_ref()).await;
    let d = next_delivery(&mut c2).await;
    assert_eq!(d.event.id, "m1", "the unsettled event comes back first");
    assert!(
        d.attempt >= 2,
        "a redelivery says so (attempt {})",
        d.attempt
    );
    d.ack().await.expect("ack");
    let d = next_delivery(&mut c2).await;
    assert_eq!(d.event.id, "m2");
    d.ack().await.expect("ack");
    b.shutdown().await.expect("shutdown");
}

/// How often the rejection check rejects one event: more than any
/// delivery limit a backend ever had (5 by default, RabbitMQ 4's quorum
/// default is 20 deliveries, so a hidden broker limit would show).
const REJECTIONS: u32 = 21;

/// A rejected event comes back ahead of the later events of its partition,
/// however often: a backend never dead-letters on its own. Only
/// `dead_letter` moves an event to the dead letters, which keep it.
pub async fn rejected_events_come_back_until_dead_lettered(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let ok = OrderingKey::channel("poison");
    for (id, body) in [
        ("held", "infrastructure down"),
        ("bad", "poison"),
        ("good", "fine"),
    ] {
        publish_in(b.as_ref(), id, &ok, body).await;
    }
    let mut c = consume_one_at_a_time(b.as_ref()).await;
    for attempt in 1..=REJECTIONS {
        let d = next_delivery(&mut c).await;
        assert_eq!(
            d.event.id, "held",
            "rejection {attempt}: it comes back first"
        );
        d.reject().await.expect("reject");
    }
    let d = next_delivery(&mut c).await;
    assert_eq!(
        d.event.id, "held",
        "still there after {REJECTIONS} rejections"
    );
    d.ack().await.expect("ack");
    let d = next_delivery(&mut c).await;
    assert_eq!(d.event.id, "bad");
    d.dead_letter("cannot decode").await.expect("dead letter");
    let d = next_delivery(&mut c).await;
    assert_eq!(
        d.event.id, "good",
        "the next event comes after a dead letter"
    );
    d.ack().await.expect("ack");

    let dead = wait_dead_letters(b.as_ref(), 1).await;
    let ids: Vec<&str> = dead.iter().map(|d| d.event.id.as_str()).collect();
    assert_eq!(ids, ["bad"], "only the dead-lettered event is there");
    assert_eq!(dead[0].reason, "cannot decode");
    assert_eq!(dead[0].event.payload, Bytes::from_static(b"poison"));
    assert_eq!(dead[0].event.ordering_key, ok);
    b.shutdown().await.expect("shutdown");
}

/// A consumer with prefetch 1: nothing is checked out beside the delivery
/// in hand.
async fn consume_one_at_a_time(b: &dyn FanoutBackend) -> Incoming {
    b.consume_incoming(ConsumeOptions {
        prefetch: 1,
        ..ConsumeOptions::default()
    })
    .await
    .expect("consume")
}

async fn next_delivery(c: &mut Incoming) -> IncomingDelivery {
    tokio::time::timeout(ARRIVE, c.next())
        .await
        .expect("delivery in time")
        .expect("open")
        .expect("ok")
}

/// The event ids in the dead letters, oldest first.
async fn dead_ids(b: &dyn FanoutBackend) -> Vec<String> {
    b.dead_letters(100)
        .await
        .expect("dead letters")
        .into_iter()
        .map(|d| d.event.id)
        .collect()
}

async fn wait_dead_letters(b: &dyn FanoutBackend, n: usize) -> Vec<crate::DeadLetter> {
    let deadline = tokio::time::Instant::now() + ARRIVE;
    loop {
        let dead = b.dead_letters(100).await.expect("dead letters");
        if dead.len() >= n || tokio::time::Instant::now() > deadline {
            return dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Consumers that die holding an event (stream and delivery dropped
/// unsettled: a worker restart, a lost connection) never get it
/// dead-lettered, however often that happens: each time it comes back,
/// ahead of the events behind it.
pub async fn crashed_consumers_never_dead_letter(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let ok = OrderingKey::channel("restarts");
    publish_in(b.as_ref(), "held", &ok, "first").await;
    publish_in(b.as_ref(), "next", &ok, "second").await;
    for restart in 1..=6 {
        let mut c = consume_as(b.as_ref(), "restarting", 1).await;
        let d = next_delivery(&mut c).await;
        assert_eq!(d.event.id, "held", "after {} restarts", restart - 1);
        drop(d);
        drop(c);
    }
    let mut c = consume_as(b.as_ref(), "restarting", 1).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(d.event.id, "held", "still delivered after 6 restarts");
    d.ack().await.expect("ack");
    let d = next_delivery(&mut c).await;
    assert_eq!(d.event.id, "next");
    d.ack().await.expect("ack");
    let dead = b.dead_letters(10).await.expect("dead letters");
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    b.shutdown().await.expect("shutdown");
}

/// Dead letters are replayed to the incoming side (same id, key, payload)
/// or dropped, selected by id or oldest first; the others stay in order.
pub async fn dead_letters_are_replayed_or_dropped(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let ok = OrderingKey::channel("dl");
    let ids = ["d1", "d2", "d3", "d4"];
    for id in ids {
        publish_in(b.as_ref(), id, &ok, &format!("body {id}")).await;
    }
    let mut c = consume_one_at_a_time(b.as_ref()).await;
    for id in ids {
        let d = next_delivery(&mut c).await;
        assert_eq!(d.event.id, id);
        d.dead_letter(&format!("reason {id}"))
            .await
            .expect("dead letter");
    }
    assert_eq!(wait_dead_letters(b.as_ref(), 4).await.len(), 4);

    let pick = |ids: &[&str], limit| crate::DeadLetterSelection {
        ids: Some(ids.iter().map(|s| (*s).to_owned()).collect()),
        limit,
    };
    let replayed = b
        .resolve_dead_letters(&pick(&["d3", "d2"], 10), crate::DeadLetterAction::Replay)
        .await
        .expect("replay");
    let replayed: Vec<&str> = replayed.iter().map(|d| d.event.id.as_str()).collect();
    assert_eq!(replayed, ["d2", "d3"], "selected by id, oldest first");
    for id in ["d2", "d3"] {
        let d = next_delivery(&mut c).await;
        assert_eq!(d.event.id, id, "replayed in order");
        assert_eq!(d.event.ordering_key, ok);
        assert_eq!(d.event.payload, Bytes::from(format!("body {id}")));
        d.ack().await.expect("ack");
    }
    let left = dead_ids(b.as_ref()).await;
    assert_eq!(left, ["d1", "d4"], "the others stay, in order");

    let dropped = b
        .resolve_dead_letters(
            &crate::DeadLetterSelection {
                ids: None,
                limit: 1,
            },
            crate::DeadLetterAction::Drop,
        )
        .await
        .expect("drop");
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].event.id, "d1", "the oldest first");
    assert_eq!(dropped[0].reason, "reason d1");
    let none = b
        .resolve_dead_letters(&pick(&["nope"], 10), crate::DeadLetterAction::Drop)
        .await
        .expect("drop of nothing");
    assert!(none.is_empty());
    let left = dead_ids(b.as_ref()).await;
    assert_eq!(left, ["d4"]);
    assert_no_delivery(&mut c, "a dropped dead letter came back").await;
    b.shutdown().await.expect("shutdown");
}

/// Two namespaces on one broker share nothing: not routes, not server ids,
/// not incoming events.
pub async fn namespaces_are_isolated(h: &dyn Harness) {
    let (na, nb) = (fresh_namespace(), fresh_namespace());
    let a = h.backend(&na, SETTINGS).await;
    let b = h.backend(&nb, SETTINGS).await;
    let mut sa = a.register_server(&sid("s1")).await.expect("register in a");
    let mut sb = b
        .register_server(&sid("s1"))
        .await
        .expect("the same id registers in b");
    a.bind(&sid("s1"), &key("gina")).await.expect("bind");
    b.bind(&sid("s1"), &key("gina")).await.expect("bind");
    publish(a.as_ref(), "gina", b"from a").await;
    assert_eq!(next_message(&mut sa).await.1, Bytes::from_static(b"from a"));
    assert_quiet(&mut sb, "b must not see a's outgoing messages").await;

    let mut cb = consume(b.as_ref()).await;
    publish_in(a.as_ref(), "x", &OrderingKey::channel("c"), "a only").await;
    assert_no_delivery(&mut cb, "b consumed a's incoming event").await;
    let mut ca = consume(a.as_ref()).await;
    let d = next_delivery(&mut ca).await;
    assert_eq!(d.event.id, "x");
    d.ack().await.expect("ack");
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
}

/// The error's variant name, for assertion messages (the payload of
/// `BackendError` is not part of what the checks compare).
fn variant<T>(r: &Result<T, BackendError>) -> String {
    match r {
        Ok(_) => "Ok".to_owned(),
        Err(e) => format!("Err({e:?})"),
    }
}

/// Each error case the contract documents returns exactly its variant:
/// `Conflict` for a second registration of a live id, `NotRegistered` for
/// routes of a server that never registered or has deregistered.
pub async fn error_variants_are_exact(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let _s1 = b.register_server(&sid("s1")).await.expect("register");
    let again = b.register_server(&sid("s1")).await;
    assert!(
        matches!(again, Err(BackendError::Conflict { .. })),
        "second registration of a live id: {}",
        variant(&again)
    );
    let ghost = b.bind(&sid("ghost"), &key("x")).await;
    assert!(
        matches!(ghost, Err(BackendError::NotRegistered { .. })),
        "bind for a server never registered: {}",
        variant(&ghost)
    );
    b.deregister_server(&sid("s1")).await.expect("deregister");
    let gone = b.bind(&sid("s1"), &key("x")).await;
    assert!(
        matches!(gone, Err(BackendError::NotRegistered { .. })),
        "bind for a deregistered server: {}",
        variant(&gone)
    );
    b.shutdown().await.expect("shutdown");
}

/// After `shutdown`, calls fail with `Closed` rather than hang or succeed,
/// and `shutdown` stays idempotent. `bind` may answer `NotRegistered`
/// instead: memory and RabbitMQ forget their servers on shutdown and look
/// the server up first, Redis checks the closed flag first; both tell the
/// caller the same thing (the route was not made). `dead_letters` is not
/// checked: the memory backend still answers reads from its own state.
pub async fn closed_after_shutdown(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let _s1 = b.register_server(&sid("s1")).await.expect("register");
    b.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown is idempotent");
    let closed = |what: &str, r: Result<(), BackendError>| {
        assert!(
            matches!(r, Err(BackendError::Closed)),
            "{what} after shutdown: {}",
            variant(&r)
        );
    };
    closed("health", b.health().await);
    closed(
        "publish_incoming",
        b.publish_incoming(event("late", &OrderingKey::channel("c"), "x"))
            .await,
    );
    closed(
        "publish_outgoing",
        b.publish_outgoing(&key("alice"), Bytes::from_static(b"x"))
            .await
            .map(|_| ()),
    );
    closed(
        "register_server",
        b.register_server(&sid("s2")).await.map(|_| ()),
    );
    closed(
        "consume_incoming",
        b.consume_incoming(ConsumeOptions::default())
            .await
            .map(|_| ()),
    );
    closed(
        "resolve_dead_letters",
        b.resolve_dead_letters(
            &crate::DeadLetterSelection {
                ids: None,
                limit: 10,
            },
            crate::DeadLetterAction::Drop,
        )
        .await
        .map(|_| ()),
    );
    let bind = b.bind(&sid("s1"), &key("alice")).await;
    assert!(
        matches!(
            bind,
            Err(BackendError::Closed | BackendError::NotRegistered { .. })
        ),
        "bind after shutdown: {}",
        variant(&bind)
    );
}

/// A consumer never holds more than `prefetch` unsettled deliveries; each
/// settlement lets exactly one more in.
pub async fn prefetch_bounds_unsettled_deliveries(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let total = 6;
    for i in 0..total {
        let ok = OrderingKey::channel(&format!("p{i}"));
        publish_in(b.as_ref(), &format!("e{i}"), &ok, "x").await;
    }
    let mut c = consume_as(b.as_ref(), "bounded", 2).await;
    let mut held = std::collections::VecDeque::new();
    held.push_back(next_delivery(&mut c).await);
    held.push_back(next_delivery(&mut c).await);
    let mut delivered = held.len();
    while let Some(oldest) = held.pop_front() {
        assert_no_delivery(&mut c, "more than 2 unsettled deliveries with prefetch 2").await;
        oldest.ack().await.expect("ack");
        if delivered < total {
            held.push_back(next_delivery(&mut c).await);
            delivered += 1;
        }
    }
    assert_eq!(delivered, total, "every event delivered once");
    b.shutdown().await.expect("shutdown");
}

/// Reading the dead letters removes nothing and redelivers nothing: the
/// same read twice gives the same events, a smaller limit the oldest.
pub async fn dead_letter_reads_remove_nothing(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let ok = OrderingKey::channel("dl-read");
    let ids = ["r1", "r2", "r3"];
    for id in ids {
        publish_in(b.as_ref(), id, &ok, id).await;
    }
    let mut c = consume_one_at_a_time(b.as_ref()).await;
    for id in ids {
        let d = next_delivery(&mut c).await;
        assert_eq!(d.event.id, id);
        d.dead_letter("read me").await.expect("dead letter");
    }
    assert_eq!(wait_dead_letters(b.as_ref(), 3).await.len(), 3);
    let first = dead_ids(b.as_ref()).await;
    assert_eq!(first, ids, "oldest first");
    assert_eq!(dead_ids(b.as_ref()).await, first, "a read removes nothing");
    let two: Vec<String> = b
        .dead_letters(2)
        .await
        .expect("dead letters")
        .into_iter()
        .map(|d| d.event.id)
        .collect();
    assert_eq!(two, ["r1", "r2"], "a limit takes the oldest");
    assert_eq!(dead_ids(b.as_ref()).await, first, "still all there");
    assert_no_delivery(&mut c, "reading dead letters redelivered one").await;
    b.shutdown().await.expect("shutdown");
}

/// Two backend values on one namespace (two processes): a server id live
/// on one is a `Conflict` on the other; once the first deregisters, the
/// second takes the id, with no routes.
pub async fn registration_conflicts_across_backend_values(h: &dyn Harness) {
    let ns = fresh_namespace();
    let a = h.backend(&ns, SETTINGS).await;
    let b = h.backend(&ns, SETTINGS).await;
    let s = register_bound(a.as_ref(), "gw1", "zoe").await;
    let taken = b.register_server(&sid("gw1")).await;
    assert!(
        matches!(taken, Err(BackendError::Conflict { .. })),
        "the id is live on the other value: {}",
        variant(&taken)
    );
    a.deregister_server(&sid("gw1")).await.expect("deregister");
    drop(s);
    let mut s = b.register_server(&sid("gw1")).await.expect("register on b");
    let out = publish(b.as_ref(), "zoe", b"x").await;
    assert_unroutable_if_reported(b.as_ref(), &out, "the new registration has no routes");
    assert_quiet(&mut s, "the new registration inherits no routes").await;
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
}

/// One consumer of [`rebalance_under_load`]: acks what it gets (in
/// `acked`, per key) until told to stop, when it drops its stream and any
/// delivery in hand unsettled, as a crash would.
fn rebalance_consumer(
    b: Arc<dyn FanoutBackend>,
    c: usize,
    acked: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    work: Arc<Mutex<HashMap<usize, usize>>>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (kill_tx, mut kill_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut stream = consume_as(b.as_ref(), format!("c{c}"), 8).await;
        loop {
            let d = tokio::select! {
                _ = &mut kill_rx => return,
                d = stream.next() => d,
            };
            let d = match d {
                Some(Ok(d)) => d,
                Some(Err(_)) => continue,
                None => return,
            };
            let body = String::from_utf8(d.event.payload.to_vec()).expect("utf8");
            let (k, n) = body.split_once('#').expect("k#n");
            let n: u32 = n.parse().expect("n");
            // Uneven work, and the kill may land while a delivery is in
            // hand: it is then dropped unsettled.
            let pause = if n.is_multiple_of(5) { 4 } else { 0 };
            tokio::select! {
                _ = &mut kill_rx => return,
                _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
            }
            if d.ack().await.is_ok() {
                lock(&acked).entry(k.to_owned()).or_default().push(n);
                *lock(&work).entry(c).or_default() += 1;
            }
        }
    });
    (kill_tx, task)
}

/// Per-key order holds while events flow and consumers join and leave
/// (one with unsettled deliveries in hand): every key's acked sequence is
/// exactly what was published, none lost, none twice, and every consumer
/// got work.
pub async fn rebalance_under_load(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let acked: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let work: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let keys: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    // The publisher runs until stopped, so each phase lasts as long as the
    // machine needs, and says how many rounds (events per key) it made.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let publisher = {
        let (b, keys, stop, rounds) = (b.clone(), keys.clone(), stop.clone(), rounds.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Acquire) {
                for k in &keys {
                    let ok = OrderingKey::channel(k);
                    publish_in(b.as_ref(), &format!("{k}-{n}"), &ok, &format!("{k}#{n}")).await;
                }
                n += 1;
                rounds.store(n, Ordering::Release);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    let worked = |c: usize| {
        let work = work.clone();
        move || {
            let done = lock(&work).get(&c).copied().unwrap_or(0) > 0;
            async move { done }
        }
    };
    let (kill0, t0) = rebalance_consumer(b.clone(), 0, acked.clone(), work.clone());
    let (kill1, t1) = rebalance_consumer(b.clone(), 1, acked.clone(), work.clone());
    eventually(ARRIVE * 3, "consumer 0 gets work", worked(0)).await;
    eventually(ARRIVE * 3, "consumer 1 gets work", worked(1)).await;
    // A third joins: partitions are handed over to it under load.
    let (kill2, t2) = rebalance_consumer(b.clone(), 2, acked.clone(), work.clone());
    eventually(ARRIVE * 3, "the joining consumer gets work", worked(2)).await;
    // Consumer 0 leaves mid-work: its partitions go to the others,
    // unsettled events first.
    let _ = kill0.send(());
    t0.await.expect("c0");
    let at_leave = rounds.load(Ordering::Acquire);
    eventually(ARRIVE * 3, "more events after the leave", || {
        let n = rounds.load(Ordering::Acquire);
        async move { n >= at_leave + 5 }
    })
    .await;
    stop.store(true, Ordering::Release);
    let per_key = publisher.await.expect("publisher");
    let total = keys.len() * per_key as usize;
    eventually(ARRIVE * 6, "every event acked", || {
        let got: usize = lock(&acked).values().map(Vec::len).sum();
        async move { got >= total }
    })
    .await;
    let expected: Vec<u32> = (0..per_key).collect();
    for k in &keys {
        assert_eq!(
            lock(&acked).get(k),
            Some(&expected),
            "key {k}: acked out of order, twice or not at all"
        );
    }
    let _ = kill1.send(());
    let _ = kill2.send(());
    let _ = t1.await;
    let _ = t2.await;
    b.shutdown().await.expect("shutdown");
}

/// The first delivery of a consumer stream, skipping the errors a stream
/// may surface while its backend reconnects.
async fn next_ok_delivery(c: &mut Incoming, within: Duration) -> IncomingDelivery {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, c.next()).await {
            Ok(Some(Ok(d))) => return d,
            Ok(Some(Err(_))) => continue,
            Ok(None) => panic!("the consumer stream ended"),
            Err(_) => panic!("no delivery within {within:?}"),
        }
    }
}

/// Retries `call` while it fails (the backend reconnects meanwhile).
async fn until_ok<T, F, Fut>(within: Duration, what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what} still fails after {within:?}: {e}"
            ),
        }
        tokio::time::sleep(POLL * 5).await;
    }
}

/// Connections cut from outside (a broker restart, a network fault) are
/// recovered by the backend: the server stream says `RoutesLost`, routing
/// works again once the server binds anew, and incoming events flow again
/// on the consumer stream opened before the cut.
pub async fn severed_connections_recover(h: &dyn Harness) {
    let ns = fresh_namespace();
    let b = h.backend(&ns, SETTINGS).await;
    let mut s1 = register_bound(b.as_ref(), "s1", "alice").await;
    publish(b.as_ref(), "alice", b"before").await;
    assert_eq!(next_message(&mut s1).await.1, Bytes::from_static(b"before"));
    let mut c = consume(b.as_ref()).await;
    if !h.sever(&ns).await {
        eprintln!(
            "\n*** SKIPPED: severed_connections_recover: the {} harness cannot sever connections ***\n",
            b.capabilities().name
        );
        b.shutdown().await.expect("shutdown");
        return;
    }
    match tokio::time::timeout(ARRIVE * 2, s1.next()).await {
        Ok(Some(ServerEvent::RoutesLost)) => {}
        Ok(Some(ServerEvent::Message(m))) => panic!("unexpected {m:?} before RoutesLost"),
        Ok(None) => panic!("the server stream ended"),
        Err(_) => panic!("no RoutesLost within {:?}", ARRIVE * 2),
    }
    let (server, alice) = (sid("s1"), key("alice"));
    until_ok(ARRIVE * 2, "bind after the cut", || b.bind(&server, &alice)).await;
    until_ok(ARRIVE * 2, "publish_outgoing after the cut", || {
        b.publish_outgoing(&alice, Bytes::from_static(b"after"))
    })
    .await;
    assert_eq!(next_message(&mut s1).await.1, Bytes::from_static(b"after"));
    let ok = OrderingKey::channel("cut");
    until_ok(ARRIVE * 2, "publish_incoming after the cut", || {
        b.publish_incoming(event("after-cut", &ok, "x"))
    })
    .await;
    let d = next_ok_delivery(&mut c, ARRIVE * 2).await;
    assert_eq!(d.event.id, "after-cut");
    d.ack().await.expect("ack");
    b.shutdown().await.expect("shutdown");
}

/// Expands to one `#[tokio::test]` per conformance check, each calling the
/// check with the given harness expression.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@each $harness;
            routes_to_exactly_the_bound_servers,
            unbind_stops_delivery,
            bind_is_idempotent,
            two_servers_on_one_key_both_receive,
            unbound_key_is_dropped_and_reported,
            outgoing_order_per_key,
            registration_rules,
            incoming_order_per_key_with_two_consumers,
            incoming_unacked_is_redelivered,
            rejected_events_come_back_until_dead_lettered,
            crashed_consumers_never_dead_letter,
            dead_letters_are_replayed_or_dropped,
            namespaces_are_isolated,
            error_variants_are_exact,
            closed_after_shutdown,
            prefetch_bounds_unsettled_deliveries,
            dead_letter_reads_remove_nothing,
            registration_conflicts_across_backend_values,
            rebalance_under_load,
            severed_connections_recover,
        );
    };
    (@each $harness:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let harness = $harness;
                if !$crate::conformance::Harness::available(&harness).await {
                    return;
                }
                let recorder = $crate::conformance::Recorder::new(&harness);
                recorder.run($crate::conformance::$check(&recorder)).await;
            }
        )*
    };
}
