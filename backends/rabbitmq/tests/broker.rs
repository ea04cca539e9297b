//! What only RabbitMQ's own tooling can check, beyond the conformance
//! suite: bindings on the broker (`rabbitmqctl list_bindings`), a queue
//! deleted by an operator, and purging a namespace declared by an earlier
//! version.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use fanout_backend::{BackendError, FanoutBackend, RouteKey, RouteOutcome, ServerId};
use fanout_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use futures::StreamExt;

fn sid(s: &str) -> ServerId {
    ServerId::new(s).expect("valid id")
}

/// Deregistration unbinds every key on the broker (checked with
/// `rabbitmqctl list_bindings`), deletes the queue, and publishes to those
/// keys come back unroutable and are counted. Dropping a stream does the
/// same in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_removes_every_binding() {
    if !broker_available().await || !rabbitmqctl_available() {
        return;
    }
    let ns = fresh_namespace();
    let b = Arc::new(connect(config(&ns)).await);
    let exchange = format!("{ns}.outgoing");
    let queue = format!("{ns}.gw.gw1");
    let stream = b.register_server(&sid("gw1")).await.expect("register");
    let keys: Vec<RouteKey> = (0..2000)
        .map(|i| {
            if i % 2 == 0 {
                RouteKey::user(&format!("u{i}")).expect("key")
            } else {
                RouteKey::channel(&format!("c{i}")).expect("key")
            }
        })
        .collect();
    futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let b = b.clone();
            async move { b.bind(&sid("gw1"), &k).await }
        })
        .buffer_unordered(256)
        .for_each(|r| async move { r.expect("bind") })
        .await;
    assert_eq!(b.bound_keys(&sid("gw1")), Some(2000));
    assert_eq!(bindings(&exchange, &queue).len(), 2000);

    b.deregister_server(&sid("gw1")).await.expect("deregister");
    assert!(
        bindings(&exchange, &queue).is_empty(),
        "bindings left behind"
    );
    let before = b.unroutable_count();
    for k in keys.iter().take(10) {
        let out = b
            .publish_outgoing(k, Bytes::from_static(b"x"))
            .await
            .expect("publish");
        assert_eq!(out, RouteOutcome::Unroutable);
    }
    assert_eq!(b.unroutable_count(), before + 10);
    drop(stream);

    // A dropped stream is cleaned up the same way, in the background.
    let stream = b.register_server(&sid("gw2")).await.expect("register");
    let queue2 = format!("{ns}.gw.gw2");
    for k in keys.iter().take(300) {
        b.bind(&sid("gw2"), k).await.expect("bind");
    }
    assert_eq!(bindings(&exchange, &queue2).len(), 300);
    drop(stream);
    eventually(
        Duration::from_secs(15),
        "the bindings of a dropped stream are removed",
        || bindings(&exchange, &queue2).is_empty(),
    )
    .await;
    assert!(matches!(
        b.bind(&sid("gw2"), &keys[0]).await,
        Err(BackendError::NotRegistered(_))
    ));
    b.delete_namespace().await.expect("delete namespace");
    b.shutdown().await.expect("shutdown");
}

/// A gateway queue deleted behind the backend's back (an operator's
/// `rabbitmqctl delete_queue`) is declared again, and the gateway is told
/// to bind its keys anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_gateway_queue_comes_back_with_routes_lost() {
    if !broker_available().await || !rabbitmqctl_available() {
        return;
    }
    let ns = fresh_namespace();
    let b = connect(config(&ns)).await;
    let mut stream = b.register_server(&sid("gw1")).await.expect("register");
    let k = RouteKey::user("eve").expect("key");
    b.bind(&sid("gw1"), &k).await.expect("bind");
    rabbitmqctl(&["delete_queue", &format!("{ns}.gw.gw1")]);
    match tokio::time::timeout(Duration::from_secs(15), stream.next()).await {
        Ok(Some(fanout_backend::ServerEvent::RoutesLost)) => {}
        other => panic!("expected RoutesLost, got {other:?}"),
    }
    b.bind(&sid("gw1"), &k).await.expect("bind again");
    b.publish_outgoing(&k, Bytes::from_static(b"back"))
        .await
        .expect("publish");
    match tokio::time::timeout(Duration::from_secs(15), stream.next()).await {
        Ok(Some(fanout_backend::ServerEvent::Message(m))) => {
            assert_eq!(m.payload, Bytes::from_static(b"back"))
        }
        other => panic!("expected the message, got {other:?}"),
    }
    b.delete_namespace().await.expect("delete namespace");
    b.shutdown().await.expect("shutdown");
}

