//! RabbitMQ-specific behaviour beyond the conformance suite: poison events,
//! binding clean-up on the broker, registration conflicts across processes,
//! partition hand-over between consumers.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use fanout_backend::{
    BackendError, ConsumeOptions, FanoutBackend, IncomingEvent, OrderingKey, RouteKey,
    RouteOutcome, ServerId,
};
use fanout_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use futures::StreamExt;

fn sid(s: &str) -> ServerId {
    ServerId::new(s).expect("valid id")
}

fn event(id: &str, k: &str, body: &str) -> IncomingEvent {
    IncomingEvent {
        id: id.to_owned(),
        ordering_key: OrderingKey::channel(k),
        payload: Bytes::from(body.to_owned()),
    }
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !bindings(&exchange, &queue2).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bindings of a dropped stream remain"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(matches!(
        b.bind(&sid("gw2"), &keys[0]).await,
        Err(BackendError::NotRegistered(_))
    ));
    b.delete_namespace().await.expect("delete namespace");
    b.shutdown().await.expect("shutdown");
}

/// A server id live in one process (backend value) is a conflict in
/// another; once the first deregisters, the second can take it, fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_conflicts_across_processes() {
    if !broker_available().await {
        return;
    }
    let ns = fresh_namespace();
    let a = connect(config(&ns)).await;
    let b = connect(config(&ns)).await;
    let s = a.register_server(&sid("gw1")).await.expect("register on a");
    a.bind(&sid("gw1"), &RouteKey::user("zoe").expect("key"))
        .await
        .expect("bind");
    match b.register_server(&sid("gw1")).await {
        Err(BackendError::Conflict(_)) => {}
        other => panic!("expected Conflict, got {:?}", other.map(|_| ())),
    }
    a.deregister_server(&sid("gw1")).await.expect("deregister");
    drop(s);
    let mut s = b.register_server(&sid("gw1")).await.expect("register on b");
    let out = b
        .publish_outgoing(
            &RouteKey::user("zoe").expect("key"),
            Bytes::from_static(b"x"),
        )
        .await
        .expect("publish");
    assert_eq!(
        out,
        RouteOutcome::Unroutable,
        "the new registration has no routes"
    );
    assert!(tokio::time::timeout(Duration::from_millis(300), s.next())
        .await
        .is_err());
    b.delete_namespace().await.expect("delete namespace");
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
}

/// Per-key order holds while consumers join, leave gracefully and crash
/// with unsettled deliveries in hand: the acked sequence of every key is
/// exactly 0..n, and every consumer got work at some point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_survives_joins_leaves_and_crashes() {
    if !broker_available().await {
        return;
    }
    let ns = fresh_namespace();
    let b = Arc::new(
        connect(RabbitMqConfig {
            partitions: 8,
            ..config(&ns)
        })
        .await,
    );
    let acked: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let work: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let spawn_consumer = |c: usize| {
        let (b, acked, work) = (b.clone(), acked.clone(), work.clone());
        let (kill_tx, mut kill_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut stream = b
                .consume_incoming(ConsumeOptions {
                    consumer_name: format!("c{c}"),
                    prefetch: 8,
                })
                .await
                .expect("consume");
            loop {
                let d = tokio::select! {
                    _ = &mut kill_rx => return,
                    d = stream.next() => d,
                };
                let Some(Ok(d)) = d else { continue };
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
                    acked
                        .lock()
                        .expect("lock")
                        .entry(k.to_owned())
                        .or_default()
                        .push(n);
                    *work.lock().expect("lock").entry(c).or_default() += 1;
                }
            }
        });
        (kill_tx, task)
    };

    let keys: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    let per_key = 60u32;
    let publisher = {
        let (b, keys) = (b.clone(), keys.clone());
        tokio::spawn(async move {
            for n in 0..per_key {
                for k in &keys {
                    b.publish_incoming(event(&format!("{k}-{n}"), k, &format!("{k}#{n}")))
                        .await
                        .expect("publish");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let (kill0, t0) = spawn_consumer(0);
    let (kill1, t1) = spawn_consumer(1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A third joins: partitions are handed over to it.
    let (kill2, t2) = spawn_consumer(2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Consumer 0 crashes mid-work (its stream and any delivery in hand are
    // dropped): its partitions go to the others after the heartbeat
    // timeout, unsettled events first.
    let _ = kill0.send(());
    t0.await.expect("c0");
    publisher.await.expect("publisher");
    let total = keys.len() * per_key as usize;
    eventually(Duration::from_secs(60), "every event acked", || {
        acked
            .lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum::<usize>()
            >= total
    })
    .await;
    for (k, ns) in acked.lock().expect("lock").iter() {
        let expected: Vec<u32> = (0..per_key).collect();
        assert_eq!(ns, &expected, "key {k}: acked out of order or twice");
    }
    let work = work.lock().expect("lock").clone();
    eprintln!("work per consumer: {work:?}");
    for c in 0..3 {
        assert!(
            work.get(&c).copied().unwrap_or(0) > 0,
            "consumer {c} got nothing: {work:?}"
        );
    }
    let _ = kill1.send(());
    let _ = kill2.send(());
    let _ = t1.await;
    let _ = t2.await;
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
    let out = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", &format!("{ns}.gw.gw1")])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        lapin::types::AMQPValue::LongLongInt(4),
    );
    ch.queue_declare(
        format!("{ns}.in.0").as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare an old-style partition queue");
    let _ = conn.close(200, "done".into()).await;

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
