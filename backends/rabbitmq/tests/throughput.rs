//! Measurements, not checks (ignored by default):
//!
//! ```text
//! cargo test -p fanout-rabbitmq --release --test throughput -- --ignored --nocapture --test-threads 1
//! ```
//!
//! Binding rate (a gateway re-binding 10,000 users after a reconnect),
//! unbinding rate (deregistration), and publish rates sequential versus
//! concurrent (publishes pipeline on a channel, each awaiting its confirm).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fanout_backend::{FanoutBackend, IncomingEvent, OrderingKey, RouteKey, ServerId};
use fanout_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use futures::StreamExt;

fn sid(s: &str) -> ServerId {
    ServerId::new(s).expect("valid id")
}

async fn bind_all(b: &Arc<RabbitMqBackend>, server: &str, keys: &[RouteKey], in_flight: usize) {
    futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let b = b.clone();
            let s = sid(server);
            async move { b.bind(&s, &k).await }
        })
        .buffer_unordered(in_flight)
        .for_each(|r| async move { r.expect("bind") })
        .await;
}

/// A backend to measure, with settings `tweak`ed from [`config`]: its
/// queues outlive a long run. `None` when the broker is unreachable.
async fn measured(
    tweak: impl FnOnce(RabbitMqConfig) -> RabbitMqConfig,
) -> Option<Arc<RabbitMqBackend>> {
    let (_, b) = fresh(|c| {
        tweak(RabbitMqConfig {
            queue_expiry: Some(Duration::from_secs(300)),
            ..c
        })
    })
    .await?;
    Some(Arc::new(b))
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn bindings_per_second() {
    let Some(b) = measured(|c| c).await else {
        return;
    };
    let _first = b.register_server(&sid("gw1")).await.expect("register");
    let keys: Vec<RouteKey> = (0..10_000)
        .map(|i| RouteKey::user(&format!("user{i}")).expect("key"))
        .collect();

    let t = Instant::now();
    for k in &keys[..1000] {
        b.bind(&sid("gw1"), k).await.expect("bind");
    }
    let seq = t.elapsed();
    println!(
        "sequential bind: 1000 keys in {seq:?} = {:.0} binds/s",
        rate(1000, seq)
    );
    b.deregister_server(&sid("gw1")).await.expect("deregister");
    let mut _stream = b.register_server(&sid("gw1")).await.expect("register");

    for in_flight in [64usize, 256, 1024] {
        let t = Instant::now();
        bind_all(&b, "gw1", &keys, in_flight).await;
        let d = t.elapsed();
        println!(
            "concurrent bind ({in_flight} in flight): 10000 keys in {d:?} = {:.0} binds/s",
            rate(10_000, d)
        );
        let t = Instant::now();
        b.deregister_server(&sid("gw1")).await.expect("deregister");
        let d = t.elapsed();
        println!(
            "deregister (batched unbind + queue delete): 10000 keys in {d:?} = {:.0} unbinds/s",
            rate(10_000, d)
        );
        _stream = b.register_server(&sid("gw1")).await.expect("register");
    }
    b.delete_namespace().await.expect("delete namespace");
    b.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn publishes_per_second() {
    let Some(b) = measured(|c| RabbitMqConfig {
        partitions: 16,
        ..c
    })
    .await
    else {
        return;
    };
    let n = 5000usize;
    let ev = |i: usize| IncomingEvent {
        id: format!("e{i}"),
        ordering_key: OrderingKey::channel(&format!("c{}", i % 100)),
        payload: Bytes::from(vec![b'x'; 200]),
    };
    let t = Instant::now();
    for i in 0..n {
        b.publish_incoming(ev(i)).await.expect("publish");
    }
    let d = t.elapsed();
    println!(
        "publish_incoming sequential: {n} in {d:?} = {:.0}/s",
        rate(n, d)
    );
    for in_flight in [16usize, 256] {
        let t = Instant::now();
        futures::stream::iter(0..n)
            .map(|i| {
                let b = b.clone();
                let e = ev(n + i);
                async move { b.publish_incoming(e).await }
            })
            .buffer_unordered(in_flight)
            .for_each(|r| async move { r.expect("publish") })
            .await;
        let d = t.elapsed();
        println!(
            "publish_incoming concurrent ({in_flight} in flight): {n} in {d:?} = {:.0}/s",
            rate(n, d)
        );
    }

    let mut stream = b.register_server(&sid("gw1")).await.expect("register");
    b.bind(&sid("gw1"), &RouteKey::user("u").expect("key"))
        .await
        .expect("bind");
    let drain = tokio::spawn(async move {
        let mut got = 0;
        while got < 2 * n {
            if stream.next().await.is_none() {
                break;
            }
            got += 1;
        }
    });
    let key = RouteKey::user("u").expect("key");
    let t = Instant::now();
    for _ in 0..n {
        b.publish_outgoing(&key, Bytes::from_static(b"payload"))
            .await
            .expect("publish");
    }
    let d = t.elapsed();
    println!(
        "publish_outgoing sequential: {n} in {d:?} = {:.0}/s",
        rate(n, d)
    );
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|_| {
            let (b, key) = (b.clone(), key.clone());
            async move {
                b.publish_outgoing(&key, Bytes::from_static(b"payload"))
                    .await
            }
        })
        .buffer_unordered(256)
        .for_each(|r| async move {
            r.expect("publish");
        })
        .await;
    let d = t.elapsed();
    println!(
        "publish_outgoing concurrent (256 in flight): {n} in {d:?} = {:.0}/s",
        rate(n, d)
    );
    let _ = tokio::time::timeout(Duration::from_secs(30), drain).await;
    b.delete_namespace().await.expect("delete namespace");
    b.shutdown().await.expect("shutdown");
}
