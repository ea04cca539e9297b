//! Abuse: authorization on every handler, hostile ids, the per-user and
//! per-connection limits, slow clients, and a flood that must not slow
//! everyone else down. `docs/security.md` cites these tests line by line.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{
    api_call, metric, next, next_chat, quiet, quiet_chat, send_ok, spawn_gateway, Cluster, SECRET,
    WAIT,
};
use fanout::app;
use fanout::auth::Tokens;
use fanout::config::{BackendKind, Config};
use fanout::metrics::Metrics;
use fanout::protocol::{IncomingEnvelope, Message, Target};
use fanout::store::Store;
use fanout_backend::{DynBackend, IncomingEvent};
use fanout_bench::client::{Client, ClientError};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, RwLock};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// The flood test measures latency: it runs alone (write lock), the other
/// tests of this file together (read locks).
static TIMING: RwLock<()> = RwLock::const_new(());

/// Ids that must never reach a routing key, a Redis key, a Lua argument or
/// SQL: separators of every backend's key syntax, glob and brace
/// characters, whitespace, path tricks, non-ASCII, control characters, the
/// empty string and one character too many.
fn hostile_ids() -> Vec<String> {
    [
        "a:b",
        "channel:x",
        "*",
        "a*",
        "{x}",
        "a{b}c",
        "a b",
        " ",
        "..",
        "../etc",
        "a/b",
        "a.b",
        "a|b",
        "a#b",
        "a?b",
        "a%2Fb",
        "'; DROP TABLE messages; --",
        "\"",
        "é",
        "日本",
        "a\u{0}b",
        "a\nb",
        "a\u{200b}b",
        "",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        "x".repeat(65),
        "é".repeat(32), // 64 bytes but not ASCII
    ])
    .collect()
}

// ---------------------------------------------------------------------
// A single gateway and worker with chosen limits (the shared Cluster sets
// its own, very high ones).

struct Node {
    url: String,
    store: Store,
    tokens: Tokens,
    backend: DynBackend,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    worker_stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(configure: impl FnOnce(&mut Config)) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, configure).await
    }

    async fn start_on(listener: TcpListener, configure: impl FnOnce(&mut Config)) -> Node {
        // The database in memory where the machine has a tmpfs: the flood
        // test measures the gateway, not the disk's fsync stalls.
        let dir = tempfile::Builder::new()
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir");
        let mut config = Config {
            backend: BackendKind::Memory,
            jwt_secret: Some(SECRET.to_owned()),
            data_dir: dir.path().to_owned(),
            broker_timeout_ms: 15_000,
            ..Config::default()
        };
        configure(&mut config);
        let backend = app::connect_backend(&config).await.expect("backend");
        let store = app::connect_store(&config).await.expect("store");
        let tokens = Tokens::new(SECRET.as_bytes());
        let worker_stop = CancellationToken::new();
        tokio::spawn(fanout::worker::run(
            backend.clone(),
            store.clone(),
            Arc::new(Metrics::new()),
            config.worker.clone(),
            config.incoming.max_attempts,
            worker_stop.clone(),
        ));
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, task) = spawn_gateway(
            config,
            listener,
            backend.clone(),
            store.clone(),
            tokens.clone(),
        );
        Node {
            url,
            store,
            tokens,
            backend,
            stop: Some(tx),
            task,
            worker_stop,
            _dir: dir,
        }
    }

    fn token(&self, user: &str) -> String {
        self.tokens.mint(user, 600).expect("mint")
    }

    async fn connect(&self, user: &str) -> Result<Client, ClientError> {
        Client::connect(&self.url, json!({ "token": self.token(user) })).await
    }

    async fn get(&self, user: &str, path: &str) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(self.token(user))
            .send()
            .await
            .expect("http");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        self.worker_stop.cancel();
        let _ = self.backend.shutdown().await;
    }
}

