//! The worker stores each message with its positions and publishes its
//! entries (`OutgoingEnvelope::Entry`) to the streams' route keys, issued
//! in position order per key (the memory backend keeps that order): the receiver's and the sender's inbox for a
//! personal message, the channel's stream for a channel message.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fanout::protocol::{IncomingEnvelope, Message, OutgoingEnvelope, Target};
use fanout::store::Store;
use fanout::stream::{Body, Stream};
use fanout_backend::{DynBackend, IncomingEvent, RouteKey, ServerEvent, ServerId};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_publishes_entries_in_position_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}?mode=rwc", dir.path().join("w.db").display());
    let store = Store::connect(&url, 4, Duration::from_secs(5))
        .await
        .expect("connect");
    let backend: DynBackend = Arc::new(fanout_memory::MemoryBackend::new(
        fanout_memory::MemoryConfig::default(),
    ));
    let server = ServerId::new("s1").expect("id");
    let mut events = backend.register_server(&server).await.expect("register");
    let keys = [
        RouteKey::User("alice".into()),
        RouteKey::User("bob".into()),
        RouteKey::Channel("g".into()),
    ];
    for k in &keys {
        backend.bind(&server, k).await.expect("bind");
    }
    let user = |u: &str| Target::User(u.to_owned());
    let sends = [
        ("alice", user("bob")),
        ("bob", user("alice")),
        ("alice", Target::Channel("g".into())),
        ("alice", user("bob")),
        ("bob", Target::Channel("g".into())),
        ("bob", user("alice")),
        ("alice", user("bob")),
    ];
    for (n, (from, to)) in sends.iter().enumerate() {
        let message = Message {
            id: uuid::Uuid::now_v7().to_string(),
            sender_id: (*from).to_owned(),
            target: to.clone(),
            content: format!("m{n}"),
            client_msg_id: None,
            created_at: n as i64,
        };
        let env = IncomingEnvelope { v: 1, message };
        backend
            .publish_incoming(IncomingEvent {
                id: env.message.id.clone(),
                ordering_key: env.message.ordering_key(),
                payload: serde_json::to_vec(&env).expect("encode").into(),
            })
            .await
            .expect("publish");
    }
    let stop = CancellationToken::new();
    let worker = tokio::spawn(fanout::worker::run(
        backend.clone(),
        store.clone(),
        Arc::new(fanout::metrics::Metrics::new()),
        fanout::config::WorkerConfig::default(),
        3,
        stop.clone(),
    ));

    // 5 personal messages (2 entries each), 2 channel messages.
    let mut got: HashMap<RouteKey, Vec<(Stream, i64, String)>> = HashMap::new();
    for _ in 0..12 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an entry in time")
            .expect("stream open");
        let ServerEvent::Message(m) = event else {
            panic!("unexpected {event:?}");
        };
        let env: OutgoingEnvelope = serde_json::from_slice(&m.payload).expect("decode");
        let OutgoingEnvelope::Entry(entry) = env;
        assert_eq!(entry.stream.route_key(), m.key, "to its stream's key");
        let Body::Message(message) = entry.body else {
            panic!("a message entry");
        };
        got.entry(m.key)
            .or_default()
            .push((entry.stream, entry.seq, message.content));
    }
    let seqs = |k: &RouteKey| -> Vec<i64> { got[k].iter().map(|(_, s, _)| *s).collect() };
    assert_eq!(seqs(&keys[0]), [1, 2, 3, 4, 5], "alice's inbox, in order");
    assert_eq!(seqs(&keys[1]), [1, 2, 3, 4, 5], "bob's inbox, in order");
    assert_eq!(seqs(&keys[2]), [1, 2], "the channel's stream");
    let contents =
        |k: &RouteKey| -> Vec<String> { got[k].iter().map(|(_, _, c)| c.clone()).collect() };
    assert_eq!(contents(&keys[0]), ["m0", "m1", "m3", "m5", "m6"]);
    assert_eq!(contents(&keys[2]), ["m2", "m4"]);
    stop.cancel();
    worker.await.expect("join").expect("worker");
    store.close().await;
}
