//! Property tests over the client-facing decoder and validator, bounded so
//! they finish in seconds under `cargo test` (and so in CI):
//!
//! - `parse_send` on arbitrary JSON and arbitrary bytes never panics, and
//!   decides exactly as `docs/protocol.md`'s table says (an independent
//!   oracle below), so every accepted send satisfies the limits;
//! - ids can never forge a route key or a conversation key;
//! - the broker envelopes decode arbitrary bytes without panicking;
//! - a live gateway fed arbitrary Socket.IO / Engine.IO frames never
//!   panics and keeps serving.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{next, send_ok, Cluster};
use fanout::protocol::{
    is_valid_client_msg_id, parse_send, ErrorCode, IncomingEnvelope, OutgoingEnvelope, Target,
};
use fanout_backend::{is_valid_id, OrderingKey, RouteKey};
use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const CASES: u32 = 2000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Failures are reproduced from the printed seed; files in the tree
        // would be written by every developer's run.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings that sit on the validator's edges: valid ids and clientMsgIds,
/// separators, non-ASCII, NUL, empty, around 64 characters, and arbitrary
/// text.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{1,64}",
        "[A-Za-z0-9_.:-]{0,66}",
        "[A-Za-z0-9_-]{63,66}",
        "[a-z:*{} ./#|\u{0}\u{e9}\u{65e5}\u{200b}-]{0,8}",
        Just(String::new()),
        any::<String>(),
        // Around the small content limit used below, in bytes.
        "[a-z\u{e9}\u{1f600}]{10,20}",
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("to".to_owned()),
        Just("channelId".to_owned()),
        Just("content".to_owned()),
        Just("clientMsgId".to_owned()),
        Just("from".to_owned()),
        Just("senderId".to_owned()),
        any::<String>(),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        tricky_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Objects shaped like a send, each field absent, null, of a wrong type
/// or an edge-case string: most cases reach the deep checks.
fn send_like() -> impl Strategy<Value = Value> {
    let value = prop_oneof![
        4 => tricky_string().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => arb_json(),
    ];
    (
        prop::option::of(value.clone()),
        prop::option::of(value.clone()),
        prop::option::of(value.clone()),
        prop::option::of(value),
        prop::option::of(tricky_string()),
    )
        .prop_map(|(to, channel, content, cid, extra)| {
            let mut m = Map::new();
            for (k, v) in [
                ("to", to),
                ("channelId", channel),
                ("content", content),
                ("clientMsgId", cid),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            if let Some(x) = extra {
                m.insert("senderId".to_owned(), Value::from(x));
            }
            Value::Object(m)
        })
}

/// `docs/protocol.md`'s validation table, written independently of the
/// code: the first failing row's code, or the accepted request's parts.
fn oracle(v: &Value, max: usize) -> Result<(Target, String, Option<String>), ErrorCode> {
    use ErrorCode::*;
    let obj = v.as_object().ok_or(InvalidPayload)?;
    let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
    let id = |k: &str| match get(k) {
        None => Ok(None),
        Some(Value::String(s)) if is_valid_id(s) => Ok(Some(s.clone())),
        Some(_) => Err(InvalidPayload),
    };
    let target = match (id("to")?, id("channelId")?) {
        (Some(u), None) => Target::User(u),
        (None, Some(c)) => Target::Channel(c),
        _ => return Err(InvalidPayload),
    };
    let content = match get("content") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(InvalidPayload),
    };
    if content.len() > max {
        return Err(TooLarge);
    }
    if content.contains('\u{0}') {
        return Err(InvalidPayload);
    }
    let cid = match get("clientMsgId") {
        None => None,
        Some(Value::String(s)) if is_valid_client_msg_id(s) => Some(s.clone()),
        Some(_) => return Err(InvalidPayload),
    };
    Ok((target, content, cid))
}

