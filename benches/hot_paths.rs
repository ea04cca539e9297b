//! Micro-benchmarks of the hot paths: a gateway's decode/validate of
//! `sendMessage`, routing (ordering key, partition, route keys), the event
//! encoding, and the memory backend's publish -> deliver on both sides. Run: `cargo bench --bench hot_paths`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fanout::protocol::{parse_send, Message, OutgoingEnvelope, Target};
use fanout::stream::{Body, Entry, Stream};
use fanout_backend::{
    ConsumeOptions, FanoutBackend, IncomingEvent, OrderingKey, RouteKey, ServerEvent, ServerId,
};
use fanout_memory::MemoryBackend;
use futures::StreamExt;
use serde_json::json;

fn decode_validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("gateway");
    for size in [16usize, 1024, 4096] {
        let text =
            json!({ "to": "bob_01", "content": "x".repeat(size), "clientMsgId": "client-123:45" })
                .to_string();
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("decode_validate", size),
            &text,
            |b, text| {
                b.iter(|| {
                    let v: serde_json::Value = serde_json::from_str(text).expect("json");
                    parse_send(&v, 4096).expect("valid")
                })
            },
        );
    }
    let m = Message {
        id: uuid::Uuid::now_v7().to_string(),
        sender_id: "alice".into(),
        target: Target::Channel("general".into()),
        content: "hello there, this is a typical chat line".into(),
        client_msg_id: Some("c-1".into()),
        created_at: 1_764_000_000_000,
    };
    let wire = serde_json::to_vec(&OutgoingEnvelope::Entry(Entry {
        stream: Stream::Channel("general".into()),
        seq: 42,
        body: Body::Message(m.clone()),
    }))
    .expect("encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_outgoing_and_encode_event", |b| {
        b.iter(|| {
            let env: OutgoingEnvelope = serde_json::from_slice(&wire).expect("decode");
            let OutgoingEnvelope::Entry(entry) = env;
            serde_json::to_string(&entry.to_event().1).expect("encode")
        })
    });
    g.finish();
}

/// What a worker computes per message before publishing: the conversation's
/// partition and the route keys as the broker sees them.
fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    for (name, target) in [
        ("direct", Target::User("bob_01".into())),
        ("channel", Target::Channel("general".into())),
    ] {
        let m = Message {
            id: uuid::Uuid::now_v7().to_string(),
            sender_id: "alice_01".into(),
            target,
            content: "hi".into(),
            client_msg_id: None,
            created_at: 1_764_000_000_000,
        };
        g.bench_with_input(
            BenchmarkId::new("partition_and_route_keys", name),
            &m,
            |b, m| {
                b.iter(|| {
                    let p = fanout_backend::partition_for(&m.ordering_key(), 16);
                    let keys: Vec<String> = m
                        .route_keys()
                        .iter()
                        .map(RouteKey::as_routing_key)
                        .collect();
                    (p, keys)
                })
            },
        );
    }
    g.finish();
}

fn memory_backend(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = MemoryBackend::default();
    let server = ServerId::new("bench").expect("valid");
    let key = RouteKey::user("bob").expect("valid");
    let mut stream = rt.block_on(async {
        let s = backend.register_server(&server).await.expect("register");
        backend.bind(&server, &key).await.expect("bind");
        s
    });
    let payload = Bytes::from(vec![b'x'; 256]);
    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::Elements(1));
    g.bench_function("outgoing_publish_deliver", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    backend
                        .publish_outgoing(&key, payload.clone())
                        .await
                        .expect("publish");
                    match stream.next().await {
                        Some(ServerEvent::Message(_)) => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
                start.elapsed()
            })
        })
    });
    let mut incoming = rt.block_on(async {
        backend
            .consume_incoming(ConsumeOptions::default())
            .await
            .expect("consume")
    });
    let ordering = OrderingKey::direct("alice", "bob");
    g.bench_function("incoming_publish_consume_ack", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let event = IncomingEvent {
                        id: "m".into(),
                        ordering_key: ordering.clone(),
                        payload: payload.clone(),
                    };
                    backend.publish_incoming(event).await.expect("publish");
                    let d = incoming.next().await.expect("open").expect("delivery");
                    d.ack().await.expect("ack");
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, decode_validate, routing, memory_backend);
criterion_main!(benches);