/// Waits until `sample` satisfies `ok`, up to `WAIT`.
async fn wait_metric(url: &str, sample: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric(url, sample).await;
        if ok(v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_code(ack: &Value) -> &str {
    ack["error"]["code"].as_str().unwrap_or("<none>")
}

async fn create_channel(c: &Cluster, owner: &str, id: &str, members: &[&str]) {
    c.create_channel(
        0,
        owner,
        json!({ "id": id, "name": id, "members": members }),
    )
    .await;
}

// ---------------------------------------------------------------------
// Authorization.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_history_needs_membership_and_conversations_are_the_callers_own() {
    let _t = TIMING.read().await;
    let c = Cluster::start(1, 1).await;
    let alice = c.connect(0, "alice").await;
    create_channel(&c, "alice", "secret", &["bob"]).await;
    send_ok(
        &alice,
        json!({ "channelId": "secret", "content": "for members" }),
    )
    .await;
    send_ok(&alice, json!({ "to": "bob", "content": "for bob" })).await;
    // Both stored once the sender has seen them delivered.
    next(&alice).await;
    next(&alice).await;

    let (status, body) = c.get(0, "mallory", "/api/channels/secret/messages").await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"), "{body}");
    assert!(body.get("messages").is_none(), "no history leaks: {body}");
    let (status, body) = c.get(0, "bob", "/api/channels/secret/messages").await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(1));

    // Mallory asking for "bob"'s conversation gets mallory↔bob, which is
    // empty, never alice↔bob.
    let (status, body) = c.get(0, "mallory", "/api/conversations/bob/messages").await;
    assert_eq!((status, &body["messages"]), (200, &json!([])));
    let (status, body) = c
        .get(0, "mallory", "/api/conversations/alice/messages")
        .await;
    assert_eq!((status, &body["messages"]), (200, &json!([])));
    let (_, body) = c.get(0, "bob", "/api/conversations/alice/messages").await;
    assert_eq!(body["messages"][0]["content"], json!("for bob"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_need_membership_or_ownership() {
    let _t = TIMING.read().await;
    let c = Cluster::start(1, 1).await;
    create_channel(&c, "owner", "club", &["member", "other"]).await;
    let call = |user: &'static str, method: Method, path: String, body: Option<Value>| {
        let c = &c;
        async move { c.api(0, user, method, &path, body).await.0 }
    };
    let members = "/api/channels/club/members".to_owned();

    // A non-member can neither add itself nor anyone else.
    for who in ["mallory", "friend"] {
        let status = call(
            "mallory",
            Method::POST,
            members.clone(),
            Some(json!({ "userId": who })),
        )
        .await;
        assert_eq!(status, 403, "mallory adding {who}");
        let since = c.store.member_since("club", who).await.expect("store");
        assert_eq!(since, None, "{who} must not have become a member");
    }
    // A member who is not the creator cannot remove another member, and a
    // non-member cannot remove anyone.
    for (caller, target) in [
        ("member", "other"),
        ("mallory", "member"),
        ("mallory", "owner"),
    ] {
        let status = call(caller, Method::DELETE, format!("{members}/{target}"), None).await;
        assert_eq!(status, 403, "{caller} removing {target}");
        let since = c.store.member_since("club", target).await.expect("store");
        assert!(since.is_some(), "{target} must still be a member");
    }
    // What is allowed: a member adds, a member leaves, the creator removes.
    let added = call(
        "member",
        Method::POST,
        members.clone(),
        Some(json!({ "userId": "newbie" })),
    );
    assert_eq!(added.await, 204);
    assert_eq!(
        call("other", Method::DELETE, format!("{members}/other"), None).await,
        204
    );
    assert_eq!(
        call("owner", Method::DELETE, format!("{members}/member"), None).await,
        204
    );
    assert_eq!(
        c.store.member_since("club", "member").await.expect("store"),
        None
    );
    // Unknown channel: 404 for a member-shaped request, never a creation.
    let status = call(
        "mallory",
        Method::POST,
        "/api/channels/nowhere/members".to_owned(),
        Some(json!({ "userId": "mallory" })),
    )
    .await;
    assert_eq!(status, 404);
    assert!(c.store.channel("nowhere").await.expect("store").is_none());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_user_is_the_sender_whatever_the_payload_says() {
    let _t = TIMING.read().await;
    let c = Cluster::start(2, 1).await;
    let alice = c.connect(0, "alice").await;
    let bob = c.connect(1, "bob").await;
    let victim = c.connect(1, "victim").await;
    create_channel(&c, "alice", "room", &["bob", "victim"]).await;
    let spoof = json!({
        "from": "victim", "senderId": "victim", "sender_id": "victim",
        "userId": "victim", "sub": "victim", "user": "victim",
    });
    let mut personal = spoof.clone();
    personal["to"] = json!("bob");
    personal["content"] = json!("hi");
    let id = send_ok(&alice, personal).await;
    let (_, data) = next_chat(&bob).await;
    assert_eq!(
        (&data["id"], &data["senderId"]),
        (&json!(id), &json!("alice"))
    );
    let mut group = spoof;
    group["channelId"] = json!("room");
    group["content"] = json!("hello room");
    let gid = send_ok(&alice, group).await;
    for s in [&bob, &victim] {
        let (name, data) = next_chat(s).await;
        assert_eq!(name, "GROUP_MESSAGE_RECEIVE");
        assert_eq!(
            (&data["id"], &data["senderId"]),
            (&json!(gid), &json!("alice"))
        );
    }
    quiet_chat(&victim, "the personal message went to bob only").await;
    // Stored as alice's, too: victim has no conversation with bob.
    let (_, body) = c.get(0, "victim", "/api/conversations/bob/messages").await;
    assert_eq!(body["messages"], json!([]));

    // Extra claims in the handshake cannot bind a session as someone else.
    let posing = Client::connect(
        &c.urls[0],
        json!({ "token": c.token("mallory"), "userId": "bob", "sub": "bob", "user": "bob" }),
    )
    .await
    .expect("connect");
    send_ok(&alice, json!({ "to": "bob", "content": "for bob only" })).await;
    assert_eq!(next_chat(&bob).await.1["content"], json!("for bob only"));
    quiet_chat(&posing, "a mallory session must not receive bob's messages").await;
    let id = send_ok(&posing, json!({ "to": "bob", "content": "who am I" })).await;
    let (_, data) = next_chat(&bob).await;
    assert_eq!(
        (&data["id"], &data["senderId"]),
        (&json!(id), &json!("mallory"))
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_cannot_send_to_a_channel_and_nothing_is_stored() {
    let _t = TIMING.read().await;
    let c = Cluster::start(1, 1).await;
    let member = c.connect(0, "member").await;
    let mallory = c.connect(0, "mallory").await;
    create_channel(&c, "member", "closed", &[]).await;
    for payload in [
        json!({ "channelId": "closed", "content": "let me in" }),
        json!({ "channelId": "closed", "content": "again", "clientMsgId": "m-1" }),
        json!({ "channelId": "does-not-exist", "content": "hello?" }),
    ] {
        let ack = mallory
            .call("sendMessage", &payload, WAIT)
            .await
            .expect("ack");
        assert_eq!(error_code(&ack), "not_member", "{payload}: {ack}");
    }
    quiet_chat(&member, "nothing from a non-member").await;
    assert_eq!(c.store.count_messages().await.expect("count"), 0);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_cannot_send_right_after_the_204() {
    let _t = TIMING.read().await;
    let c = Cluster::start(2, 1).await;
    let owner = c.connect(0, "owner").await;
    for round in 0..5 {
        let user = format!("leaver{round}");
        let room = format!("room{round}");
        let leaver = c.connect(1, &user).await;
        create_channel(&c, "owner", &room, &[&user]).await;
        // Membership reaches the leaver's gateway (it can send).
        send_ok(&leaver, json!({ "channelId": room, "content": "in" })).await;
        let path = format!("/api/channels/{room}/members/{user}");
        let (status, _) = c.api(0, "owner", Method::DELETE, &path, None).await;
        assert_eq!(status, 204);
        // At once: the leave may not have reached gateway 1 yet.
        let ack = leaver
            .call(
                "sendMessage",
                &json!({ "channelId": room, "content": "out" }),
                WAIT,
            )
            .await
            .expect("ack");
        assert_eq!(error_code(&ack), "not_member", "round {round}: {ack}");
        // The owner sees the first message and never the second.
        let (_, data) = next_chat(&owner).await;
        assert_eq!(data["content"], json!("in"));
        quiet_chat(&owner, "nothing sent after the removal").await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_are_refused_everywhere_and_nothing_is_stored_or_bound() {
    let _t = TIMING.read().await;
    let c = Cluster::start(1, 1).await;
    let alice = c.connect(0, "alice").await;
    create_channel(&c, "alice", "real", &[]).await;
    let bound_before = metric(&c.urls[0], "fanout_bound_keys").await;
    for (n, id) in hostile_ids().into_iter().enumerate() {
        // A caller per id: the calls are many, and the API rate is per user.
        let caller = format!("caller{n}");
        for payload in [
            json!({ "to": id, "content": "x" }),
            json!({ "channelId": id, "content": "x" }),
            json!({ "to": "alice", "content": "x", "clientMsgId": format!("{id} ") }),
        ] {
            let ack = alice
                .call("sendMessage", &payload, WAIT)
                .await
                .expect("ack");
            assert_eq!(error_code(&ack), "invalid_payload", "{payload}: {ack}");
        }
        for body in [
            json!({ "id": id, "name": "n" }),
            json!({ "id": "fine", "name": "n", "members": [id] }),
        ] {
            let (status, resp) = c
                .api(
                    0,
                    &caller,
                    Method::POST,
                    "/api/channels",
                    Some(body.clone()),
                )
                .await;
            assert_eq!(
                (status, error_code(&resp)),
                (400, "invalid_payload"),
                "{body}"
            );
        }
        let (status, resp) = c
            .api(
                0,
                &caller,
                Method::POST,
                "/api/channels/real/members",
                Some(json!({ "userId": id })),
            )
            .await;
        assert_eq!(
            (status, error_code(&resp)),
            (400, "invalid_payload"),
            "{id:?}"
        );
        // In a path the id arrives percent-encoded; it must be refused
        // (400) or match no route (404), never served.
        let enc = percent(&id);
        for (method, path) in [
            (Method::GET, format!("/api/channels/{enc}/messages")),
            (Method::GET, format!("/api/conversations/{enc}/messages")),
            (Method::POST, format!("/api/channels/{enc}/members")),
            (Method::DELETE, format!("/api/channels/real/members/{enc}")),
        ] {
            let body = (method == Method::POST).then(|| json!({ "userId": "bob" }));
            let (status, resp) = c.api(0, &caller, method.clone(), &path, body).await;
            assert!(
                status == 400 || status == 404,
                "{method} {path}: {status} {resp}"
            );
        }
        // A token whose subject is the hostile id is no token at all.
        let token = c.tokens.mint(&id, 600).expect("mint");
        let refused = Client::connect(&c.urls[0], json!({ "token": token })).await;
        assert!(
            matches!(&refused, Err(ClientError::Refused(m)) if m == "unauthorized"),
            "{id:?}: {refused:?}"
        );
    }
    assert_eq!(c.store.count_messages().await.expect("count"), 0);
    assert!(c.store.channel("fine").await.expect("store").is_none());
    assert_eq!(metric(&c.urls[0], "fanout_bound_keys").await, bound_before);
    quiet_chat(&alice, "nothing delivered").await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_dead_letters_hostile_ids_that_bypassed_the_gateway() {
    let _t = TIMING.read().await;
    // Defence in depth: an incoming event published by something other
    // than a gateway (or a gateway with a bug) is re-validated by the
    // worker before any id reaches SQL or a route key.
    let c = Cluster::start(1, 1).await;
    let bob = c.connect(0, "bob").await;
    let forged = [
        ("a:b", Target::User("bob".into())),
        ("alice", Target::User("bob:x".into())),
        ("alice", Target::User("*".into())),
        ("alice", Target::Channel("{x}".into())),
        ("alice", Target::Channel("channel:bob".into())),
        ("", Target::User("bob".into())),
    ];
    for (sender, target) in &forged {
        publish_as_gateway(&c.backend, sender, target.clone(), "forged").await;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let dead = c.backend.dead_letters(100).await.expect("dead letters");
        if dead.len() == forged.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} dead-lettered",
            dead.len(),
            forged.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.store.count_messages().await.expect("count"), 0);
    quiet(&bob, "nothing forged is delivered").await;
    c.stop().await;
}

/// Publishes a message on the incoming side as a gateway would; returns its id.
async fn publish_as_gateway(
    backend: &DynBackend,
    sender: &str,
    target: Target,
    content: &str,
) -> String {
    let message = Message {
        id: uuid::Uuid::now_v7().to_string(),
        sender_id: sender.to_owned(),
        target,
        content: content.to_owned(),
        client_msg_id: None,
        created_at: fanout::protocol::now_ms(),
    };
    let payload = serde_json::to_vec(&IncomingEnvelope {
        v: 1,
        message: message.clone(),
    })
    .expect("encode");
    backend
        .publish_incoming(IncomingEvent {
            id: message.id.clone(),
            ordering_key: message.ordering_key(),
            payload: payload.into(),
        })
        .await
        .expect("publish");
    message.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_created_with_too_many_members_is_refused_whole() {
    let _t = TIMING.read().await;
    let node = Node::start(|c| c.limits.max_initial_members = 2).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/api/channels", node.url))
        .bearer_auth(node.token("owner"))
        .json(&json!({ "id": "crowd", "name": "Crowd", "members": ["a", "b", "c"] }))
        .send()
        .await
        .expect("http");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("json");
    assert_eq!((status, error_code(&body)), (413, "too_large"), "{body}");
    assert!(node.store.channel("crowd").await.expect("store").is_none());
    node.stop().await;
}

/// Percent-encodes every byte outside `[A-Za-z0-9_-]`, so the id reaches
/// the server as one path segment.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------
// Limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_connections_share_one_send_rate() {
    let _t = TIMING.read().await;
    let node = Node::start(|c| {
        c.limits.messages_per_second = 1000;
        c.limits.message_burst = 1000;
        c.limits.user_messages_per_second = Some(1);
        c.limits.user_message_burst = Some(10);
    })
    .await;
    let tabs = [
        node.connect("spammer").await.expect("tab"),
        node.connect("spammer").await.expect("tab"),
        node.connect("spammer").await.expect("tab"),
    ];
    let other = node.connect("other").await.expect("other");
    let started = Instant::now();
    let mut acks = Vec::new();
    for (t, tab) in tabs.iter().enumerate() {
        for i in 0..10 {
            let payload = json!({ "to": "other", "content": format!("{t}-{i}") });
            acks.push(tab.emit_with_ack("sendMessage", &payload).expect("emit"));
        }
    }
    let (mut ok, mut limited) = (0, 0);
    for a in acks {
        let ack = tokio::time::timeout(WAIT, a)
            .await
            .expect("in time")
            .expect("ack");
        if ack["ok"] == json!(true) {
            ok += 1;
        } else {
            assert_eq!(error_code(&ack), "rate_limited", "{ack}");
            limited += 1;
        }
    }
    // The burst of 10, plus at most what 1/s refills meanwhile.
    let refill = started.elapsed().as_secs() as usize + 1;
    assert!(ok >= 10 && ok <= 10 + refill, "accepted {ok}");
    assert_eq!(ok + limited, 30);
    // Another user is not affected.
    let ack = other
        .call(
            "sendMessage",
            &json!({ "to": "spammer", "content": "fine" }),
            WAIT,
        )
        .await
        .expect("ack");
    assert_eq!(ack["ok"], json!(true), "{ack}");
    let user_limited = metric(&node.url, "fanout_rate_limited_total{scope=\"user\"}").await;
    assert!(user_limited >= 1.0, "counted: {user_limited}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_user_limit_are_refused() {
    let _t = TIMING.read().await;
    let node = Node::start(|c| c.limits.max_connections_per_user = 2).await;
    let first = node.connect("tabby").await.expect("first");
    let _second = node.connect("tabby").await.expect("second");
    let third = node.connect("tabby").await;
    assert!(
        matches!(&third, Err(ClientError::Refused(m)) if m == "too_many_connections"),
        "{third:?}"
    );
    // A bad token is still `unauthorized`, even for a user at the limit.
    let forged = Tokens::new(b"some-other-secret-entirely")
        .mint("tabby", 600)
        .expect("mint");
    let bad = Client::connect(&node.url, json!({ "token": forged })).await;
    assert!(
        matches!(&bad, Err(ClientError::Refused(m)) if m == "unauthorized"),
        "{bad:?}"
    );
    // Other users are not affected.
    node.connect("someone-else").await.expect("another user");
    let refused = metric(
        &node.url,
        "fanout_connects_refused_by_reason_total{reason=\"too_many_connections\"}",
    )
    .await;
    assert_eq!(refused, 1.0);
    // Closing a tab makes room again.
    first.close().await;
    wait_metric(&node.url, "fanout_sessions", |v| v <= 2.0).await;
    node.connect("tabby")
        .await
        .expect("room again after a close");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_beyond_the_per_user_rate_get_429() {
    let _t = TIMING.read().await;
    let node = Node::start(|c| {
        c.limits.api_requests_per_second = 1;
        c.limits.api_burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, body) = node.get("reader", "/api/conversations/x/messages").await;
        if status == 429 {
            assert_eq!(error_code(&body), "rate_limited", "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let (status, _) = node
        .get("another-reader", "/api/conversations/x/messages")
        .await;
    assert_eq!(status, 200, "another user is not affected");
    node.stop().await;
}

impl Node {
    async fn send(
        &self,
        user: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        api_call(&self.url, &self.token(user), method, path, body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_beyond_the_per_user_rate_get_429() {
    let _t = TIMING.read().await;
    let node = Node::start(|c| {
        c.limits.max_initial_members = 3;
        c.limits.membership_burst = 6;
        c.limits.membership_changes_per_second = 1;
    })
    .await;
    let create = |id: &str, members: &[&str]| json!({ "id": id, "name": id, "members": members });
    // Four changes: the creator and three members.
    let (status, body) = node
        .send(
            "owner",
            Method::POST,
            "/api/channels",
            Some(create("a", &["m1", "m2", "m3"])),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Two left in the bucket: a creation of four more is refused whole (the
    // creator's own change, taken before the body is read, is spent).
    let (status, body) = node
        .send(
            "owner",
            Method::POST,
            "/api/channels",
            Some(create("b", &["m1", "m2", "m3"])),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&body), "rate_limited", "{body}");
    let (status, _) = node.get("m1", "/api/channels/b/messages").await;
    assert_eq!(status, 404, "nothing of the refused creation was written");
    // The last change fits; the one after it does not.
    let add = |u: &str| Some(json!({ "userId": u }));
    let (status, body) = node
        .send("owner", Method::POST, "/api/channels/a/members", add("m4"))
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = node
        .send("owner", Method::DELETE, "/api/channels/a/members/m4", None)
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&body), "rate_limited", "{body}");
    // Another user is not affected, and the bucket refills.
    let (status, body) = node
        .send(
            "other",
            Method::POST,
            "/api/channels",
            Some(create("c", &["m1"])),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = node
        .send("owner", Method::DELETE, "/api/channels/a/members/m4", None)
        .await;
    assert_eq!(status, 204, "a second later: {body}");
    let limited = metric(&node.url, "fanout_rate_limited_total{scope=\"membership\"}").await;
    assert_eq!(limited, 2.0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_per_user_rate_are_refused() {
    let _t = TIMING.read().await;
    let node = Node::start(|c| {
        c.limits.handshakes_per_second = 1;
        c.limits.handshake_burst = 2;
    })
    .await;
    let first = node.connect("churner").await.expect("first");
    first.close().await;
    let _second = node.connect("churner").await.expect("second");
    let third = node.connect("churner").await;
    assert!(
        matches!(&third, Err(ClientError::Refused(m)) if m == "rate_limited"),
        "{third:?}"
    );
    // Refused before any query or bind: the user's key holds one session.
    assert_eq!(
        metric(
            &node.url,
            "fanout_connects_refused_by_reason_total{reason=\"rate_limited\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&node.url, "fanout_rate_limited_total{scope=\"handshake\"}").await,
        1.0
    );
    node.connect("someone-else").await.expect("another user");
    // A reconnecting client gets in after a pause.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    node.connect("churner").await.expect("a second later");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_asks_the_database_at_most_once_a_second() {
    let _t = TIMING.read().await;
    let node = Node::start(|_| {}).await;
    let started = Instant::now();
    let http = reqwest::Client::new();
    let answers = futures::future::join_all((0..200).map(|_| {
        let http = http.clone();
        let url = format!("{}/readyz", node.url);
        async move {
            http.get(url)
                .send()
                .await
                .expect("readyz")
                .status()
                .as_u16()
        }
    }))
    .await;
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    let probes = metric(&node.url, "fanout_readiness_probes_total").await;
    let bound = started.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(
        probes >= 1.0 && probes <= bound,
        "{probes} probes for 200 requests in {:?}",
        started.elapsed()
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_over_max_payload_closes_the_connection() {
    let _t = TIMING.read().await;
    let node = Node::start(|_| {}).await;
    let big = node.connect("big").await.expect("connect");
    // 100 KB of content in one WebSocket message, over the 64 KiB limit.
    let payload = json!({ "to": "big", "content": "x".repeat(100_000) });
    let mut ack = big.emit_with_ack("sendMessage", &payload).expect("emit");
    // The client's event stream ends when the server closes the socket.
    let closed = big.next_event(WAIT).await;
    assert!(matches!(closed, Err(ClientError::Closed)), "{closed:?}");
    assert!(ack.try_recv().is_err(), "no ack for an oversized message");
    // Under the limit, a too-long content is answered, not a close.
    let fine = node.connect("fine").await.expect("connect");
    let payload = json!({ "to": "fine", "content": "x".repeat(5000) });
    let ack = fine.call("sendMessage", &payload, WAIT).await.expect("ack");
    assert_eq!(error_code(&ack), "too_large");
    assert_eq!(node.store.count_messages().await.expect("count"), 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_attachments_beyond_max_payload_close_the_connection() {
    let _t = TIMING.read().await;
    let node = Node::start(|_| {}).await;
    let mut ws = raw_session(&node.url, &node.token("binary"), None).await;
    // An event announcing two attachments, then 80 KB of them in total:
    // each frame is under the 64 KiB payload limit, their sum is not.
    let header =
        r#"452-1["sendMessage",[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]]"#;
    ws.send(WsMessage::text(header)).await.expect("header");
    for _ in 0..2 {
        if ws.send(WsMessage::binary(vec![7u8; 40_000])).await.is_err() {
            break;
        }
    }
    let mut answered = None;
    while let Some(t) = next_text(&mut ws).await {
        if t.starts_with("43") {
            answered = Some(t);
            break;
        }
    }
    assert_eq!(answered, None, "closed, not answered");
    assert_eq!(node.store.count_messages().await.expect("count"), 0);
    node.stop().await;
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A Socket.IO session over a bare WebSocket, which reads only when told
/// to; with `rcvbuf`, over a socket with that small a receive buffer, so
/// that the server's writes back up quickly.
async fn raw_session(url: &str, token: &str, rcvbuf: Option<u32>) -> Ws {
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().expect("address");
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).expect("rcvbuf");
    }
    let stream = socket.connect(addr).await.expect("connect");
    let ws_url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(ws_url, MaybeTlsStream::Plain(stream))
        .await
        .expect("websocket");
    let open = next_text(&mut ws).await.expect("open packet");
    assert!(open.starts_with('0'), "{open}");
    ws.send(WsMessage::text(format!("40{}", json!({ "token": token }))))
        .await
        .expect("send connect");
    loop {
        let t = next_text(&mut ws).await.expect("connect packet");
        if t.starts_with("40") {
            return ws;
        }
        // Engine.IO pings at once on open.
        assert_eq!(t, "2", "expected connect");
        ws.send(WsMessage::text("3")).await.expect("pong");
    }
}

async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) => return Some(t.to_string()),
            Ok(Some(Ok(WsMessage::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => {
                return None
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_gets_a_gap_free_prefix_then_a_disconnect() {
    let _t = TIMING.read().await;
    // Small kernel buffers on the server side too, so a few hundred KB
    // back the socket up (sockets accepted from this listener inherit it).
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_send_buffer_size(8192).expect("sndbuf");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(128).expect("listen");
    let node = Node::start_on(listener, |c| c.limits.send_buffer = 16).await;
    let mut slow = raw_session(&node.url, &node.token("slowpoke"), Some(4096)).await;
    // Sent through the incoming side as a gateway would, from a sender with
    // no session here: only the slow client's socket backs up. Enough to
    // fill the kernel buffers (tens of KB) and the 16 packets.
    const N: usize = 200;
    let mut sent = Vec::new();
    for _ in 0..N {
        let content = "s".repeat(3000);
        let target = Target::User("slowpoke".into());
        sent.push(publish_as_gateway(&node.backend, "sender", target, &content).await);
    }
    let cut = wait_metric(&node.url, "fanout_slow_client_disconnects_total", |v| {
        v >= 1.0
    })
    .await;
    assert_eq!(cut, 1.0, "the slow session is cut off once");
    assert!(metric(&node.url, "fanout_slow_client_drops_total").await >= 1.0);

    // Now read: a prefix of what was sent, in order, then the disconnect.
    let mut got = Vec::new();
    let mut disconnected = false;
    while let Some(t) = next_text(&mut slow).await {
        if let Some(rest) = t.strip_prefix("42") {
            let v: Value = serde_json::from_str(rest).expect("event");
            got.push(v[1]["id"].as_str().expect("id").to_owned());
        } else if t.starts_with("41") {
            disconnected = true;
            break;
        }
    }
    assert!(disconnected, "the server disconnected the slow client");
    eprintln!(
        "slow client: received {} of {N} before the disconnect",
        got.len()
    );
    assert!(!got.is_empty() && got.len() < N, "received {}", got.len());
    assert_eq!(got, sent[..got.len()], "a gap-free prefix, in order");
    let left = wait_metric(&node.url, "fanout_sessions", |v| v == 0.0).await;
    assert_eq!(left, 0.0, "the slow session ended");
    // Everything is in the store, for the reconnect's history read.
    let deadline = Instant::now() + WAIT;
    while node.store.count_messages().await.expect("count") < N as i64 {
        assert!(Instant::now() < deadline, "all {N} messages stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.connect("slowpoke").await.expect("reconnect");
    node.stop().await;
}

// ---------------------------------------------------------------------
// A flood does not slow the others down.

struct Flood {
    emitted: usize,
    ok: usize,
    limited: usize,
    took: Duration,
}

/// Writes pre-encoded `sendMessage` frames as fast as the socket takes them
/// for `run`, and counts the acks. Frames are written bare (no client
/// library in the way), so the flood is limited by the gateway, not by
/// the test's own encoding.
async fn flood(ws: Ws, run: Duration) -> Flood {
    let (mut sink, mut stream) = ws.split();
    let reader = tokio::spawn(async move {
        let (mut ok, mut limited) = (0, 0);
        // Acks stop coming a moment after the flood stops.
        while let Ok(Some(Ok(frame))) =
            tokio::time::timeout(Duration::from_secs(2), stream.next()).await
        {
            let WsMessage::Text(t) = frame else { continue };
            if !t.starts_with("43") {
                continue;
            }
            if t.contains("\"ok\":true") {
                ok += 1;
            } else if t.contains("rate_limited") {
                limited += 1;
            }
        }
        (ok, limited)
    });
    let started = Instant::now();
    let mut emitted = 0;
    'flood: while started.elapsed() < run {
        for _ in 0..20 {
            let frame =
                format!("42{emitted}[\"sendMessage\",{{\"to\":\"target\",\"content\":\"flood\"}}]");
            if sink.feed(WsMessage::text(frame)).await.is_err() {
                break 'flood;
            }
            emitted += 1;
        }
        if sink.flush().await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    let (ok, limited) = reader.await.unwrap_or((0, 0));
    Flood {
        emitted,
        ok,
        limited,
        took,
    }
}

/// The stated bound (docs/security.md): with one client flooding at over
/// 100 times its rate, the p99 delivery latency of everyone else on the
/// same gateway stays under this, on the in-process memory cluster in a
/// debug build on a small shared machine (measured: 16–43 ms, so a bound
/// that does not flake when the machine is busy)...
const FLOOD_P99_BOUND: Duration = Duration::from_millis(250);
/// ... or within this many times the same chat's p99 without the flood,
/// measured just before: on a machine so loaded that the quiet chat is
/// already slow (seen: p50 94 ms while other test suites ran), the flood's
/// effect is what the check is about, not the machine's.
const FLOOD_P99_FACTOR: u32 = 3;

/// Delivery latencies of `PAIRS` pairs chatting every 50 ms for `run`:
/// every acked message is read at its receiver.
async fn chat_latencies(senders: &[Client], receivers: &[Client], run: Duration) -> Vec<Duration> {
    const EVERY: Duration = Duration::from_millis(50);
    let chat = senders.iter().enumerate().map(|(p, s)| async move {
        let mut sent = HashMap::new();
        let mut tick = tokio::time::interval(EVERY);
        let started = Instant::now();
        let mut i = 0;
        while started.elapsed() < run {
            tick.tick().await;
            let content = format!("{p}-{i}-{}", started.elapsed().as_nanos());
            let payload = json!({ "to": format!("r{p}"), "content": content });
            sent.insert(content, Instant::now());
            let ack = s.call("sendMessage", &payload, WAIT).await.expect("ack");
            assert_eq!(
                ack["ok"],
                json!(true),
                "a modest sender is never refused: {ack}"
            );
            i += 1;
        }
        sent
    });
    let sent_by_pair = futures::future::join_all(chat).await;
    let mut latencies = Vec::new();
    for (sent, r) in sent_by_pair.iter().zip(receivers) {
        // Every acked message reaches its receiver: read exactly that many.
        for _ in 0..sent.len() {
            let e = r
                .next_event(WAIT)
                .await
                .expect("every chat message delivered");
            let content = e.data["content"].as_str().unwrap_or_default();
            let at = sent.get(content).expect("a message of this pair");
            latencies.push(e.at.saturating_duration_since(*at));
        }
    }
    latencies.sort();
    latencies
}

/// The `q` quantile of sorted latencies.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_client_does_not_raise_the_p99_of_others() {
    let _t = TIMING.write().await;
    let node = Node::start(|_| {}).await; // default limits: 50/s, burst 100
    const PAIRS: usize = 8;
    const RUN: Duration = Duration::from_secs(3);
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for p in 0..PAIRS {
        senders.push(node.connect(&format!("s{p}")).await.expect("sender"));
        receivers.push(node.connect(&format!("r{p}")).await.expect("receiver"));
    }
    let quiet = chat_latencies(&senders, &receivers, RUN).await;
    let flooder = raw_session(&node.url, &node.token("flooder"), None).await;
    let _target = node.connect("target").await.expect("target");
    let flood = tokio::spawn(flood(flooder, RUN));
    let latencies = chat_latencies(&senders, &receivers, RUN).await;
    let Flood {
        emitted,
        ok,
        limited,
        took,
    } = flood.await.expect("flood task");
    let other = emitted - ok - limited;
    let p = |q: f64| quantile(&latencies, q);
    eprintln!(
        "flood: {emitted} emitted in {took:?} ({ok} ok, {limited} rate_limited, {other} other); \
         others: {} messages, p50 {:?}, p99 {:?}, max {:?}; without the flood: p50 {:?}, p99 {:?}",
        latencies.len(),
        p(0.50),
        p(0.99),
        p(1.0),
        quantile(&quiet, 0.50),
        quantile(&quiet, 0.99)
    );
    assert!(limited > emitted / 2, "the flooder is mostly refused");
    // The burst of 100 plus 50/s while it ran, with a second of slack.
    assert!(
        ok <= 100 + 50 * (took.as_secs() as usize + 1),
        "accepted {ok}"
    );
    let bound = FLOOD_P99_BOUND.max(quantile(&quiet, 0.99) * FLOOD_P99_FACTOR);
    assert!(
        p(0.99) < bound,
        "p99 {:?} over the bound {bound:?} ({FLOOD_P99_BOUND:?}, or {FLOOD_P99_FACTOR}× the p99 without the flood)",
        p(0.99)
    );
    node.stop().await;
}