fn check_against_oracle(v: &Value, max: usize) -> Result<(), TestCaseError> {
    let got = parse_send(v, max);
    match (oracle(v, max), got) {
        (Ok((target, content, cid)), Ok(req)) => {
            prop_assert_eq!(&req.target, &target);
            prop_assert_eq!(&req.content, &content);
            prop_assert_eq!(&req.client_msg_id, &cid);
            // The limits, restated on what was accepted.
            prop_assert!(!req.content.is_empty() && req.content.len() <= max);
            prop_assert!(!req.content.contains(char::from(0)), "content has NUL");
            let id = match &req.target {
                Target::User(u) | Target::Channel(u) => u,
            };
            prop_assert!(is_valid_id(id));
            prop_assert!(req
                .client_msg_id
                .as_deref()
                .is_none_or(is_valid_client_msg_id));
        }
        (Err(code), Err(e)) => prop_assert_eq!(e.code, code, "{} → {:?}", v, e),
        (want, got) => prop_assert!(false, "{v}: oracle {want:?}, parse_send {got:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_send_decides_like_the_documented_table_on_arbitrary_json(v in arb_json()) {
        check_against_oracle(&v, 16)?;
        check_against_oracle(&v, 4096)?;
    }

    #[test]
    fn parse_send_decides_like_the_documented_table_on_send_shaped_objects(v in send_like()) {
        check_against_oracle(&v, 16)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            check_against_oracle(&v, 16)?;
        }
        let _ = serde_json::from_slice::<IncomingEnvelope>(&bytes);
        let _ = serde_json::from_slice::<OutgoingEnvelope>(&bytes);
    }

    #[test]
    fn route_keys_round_trip_and_never_collide(a in tricky_string(), b in tricky_string()) {
        // Whatever text arrives from a broker, parsing never panics and
        // only ever yields a key whose ids are valid.
        if let Some(k) = RouteKey::parse(&a) {
            let id = match &k { RouteKey::User(u) | RouteKey::Channel(u) => u };
            prop_assert!(is_valid_id(id));
            prop_assert_eq!(k.as_routing_key(), a.clone());
        }
        prop_assert_eq!(RouteKey::user(&a).is_ok(), is_valid_id(&a));
        prop_assert_eq!(RouteKey::channel(&a).is_ok(), is_valid_id(&a));
        if is_valid_id(&a) && is_valid_id(&b) {
            let (ua, ca) = (RouteKey::User(a.clone()), RouteKey::Channel(a.clone()));
            let (ub, cb) = (RouteKey::User(b.clone()), RouteKey::Channel(b.clone()));
            prop_assert_ne!(ua.as_routing_key(), cb.as_routing_key());
            prop_assert_eq!(ua.as_routing_key() == ub.as_routing_key(), a == b);
            prop_assert_eq!(ca.as_routing_key() == cb.as_routing_key(), a == b);
            prop_assert_eq!(RouteKey::parse(&ua.as_routing_key()), Some(ua));
            prop_assert_eq!(RouteKey::parse(&ca.as_routing_key()), Some(ca));
        }
    }

    #[test]
    fn conversation_keys_never_collide(
        a in "[A-Za-z0-9_-]{1,64}", b in "[A-Za-z0-9_-]{1,64}",
        c in "[A-Za-z0-9_-]{1,64}", d in "[A-Za-z0-9_-]{1,64}",
    ) {
        let same_pair = (a == c && b == d) || (a == d && b == c);
        prop_assert_eq!(OrderingKey::direct(&a, &b) == OrderingKey::direct(&c, &d), same_pair);
        prop_assert_ne!(OrderingKey::direct(&a, &b), OrderingKey::channel(&c));
        prop_assert_eq!(OrderingKey::channel(&a) == OrderingKey::channel(&c), a == c);
    }
}

// ---------------------------------------------------------------------
// Frames on the wire, against a live gateway.

/// Panics anywhere in this process (the gateway runs in it) since the
/// hook was installed.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

#[derive(Debug, Clone)]
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

