//! The jitter workload end to end against a small reference server: a
//! socketioxide gateway that keeps the contract's streams and positions in
//! memory and replays on `resume` exactly as the contract says. Against it
//! the workload must count everything delivered and nothing wrong — its
//! resets, positions and reconnects are right before any real gateway
//! supports resume; and when the server's replay skips an entry, it must
//! count the loss and the gap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Json;
use fanout::auth::Tokens;
use fanout_bench::jitter::{JitterReport, JitterSpec};
use serde_json::{json, Value};
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::SocketIo;

const SECRET: &str = "jitter-test-secret-0123456789abcdef";

#[derive(Default)]
struct Inner {
    /// Stream key (`inbox:<user>`, `channel:<id>`) -> its entries (event
    /// name, payload with `stream` and `seq`), seq = index + 1.
    streams: HashMap<String, Vec<(String, Value)>>,
    /// Channel -> members.
    members: HashMap<String, Vec<String>>,
    /// User -> (channel, its inbox seq of being added, the channel seq).
    joined: HashMap<String, Vec<(String, u64, u64)>>,
    sessions: HashMap<String, Vec<SocketRef>>,
}

struct Server {
    inner: Mutex<Inner>,
    /// Replay leaves out the first missed inbox entry (a broken gateway).
    skip_first_replayed: bool,
    skipped: AtomicU64,
    resets_seen: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Appends to `key` (whose client name is `name`) and emits to `to`'s
    /// live sessions.
    fn append(
        &mut self,
        key: &str,
        name: &str,
        event: &str,
        mut payload: Value,
        to: &[String],
    ) -> u64 {
        let entries = self.streams.entry(key.to_owned()).or_default();
        let seq = entries.len() as u64 + 1;
        payload["stream"] = json!(name);
        payload["seq"] = json!(seq);
        entries.push((event.to_owned(), payload.clone()));
        for user in to {
            for s in self.sessions.get(user).into_iter().flatten() {
                let _ = s.emit(event, &payload);
            }
        }
        seq
    }

    fn after(&self, key: &str, from: u64) -> Vec<(String, Value)> {
        self.streams
            .get(key)
            .map(|e| e.iter().skip(from as usize).cloned().collect())
            .unwrap_or_default()
    }
}

async fn server(skip_first_replayed: bool) -> (String, Arc<Server>) {
    let state = Arc::new(Server {
        inner: Mutex::default(),
        skip_first_replayed,
        skipped: AtomicU64::new(0),
        resets_seen: AtomicU64::new(0),
    });
    let tokens = Tokens::new(SECRET.as_bytes());
    let (layer, io) = SocketIo::builder().build_layer();
    let (st, tk) = (state.clone(), tokens.clone());
    io.ns("/", move |s: SocketRef, TryData(auth): TryData<Value>| {
        let (st, tokens) = (st.clone(), tk.clone());
        async move {
            let auth = auth.unwrap_or_default();
            let Some(user) = auth["token"].as_str().and_then(|t| tokens.verify(t).ok()) else {
                s.disconnect().ok();
                return;
            };
            let resume = auth["resume"].as_object().cloned().unwrap_or_default();
            {
                // Replay and registration under one lock: nothing appended
                // in between is missed or sent twice.
                let mut inner = lock(&st.inner);
                let pos = |k: &str| resume.get(k).and_then(Value::as_u64);
                let inbox_from = pos("inbox").unwrap_or(0);
                let mut replay = inner.after(&format!("inbox:{user}"), inbox_from);
                if st.skip_first_replayed && !replay.is_empty() {
                    replay.remove(0);
                    st.skipped.fetch_add(1, Ordering::SeqCst);
                }
                for (channel, inbox_seq, channel_seq) in
                    inner.joined.get(&user).cloned().unwrap_or_default()
                {
                    let name = format!("channel:{channel}");
                    let from = match pos(&name) {
                        Some(p) => p,
                        None if inbox_seq > inbox_from => channel_seq - 1,
                        None => continue,
                    };
                    replay.extend(inner.after(&name, from));
                }
                for (event, payload) in &replay {
                    let _ = s.emit(event.as_str(), payload);
                }
                let _ = s.emit(
                    "RESUMED",
                    &json!({ "replayed": replay.len(), "complete": true }),
                );
                inner
                    .sessions
                    .entry(user.clone())
                    .or_default()
                    .push(s.clone());
            }
            let st2 = st.clone();
            let me = user.clone();
            s.on_disconnect(move |s: SocketRef| {
                st2.resets_seen.fetch_add(1, Ordering::SeqCst);
                if let Some(list) = lock(&st2.inner).sessions.get_mut(&me) {
                    list.retain(|x| x.id != s.id);
                }
                async {}
            });
            s.on(
                "sendMessage",
                move |ack: AckSender, TryData(v): TryData<Value>| {
                    let (st, user) = (st.clone(), user.clone());
                    async move {
                        let Ok(v) = v else { return };
                        let id = uuid::Uuid::now_v7().to_string();
                        let mut inner = lock(&st.inner);
                        let base = json!({ "id": id, "senderId": user, "content": v["content"],
                        "clientMsgId": v["clientMsgId"], "createdAt": "2026-01-01T00:00:00.000Z" });
                        if let Some(to) = v["to"].as_str() {
                            let mut p = base.clone();
                            p["receiverId"] = json!(to);
                            inner.append(
                                &format!("inbox:{to}"),
                                "inbox",
                                "MESSAGE_RECEIVE",
                                p.clone(),
                                &[to.to_owned()],
                            );
                            inner.append(
                                &format!("inbox:{user}"),
                                "inbox",
                                "MESSAGE_RECEIVE",
                                p,
                                std::slice::from_ref(&user),
                            );
                        } else if let Some(c) = v["channelId"].as_str() {
                            let mut p = base;
                            p["channelId"] = json!(c);
                            let members = inner.members.get(c).cloned().unwrap_or_default();
                            let key = format!("channel:{c}");
                            inner.append(&key, &key, "GROUP_MESSAGE_RECEIVE", p, &members);
                        }
                        drop(inner);
                        let _ = ack.send(&json!({ "ok": true, "id": id }));
                    }
                },
            );
        }
    });
    let st = state.clone();
    let create = post(move |headers: HeaderMap, Json(body): Json<Value>| {
        let (st, tokens) = (st.clone(), tokens.clone());
        async move {
            let creator = headers
                .get("authorization")
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.strip_prefix("Bearer "))
                .and_then(|t| tokens.verify(t).ok());
            let Some(creator) = creator else {
                return StatusCode::UNAUTHORIZED;
            };
            let id = body["id"].as_str().unwrap_or_default().to_owned();
            let mut members = vec![creator.clone()];
            members.extend(
                body["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.as_str().map(str::to_owned)),
            );
            let mut inner = lock(&st.inner);
            inner.members.insert(id.clone(), members.clone());
            let key = format!("channel:{id}");
            for m in &members {
                let change =
                    json!({ "channelId": id, "userId": m, "change": "added", "byUserId": creator });
                let channel_seq =
                    inner.append(&key, &key, "MEMBERSHIP_CHANGE", change.clone(), &members);
                let inbox_seq = inner.append(
                    &format!("inbox:{m}"),
                    "inbox",
                    "MEMBERSHIP_CHANGE",
                    change,
                    std::slice::from_ref(m),
                );
                inner.joined.entry(m.clone()).or_default().push((
                    id.clone(),
                    inbox_seq,
                    channel_seq,
                ));
            }
            StatusCode::CREATED
        }
    });
    let app = axum::Router::new()
        .route("/api/channels", create)
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, state)
}

