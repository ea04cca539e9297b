//! The conformance suite: one list of checks that every backend runs, each a
//! plain `async fn` over a [`Harness`] (the pattern of object_store's
//! `integration.rs`). A backend's test file calls [`conformance_tests!`]
//! once; the macro expands to one `#[tokio::test]` per check, so a failure
//! names the behaviour that broke.
//!
//! Every check asks the harness for backends in fresh random namespaces, so
//! concurrent runs against one shared broker never see each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::{
    ConsumeOptions, FanoutBackend, IncomingEvent, OrderingKey, RouteKey, RouteOutcome, ServerEvent,
    ServerId, ServerStream,
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
}

/// How long a check waits for something that should arrive.
const ARRIVE: Duration = Duration::from_secs(10);
/// How long a check listens to be sure that nothing arrives.
const QUIET: Duration = Duration::from_millis(300);

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

    let out = b
        .publish_outgoing(&key("alice"), Bytes::from_static(b"for alice"))
        .await
        .expect("publish");
    assert!(
        matches!(out, RouteOutcome::Routed { .. } | RouteOutcome::Unknown),
        "got {out:?}"
    );
    assert_eq!(
        next_message(&mut s1).await,
        (key("alice"), Bytes::from_static(b"for alice"))
    );
    assert_quiet(&mut s2, "s2 is not bound to alice").await;

    b.publish_outgoing(&key("channel:general"), Bytes::from_static(b"hi all"))
        .await
        .expect("publish");
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
    let mut s1 = b.register_server(&sid("s1")).await.expect("register");
    b.bind(&sid("s1"), &key("bob")).await.expect("bind");
    b.publish_outgoing(&key("bob"), Bytes::from_static(b"1"))
        .await
        .expect("publish");
    assert_eq!(next_message(&mut s1).await.1, Bytes::from_static(b"1"));
    b.unbind(&sid("s1"), &key("bob")).await.expect("unbind");
    b.unbind(&sid("s1"), &key("bob"))
        .await
        .expect("unbind is idempotent");
    b.publish_outgoing(&key("bob"), Bytes::from_static(b"2"))
        .await
        .expect("publish");
    assert_quiet(&mut s1, "after unbind").await;
    b.shutdown().await.expect("shutdown");
}

