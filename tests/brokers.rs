//! Gateway behaviour that depends on the broker, on the real RabbitMQ and
//! Redis of this machine: routes follow sessions (reference-counted per
//! gateway), and messages cross gateways through the broker.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::cluster::{next, quiet, send_ok, Cluster, WAIT};
use fanout::config::BackendKind;
use fanout_backend::{RouteKey, RouteOutcome};
use serde_json::json;

/// Bindings of `routing_key` on the namespace's outgoing exchange, as the
/// broker itself lists them.
fn rabbitmq_bindings(namespace: &str, routing_key: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_bindings",
            "-q",
            "--no-table-headers",
            "source_name",
            "routing_key",
        ])
        .output()
        .expect("run rabbitmqctl");
    let exchange = format!("{namespace}.outgoing");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let mut f = l.split('\t');
            f.next() == Some(exchange.as_str()) && f.next() == Some(routing_key)
        })
        .count()
}

async fn routed(c: &Cluster, user: &str) -> bool {
    let key = RouteKey::user(user).expect("valid");
    let out = c
        .backend
        .publish_outgoing(&key, Bytes::from_static(b"{}"))
        .await
        .expect("publish");
    out != RouteOutcome::Unroutable
}

async fn wait_until_unroutable(c: &Cluster, user: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while routed(c, user).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user}'s route outlived their sessions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn routes_follow_sessions(kind: BackendKind) {
    let Some(c) = Cluster::start_broker(kind, 2, 2).await else {
        return;
    };
    let user = format!("u{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let tab1 = c.connect(0, &user).await;
    let tab2 = c.connect(0, &user).await;
    assert!(routed(&c, &user).await, "a connected user is routable");
    if kind == BackendKind::Rabbitmq {
        assert_eq!(
            rabbitmq_bindings(&c.config.namespace, &user),
            1,
            "two tabs on one gateway make one binding"
        );
    }
    // Messages cross gateways through the broker, to both tabs.
    let other = c.connect(1, "sender").await;
    let id = send_ok(&other, json!({ "to": user, "content": "across" })).await;
    assert_eq!(next(&tab1).await.1["id"], json!(id));
    assert_eq!(next(&tab2).await.1["id"], json!(id));
    assert_eq!(
        next(&other).await.1["id"],
        json!(id),
        "the sender's session gets its copy"
    );
    tab1.close().await;
    c.wait_sessions(0, 1).await;
    assert!(routed(&c, &user).await, "the other tab keeps the route");
    tab2.close().await;
    wait_until_unroutable(&c, &user).await;
    if kind == BackendKind::Rabbitmq {
        assert_eq!(
            rabbitmq_bindings(&c.config.namespace, &user),
            0,
            "no binding remains"
        );
    }
    quiet(&other, "nothing stray").await;
    c.stop().await;
}

common::backend_tests!(routes_follow_sessions {
    rabbitmq_routes_follow_sessions: Rabbitmq,
    redis_routes_follow_sessions: Redis,
});