/// A namespace whose partition queues an earlier version declared with
/// other arguments (a delivery limit of 4): `connect` refuses it
/// (RabbitMQ's PRECONDITION_FAILED), and `purge`, which declares nothing,
/// still removes it, after which the namespace is usable again. This is
/// the upgrade path `docs/backends/rabbitmq.md` describes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_a_namespace_declared_with_other_arguments() {
    if !broker_available().await {
        return;
    }
    let ns = fresh_namespace();
    let cfg = RabbitMqConfig {
        partitions: 2,
        ..config(&ns)
    };
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        lapin::types::AMQPValue::LongLongInt(4),
    );
    declare_as_before(vec![(format!("{ns}.in.0"), args)]).await;

    match RabbitMqBackend::connect(cfg.clone()).await {
        Err(BackendError::Refused(why)) => assert!(why.contains("inequivalent arg"), "{why}"),
        other => panic!("connect must refuse the old queue, got {other:?}"),
    }
    RabbitMqBackend::purge(&cfg).await.expect("purge");
    RabbitMqBackend::purge(&cfg)
        .await
        .expect("purge is idempotent");
    let b = connect(cfg).await;
    b.delete_namespace().await.expect("delete namespace");
    b.shutdown().await.expect("shutdown");
}

/// A namespace whose partition queues were declared before the quorum
/// leader locator (`x-queue-leader-locator`) was added to their arguments:
/// RabbitMQ 3.10 refuses a re-declaration that adds it
/// (PRECONDITION_FAILED), so the backend declares such queues again
/// without it instead of refusing an existing deployment after an upgrade
/// (the locator only places a new queue's leader). Its classic
/// dead-letter queue (quorum since clusters) is kept as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_declared_before_clusters_are_accepted() {
    if !broker_available().await {
        return;
    }
    let ns = fresh_namespace();
    let cfg = RabbitMqConfig {
        partitions: 1,
        ..config(&ns)
    };
    use lapin::types::AMQPValue;
    let long = |s: &str| AMQPValue::LongString(s.into());
    let mut args = lapin::types::FieldTable::default();
    // Exactly what the previous version declared.
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert("x-dead-letter-exchange".into(), long(&format!("{ns}.dlx")));
    args.insert("x-dead-letter-routing-key".into(), long("dead"));
    args.insert("x-queue-type".into(), long("quorum"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(1_000_000_000),
    );
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args.insert("x-overflow".into(), long("reject-publish"));
    args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    // And its dead-letter queue: classic, no type argument.
    let mut dead_args = lapin::types::FieldTable::default();
    dead_args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    declare_as_before(vec![
        (format!("{ns}.in.0"), args),
        (format!("{ns}.dead"), dead_args),
    ])
    .await;

    let b = RabbitMqBackend::connect(cfg)
        .await
        .expect("the existing queues are accepted");
    b.delete_namespace().await.expect("delete namespace");
    b.shutdown().await.expect("shutdown");
}

/// A URL list whose first node is down: the backend connects to a live one
/// (a process starts at a random node of the list and tries the others).
/// A malformed list is refused before anything is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_list_with_a_dead_node_connects_to_a_live_one() {
    if !broker_available().await {
        return;
    }
    let ns = fresh_namespace();
    // Port 1: nothing listens there, so it is refused at once.
    let list = format!("amqp://guest:guest@127.0.0.1:1/%2f, {}", url());
    for _ in 0..4 {
        let b = connect(RabbitMqConfig {
            url: list.clone(),
            partitions: 1,
            ..config(&ns)
        })
        .await;
        let node = b.connected_node().expect("connected");
        assert!(!node.contains(":1/"), "connected to the dead node: {node}");
        assert!(!node.contains("guest:guest"), "password shown: {node}");
        b.shutdown().await.expect("shutdown");
    }
    for bad in ["", "amqp://a/%2f,,amqp://b/%2f", "redis://127.0.0.1:6379"] {
        match RabbitMqBackend::connect(RabbitMqConfig {
            url: bad.to_owned(),
            ..config(&ns)
        })
        .await
        {
            Err(BackendError::Invalid(_)) => {}
            other => panic!("{bad:?}: expected Invalid, got {other:?}"),
        }
    }
    RabbitMqBackend::purge(&RabbitMqConfig {
        url: list,
        partitions: 1,
        ..config(&ns)
    })
    .await
    .expect("purge through the list");
}

/// Declares durable queues with the given arguments directly on the
/// broker, as an earlier version of the backend did.
async fn declare_as_before(queues: Vec<(String, lapin::types::FieldTable)>) {
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    for (name, args) in queues {
        ch.queue_declare(
            name.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap_or_else(|e| panic!("declare {name} as an earlier version did: {e}"));
    }
    let _ = conn.close(200, "done".into()).await;
}
