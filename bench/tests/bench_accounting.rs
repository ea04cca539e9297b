//! The load generator's loss and duplicate counts are real: run against a
//! deliberately faulty gateway (a small socketioxide server that acks
//! every send but drops some deliveries and doubles others), it must count
//! exactly the deliveries that server dropped and doubled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout::auth::Tokens;
use fanout_bench::load::{LoadSpec, Pattern};
use serde_json::{json, Value};
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::SocketIo;

const SECRET: &str = "accounting-test-secret-0123456789";
/// Every DROP_EVERY-th send is acked but never delivered.
const DROP_EVERY: u64 = 17;
/// Every DOUBLE_EVERY-th send is delivered twice to the same session.
const DOUBLE_EVERY: u64 = 23;

#[derive(Default)]
struct Faulty {
    users: Mutex<HashMap<String, Vec<SocketRef>>>,
    sends: AtomicU64,
    dropped: AtomicU64,
    doubled: AtomicU64,
}

impl Faulty {
    fn deliver(&self, to: &str, event: &Value) {
        let n = self.sends.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(DROP_EVERY) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let copies = if n.is_multiple_of(DOUBLE_EVERY) {
            self.doubled.fetch_add(1, Ordering::SeqCst);
            2
        } else {
            1
        };
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for s in users.get(to).into_iter().flatten() {
            for _ in 0..copies {
                let _ = s.emit("MESSAGE_RECEIVE", event);
            }
        }
    }
}

async fn faulty_gateway() -> (String, Arc<Faulty>) {
    let state = Arc::new(Faulty::default());
    let tokens = Tokens::new(SECRET.as_bytes());
    let (layer, io) = SocketIo::builder().build_layer();
    let st = state.clone();
    io.ns("/", move |s: SocketRef, TryData(auth): TryData<Value>| {
        let (st, tokens) = (st.clone(), tokens.clone());
        async move {
            let user = auth
                .ok()
                .and_then(|a| a["token"].as_str().map(str::to_owned))
                .and_then(|t| tokens.verify(&t).ok());
            let Some(user) = user else {
                s.disconnect().ok();
                return;
            };
            st.users
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(user.clone())
                .or_default()
                .push(s.clone());
            s.on(
                "sendMessage",
                move |ack: AckSender, TryData(v): TryData<Value>| {
                    let (st, user) = (st.clone(), user.clone());
                    async move {
                        let Ok(v) = v else { return };
                        let id = uuid::Uuid::now_v7().simple().to_string();
                        let _ = ack.send(&json!({ "ok": true, "id": id }));
                        let to = v["to"].as_str().unwrap_or_default().to_owned();
                        let event = json!({
                            "id": id,
                            "senderId": user,
                            "receiverId": to,
                            "content": v["content"],
                            "createdAt": "2026-01-01T00:00:00.000Z",
                        });
                        st.deliver(&to, &event);
                    }
                },
            );
        }
    });
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, state)
}

#[tokio::test]
async fn harness_counts_every_dropped_and_doubled_delivery() {
    let (url, faulty) = faulty_gateway().await;
    let spec = LoadSpec {
        urls: vec![url],
        pattern: Pattern::Personal,
        users: 10,
        rate: 400.0,
        duration: Duration::from_secs(2),
        warmup: Duration::ZERO,
        size: 64,
        drain: Duration::from_millis(500),
        user_prefix: "acct".into(),
        progress: None,
    };
    let report = fanout_bench::load::run(&spec, &Tokens::new(SECRET.as_bytes()))
        .await
        .expect("run");
    let (sends, dropped, doubled) = (
        faulty.sends.load(Ordering::SeqCst),
        faulty.dropped.load(Ordering::SeqCst),
        faulty.doubled.load(Ordering::SeqCst),
    );
    assert!(sends > 500, "too few sends to mean anything: {sends}");
    assert!(dropped > 0 && doubled > 0);
    assert_eq!(report.acked, sends, "{report:?}");
    assert_eq!(
        report.lost, dropped,
        "lost must be exactly what was dropped"
    );
    assert_eq!(
        report.duplicated, doubled,
        "duplicates must be exactly what was doubled"
    );
    assert_eq!(report.delivered, sends - dropped);
    assert_eq!(report.expected, sends);
    assert_eq!(report.misrouted, 0);
}