/// What a hostile client may write: Engine.IO and Socket.IO packet types
/// with arbitrary bodies, events with arbitrary names, ack ids and data,
/// binary placeholders, other namespaces, and plain garbage.
fn frame() -> impl Strategy<Value = Frame> {
    let text = prop_oneof![
        any::<String>(),
        "[0-6][0-6]?",
        arb_json().prop_map(|v| format!("42{v}")),
        (any::<u32>(), arb_json())
            .prop_map(|(id, v)| format!("42{id}{}", json!(["sendMessage", v]))),
        send_like().prop_map(|v| format!("42{}", json!(["sendMessage", v]))),
        (any::<String>(), arb_json()).prop_map(|(n, v)| format!("42{}", json!([n, v]))),
        (0u8..4, arb_json()).prop_map(|(n, v)| format!("45{n}-{}", json!(["sendMessage", v]))),
        ("/[a-z]{0,5}", arb_json())
            .prop_map(|(ns, v)| format!("42{ns},{}", json!(["sendMessage", v]))),
        ("[0-9]{0,25}", any::<String>()).prop_map(|(id, s)| format!("43{id}{s}")),
        arb_json().prop_map(|v| format!("40{v}")),
        Just("41".to_owned()),
    ];
    prop_oneof![
        9 => text.prop_map(Frame::Text),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Frame::Binary),
    ]
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connected Socket.IO session over a raw WebSocket, or `None` if the
/// gateway refused it (it must not, for a valid token).
async fn raw_connect(url: &str, token: &str) -> Option<Ws> {
    let ws_url = format!(
        "{}/socket.io/?EIO=4&transport=websocket",
        url.replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.ok()?;
    let _open = ws.next().await?.ok()?;
    ws.send(WsMessage::text(format!("40{}", json!({ "token": token }))))
        .await
        .ok()?;
    loop {
        match ws.next().await?.ok()? {
            WsMessage::Text(t) if t.starts_with("40") => return Some(ws),
            // Engine.IO pings at once on open.
            WsMessage::Text(t) if t.as_str() == "2" => ws.send(WsMessage::text("3")).await.ok()?,
            other => {
                eprintln!("connect answered {other:?}");
                return None;
            }
        }
    }
}

#[test]
fn arbitrary_frames_never_panic_a_live_gateway() {
    count_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = rt.block_on(Cluster::start(1, 1));
    let url = cluster.urls[0].clone();
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 300,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let connects = Arc::new(AtomicUsize::new(0));
    let ws: Arc<tokio::sync::Mutex<Option<Ws>>> = Arc::default();
    let strategy = prop::collection::vec(frame(), 1..6);
    let result = runner.run(&strategy, |frames| {
        rt.block_on(async {
            let mut guard = ws.lock().await;
            if guard.is_none() {
                // A fresh user each time: closed sessions end asynchronously
                // and must not count against the per-user connection limit.
                let n = connects.fetch_add(1, Ordering::SeqCst);
                let token = cluster.token(&format!("fuzz{n}"));
                *guard = raw_connect(&url, &token).await;
                prop_assert!(guard.is_some(), "the gateway refused a valid session");
            }
            let Some(conn) = guard.as_mut() else {
                return Ok(());
            };
            for f in frames {
                let msg = match f {
                    Frame::Text(t) => WsMessage::text(t),
                    Frame::Binary(b) => WsMessage::binary(b),
                };
                if conn.send(msg).await.is_err() {
                    *guard = None;
                    break;
                }
            }
            // Drain what came back; a closed connection is reopened next case.
            if let Some(conn) = guard.as_mut() {
                loop {
                    match tokio::time::timeout(Duration::from_millis(2), conn.next()).await {
                        Err(_) => break,
                        Ok(Some(Ok(WsMessage::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => {
                            *guard = None;
                            break;
                        }
                        Ok(Some(Ok(WsMessage::Text(t)))) if t.as_str() == "2" => {
                            let _ = conn.send(WsMessage::text("3")).await;
                        }
                        Ok(Some(Ok(_))) => {}
                    }
                }
            }
            Ok(())
        })
    });
    rt.block_on(async {
        // Still serving: a fresh pair exchanges a message.
        let a = cluster.connect(0, "after-a").await;
        let b = cluster.connect(0, "after-b").await;
        let id = send_ok(&a, json!({ "to": "after-b", "content": "still here" })).await;
        assert_eq!(next(&b).await.1["id"], json!(id));
    });
    rt.block_on(cluster.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a panic happened (see above)"
    );
    eprintln!(
        "frames fuzz: {} sessions opened",
        connects.load(Ordering::SeqCst)
    );
}