async fn run(url: String) -> JitterReport {
    let spec = JitterSpec {
        // Two "gateways" (the same server): reconnects pick either.
        urls: vec![url.clone(), url],
        users: 20,
        members: 5,
        rate: 100.0,
        duration: Duration::from_secs(4),
        size: 64,
        close_after_ms: [400, 900],
        offline_ms: [100, 250],
        drain: Duration::from_millis(500),
        user_prefix: "jit".into(),
        progress: None,
    };
    fanout_bench::jitter::run(&spec, &Tokens::new(SECRET.as_bytes()))
        .await
        .expect("run")
}

#[tokio::test]
async fn a_server_that_resumes_exactly_shows_everything_delivered_and_nothing_wrong() {
    let (url, server) = server(false).await;
    let r = run(url).await;
    let t = &r.tally;
    assert!(r.resets >= 20 && r.reconnects == r.resets, "{r:?}");
    assert!(
        server.resets_seen.load(Ordering::SeqCst) >= r.resets,
        "the server saw the resets"
    );
    // A loaded machine acks less before the resets take the acks: the
    // counts must be right whatever the share.
    assert!(r.acked > 50, "{r:?}");
    assert_eq!(t.expected, t.delivered, "{r:?}");
    assert_eq!(t.delivered_pct, 100.0);
    assert_eq!(
        (
            t.lost,
            t.duplicates,
            t.position_violations,
            t.unpositioned,
            t.misrouted
        ),
        (0, 0, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(
        t.resumed,
        r.clients + r.reconnects,
        "one RESUMED per connection"
    );
    assert_eq!((t.resumed_incomplete, t.resumed_missing), (0, 0));
    assert_eq!(
        t.replay_ms.count, r.reconnects,
        "every reconnect's replay timed"
    );
    assert!(r.problems().is_empty());
}

#[tokio::test]
async fn a_replay_that_skips_an_entry_is_a_loss_and_a_gap() {
    let (url, server) = server(true).await;
    let r = run(url).await;
    let t = &r.tally;
    let skipped = server.skipped.load(Ordering::SeqCst);
    assert!(skipped > 0);
    // Every skipped inbox entry is a gap at its client; the skipped
    // entries that were messages (not the set-up's membership changes) are
    // lost unless their ack was lost too.
    assert!(
        t.position_violations > 0 && t.position_violations <= skipped,
        "{r:?} skipped {skipped}"
    );
    assert!(t.lost > 0 && t.lost <= skipped, "{r:?} skipped {skipped}");
    assert_eq!((t.duplicates, t.misrouted), (0, 0));
    assert!(!r.problems().is_empty());
}