/// Binding twice is the same as binding once: one delivery, and one unbind
/// removes the route.
pub async fn bind_is_idempotent(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let mut s1 = b.register_server(&sid("s1")).await.expect("register");
    b.bind(&sid("s1"), &key("carol")).await.expect("bind");
    b.bind(&sid("s1"), &key("carol")).await.expect("bind again");
    b.publish_outgoing(&key("carol"), Bytes::from_static(b"once"))
        .await
        .expect("publish");
    assert_eq!(next_message(&mut s1).await.1, Bytes::from_static(b"once"));
    assert_quiet(&mut s1, "a double bind must not double deliveries").await;
    b.unbind(&sid("s1"), &key("carol")).await.expect("unbind");
    b.publish_outgoing(&key("carol"), Bytes::from_static(b"gone"))
        .await
        .expect("publish");
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
    let out = b
        .publish_outgoing(&key("channel:c1"), Bytes::from_static(b"x"))
        .await
        .expect("publish");
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
    let mut s1 = b.register_server(&sid("s1")).await.expect("register");
    b.bind(&sid("s1"), &key("dave")).await.expect("bind");
    let out = b
        .publish_outgoing(&key("nobody"), Bytes::from_static(b"x"))
        .await
        .expect("publish");
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
    let mut s1 = b.register_server(&sid("s1")).await.expect("register");
    b.bind(&sid("s1"), &key("erin")).await.expect("bind");
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

/// A live server id cannot be registered twice, routes need a registered
/// server, and a re-registered id starts with no routes.
pub async fn registration_rules(h: &dyn Harness) {
    let b = h.backend(&fresh_namespace(), SETTINGS).await;
    let s1 = b.register_server(&sid("s1")).await.expect("register");
    assert!(
        b.register_server(&sid("s1")).await.is_err(),
        "second registration of a live id"
    );
    assert!(
        b.bind(&sid("ghost"), &key("x")).await.is_err(),
        "bind for an unregistered server"
    );
    b.bind(&sid("s1"), &key("frank")).await.expect("bind");
    b.deregister_server(&sid("s1")).await.expect("deregister");
    b.deregister_server(&sid("s1"))
        .await
        .expect("deregister is idempotent");
    drop(s1);
    let out = b
        .publish_outgoing(&key("frank"), Bytes::from_static(b"x"))
        .await
        .expect("publish");
    if b.capabilities().reports_unroutable {
        assert_eq!(
            out,
            RouteOutcome::Unroutable,
            "deregistering removes the routes"
        );
    }
    let mut again = b.register_server(&sid("s1")).await.expect("re-register");
    b.publish_outgoing(&key("frank"), Bytes::from_static(b"y"))
        .await
        .expect("publish");
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
    let mut tasks = Vec::new();
    for c in 0..2usize {
        let mut stream = b
            .consume_incoming(ConsumeOptions {
                consumer_name: format!("c{c}"),
                prefetch: 8,
            })
            .await
            .expect("consume");
        let (seen, by_consumer) = (seen.clone(), by_consumer.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(d) = stream.next().await {
                let d = d.expect("delivery");
                let body = String::from_utf8(d.event.payload.to_vec()).expect("utf8");
                let (k, n) = body.split_once('#').expect("key#n");
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
    // Let both consumers join before the load starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    let per_key = 40u32;
    for n in 0..per_key {
        for k in &keys {
            let ok = OrderingKey::channel(k);
            b.publish_incoming(event(&format!("{k}-{n}"), &ok, &format!("{k}#{n}")))
                .await
                .expect("publish");
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
    b.publish_incoming(event("m1", &ok, "first"))
        .await
        .expect("publish");
    b.publish_incoming(event("m2", &ok, "second"))
        .await
        .expect("publish");
    {
        let mut c1 = b
            .consume_incoming(ConsumeOptions::default())
            .await
            .expect("consume");
        let d = tokio::time::timeout(ARRIVE, c1.next())
            .await
            .expect("delivery in time")
            .expect("open")
            .expect("ok");
        assert_eq!(d.event.id, "m1");
        assert_eq!(d.attempt, 1);
        // Neither acked nor rejected: the consumer crashes.
        drop(d);
    }
    let mut c2 = b
        .consume_incoming(ConsumeOptions::default())
        .await
        .expect("consume");
    let d = tokio::time::timeout(ARRIVE, c2.next())
        .await
        .expect("redelivery in time")
        .expect("open")
        .expect("ok");
    assert_eq!(d.event.id, "m1", "the unsettled event comes back first");
    assert!(
        d.attempt >= 2,
        "a redelivery says so (attempt {})",
        d.attempt
    );
    d.ack().await.expect("ack");
    let d = tokio::time::timeout(ARRIVE, c2.next())
        .await
        .expect("next in time")
        .expect("open")
        .expect("ok");
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
        b.publish_incoming(event(id, &ok, body))
            .await
            .expect("publish");
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
async fn consume_one_at_a_time(
    b: &dyn FanoutBackend,
) -> futures::stream::BoxStream<'static, Result<crate::IncomingDelivery, crate::BackendError>> {
    b.consume_incoming(ConsumeOptions {
        prefetch: 1,
        ..ConsumeOptions::default()
    })
    .await
    .expect("consume")
}

async fn next_delivery(
    c: &mut futures::stream::BoxStream<
        'static,
        Result<crate::IncomingDelivery, crate::BackendError>,
    >,
) -> crate::IncomingDelivery {
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
    b.publish_incoming(event("held", &ok, "first"))
        .await
        .expect("publish");
    b.publish_incoming(event("next", &ok, "second"))
        .await
        .expect("publish");
    let one = || ConsumeOptions {
        consumer_name: "restarting".into(),
        prefetch: 1,
    };
    for restart in 1..=6 {
        let mut c = b.consume_incoming(one()).await.expect("consume");
        let d = next_delivery(&mut c).await;
        assert_eq!(d.event.id, "held", "after {} restarts", restart - 1);
        drop(d);
        drop(c);
    }
    let mut c = b.consume_incoming(one()).await.expect("consume");
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
        b.publish_incoming(event(id, &ok, &format!("body {id}")))
            .await
            .expect("publish");
    }
    let mut c = consume_one_at_a_time(b.as_ref()).await;
    for id in ids {
        let d = tokio::time::timeout(ARRIVE, c.next())
            .await
            .expect("delivery")
            .expect("open")
            .expect("ok");
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
        let d = tokio::time::timeout(ARRIVE, c.next())
            .await
            .expect("replayed event in time")
            .expect("open")
            .expect("ok");
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
    if let Ok(Some(d)) = tokio::time::timeout(QUIET, c.next()).await {
        panic!("a dropped dead letter came back: {d:?}");
    }
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
    a.publish_outgoing(&key("gina"), Bytes::from_static(b"from a"))
        .await
        .expect("publish");
    assert_eq!(next_message(&mut sa).await.1, Bytes::from_static(b"from a"));
    assert_quiet(&mut sb, "b must not see a's outgoing messages").await;

    let mut cb = b
        .consume_incoming(ConsumeOptions::default())
        .await
        .expect("consume b");
    a.publish_incoming(event("x", &OrderingKey::channel("c"), "a only"))
        .await
        .expect("publish");
    if let Ok(Some(d)) = tokio::time::timeout(QUIET, cb.next()).await {
        panic!("b consumed a's incoming event {d:?}");
    }
    let mut ca = a
        .consume_incoming(ConsumeOptions::default())
        .await
        .expect("consume a");
    let d = tokio::time::timeout(ARRIVE, ca.next())
        .await
        .expect("delivery")
        .expect("open")
        .expect("ok");
    assert_eq!(d.event.id, "x");
    d.ack().await.expect("ack");
    a.shutdown().await.expect("shutdown");
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
                $crate::conformance::$check(&harness).await;
            }
        )*
    };
}
