//! Gateway behaviour across several in-process gateways linked by the
//! memory backend, driven by the Rust Socket.IO client.

mod common;

use bytes::Bytes;
use common::cluster::{next, next_chat, quiet, send_ok, Cluster, WAIT};
use fanout::protocol::{Message, OutgoingEnvelope, Target};
use fanout::stream::{Body, Entry, Stream};
use fanout_backend::{RouteKey, RouteOutcome};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_messages_cross_gateways_and_reach_every_session() {
    let c = Cluster::start(3, 2).await;
    let alice_a = c.connect(0, "alice").await;
    let alice_b = c.connect(2, "alice").await;
    let bob = c.connect(1, "bob").await;
    let id = send_ok(&alice_a, json!({ "to": "bob", "content": "hi bob" })).await;
    for s in [&bob, &alice_a, &alice_b] {
        let (name, data) = next(s).await;
        assert_eq!(name, "MESSAGE_RECEIVE");
        assert_eq!(data["id"], json!(id));
        assert_eq!(data["senderId"], json!("alice"));
        assert_eq!(data["receiverId"], json!("bob"));
        assert!(data.get("clientMsgId").is_none());
    }
    for s in [&bob, &alice_a, &alice_b] {
        quiet(s, "one delivery per session").await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_one_tab_keeps_the_other_and_the_last_close_removes_the_route() {
    let c = Cluster::start(2, 1).await;
    let tab1 = c.connect(0, "carol").await;
    let tab2 = c.connect(0, "carol").await;
    let dave = c.connect(1, "dave").await;
    tab1.close().await;
    c.wait_sessions(0, 1).await;
    let id = send_ok(&dave, json!({ "to": "carol", "content": "still there?" })).await;
    assert_eq!(next(&tab2).await.1["id"], json!(id));
    tab2.close().await;
    // The route goes with the last session.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = c
            .backend
            .publish_outgoing(
                &RouteKey::user("carol").expect("valid"),
                Bytes::from_static(b"{}"),
            )
            .await
            .expect("publish");
        if out == RouteOutcome::Unroutable {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "carol's route outlived her sessions"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_pipelined_messages_arrive_in_order_with_two_workers() {
    let c = Cluster::start(3, 2).await;
    let erin = c.connect(0, "erin").await;
    let frank = c.connect(1, "frank").await;
    c.create_channel(
        2,
        "erin",
        json!({ "id": "ordered", "name": "O", "members": ["frank"] }),
    )
    .await;
    // Not awaiting acks between sends: the gateway must keep emission order.
    let mut acks = Vec::new();
    for i in 0..200 {
        acks.push(
            erin.emit_with_ack(
                "sendMessage",
                &json!({ "to": "frank", "content": format!("p{i}") }),
            )
            .expect("emit"),
        );
        acks.push(
            erin.emit_with_ack(
                "sendMessage",
                &json!({ "channelId": "ordered", "content": format!("g{i}") }),
            )
            .expect("emit"),
        );
    }
    for a in acks {
        let v = tokio::time::timeout(WAIT, a)
            .await
            .expect("ack in time")
            .expect("ack");
        assert_eq!(v["ok"], json!(true), "{v}");
    }
    let (mut personal, mut group) = (Vec::new(), Vec::new());
    while personal.len() < 200 || group.len() < 200 {
        let (name, data) = next_chat(&frank).await;
        let content = data["content"].as_str().expect("content").to_owned();
        if name == "MESSAGE_RECEIVE" {
            personal.push(content)
        } else {
            group.push(content)
        }
    }
    assert_eq!(
        personal,
        (0..200).map(|i| format!("p{i}")).collect::<Vec<_>>()
    );
    assert_eq!(group, (0..200).map(|i| format!("g{i}")).collect::<Vec<_>>());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_on_another_gateway_gets_every_message_after_the_204() {
    let c = Cluster::start(3, 2).await;
    let owner = c.connect(0, "owner").await;
    c.create_channel(0, "owner", json!({ "id": "live", "name": "Live" }))
        .await;
    // Repeated, to give the bind/publish race many chances to show.
    for round in 0..10 {
        let user = format!("joiner{round}");
        let joiner = c.connect(2, &user).await;
        let (status, body) = c
            .api(
                1,
                "owner",
                Method::POST,
                "/api/channels/live/members",
                Some(json!({ "userId": user })),
            )
            .await;
        assert_eq!(status, 204, "{body}");
        let id = send_ok(
            &owner,
            json!({ "channelId": "live", "content": format!("round {round}") }),
        )
        .await;
        let (name, data) = next_chat(&joiner).await;
        assert_eq!(
            (name.as_str(), &data["id"]),
            ("GROUP_MESSAGE_RECEIVE", &json!(id)),
            "round {round}"
        );
        quiet(&joiner, "exactly once").await;
        // Drain the owner's own copy.
        assert_eq!(next_chat(&owner).await.1["id"], json!(id));
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_gets_nothing_sent_after_the_204() {
    let c = Cluster::start(2, 2).await;
    let owner = c.connect(0, "boss").await;
    let gone = c.connect(1, "leaver").await;
    c.create_channel(
        0,
        "boss",
        json!({ "id": "club", "name": "Club", "members": ["leaver"] }),
    )
    .await;
    let before = send_ok(&owner, json!({ "channelId": "club", "content": "before" })).await;
    assert_eq!(next_chat(&gone).await.1["id"], json!(before));
    let (status, _) = c
        .api(
            1,
            "boss",
            Method::DELETE,
            "/api/channels/club/members/leaver",
            None,
        )
        .await;
    assert_eq!(status, 204);
    send_ok(&owner, json!({ "channelId": "club", "content": "after" })).await;
    // A sentinel on the same path proves the group message had its chance.
    let sentinel = send_ok(&owner, json!({ "to": "leaver", "content": "sentinel" })).await;
    // Its own removal, on the channel's stream (the last entry of it) and
    // on its inbox, then the sentinel; nothing of the channel after.
    let mut removals = Vec::new();
    let (name, data) = loop {
        let (name, data) = next(&gone).await;
        if name != "MEMBERSHIP_CHANGE" {
            break (name, data);
        }
        assert_eq!(data["change"], json!("removed"), "{data}");
        removals.push(data["stream"].as_str().unwrap_or_default().to_owned());
    };
    removals.sort();
    assert_eq!(removals, ["channel:club", "inbox"]);
    assert_eq!(
        (name.as_str(), &data["id"]),
        ("MESSAGE_RECEIVE", &json!(sentinel)),
        "the removed member got {data}"
    );
    let (status, _) = c.get(1, "leaver", "/api/channels/club/messages").await;
    assert_eq!(status, 403);
    let no = owner
        .call(
            "sendMessage",
            &json!({ "channelId": "nope", "content": "x" }),
            WAIT,
        )
        .await
        .expect("ack");
    assert_eq!(no["error"]["code"], json!("not_member"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_is_shown_once_per_session() {
    let c = Cluster::start(1, 1).await;
    let s = c.connect(0, "gina").await;
    let m = Message {
        id: uuid::Uuid::now_v7().to_string(),
        sender_id: "hank".into(),
        target: Target::User("gina".into()),
        content: "twice".into(),
        client_msg_id: Some("k".into()),
        created_at: 1,
    };
    // Position 1 of gina's inbox (empty when she connected), published
    // twice as an at-least-once broker may.
    let payload = serde_json::to_vec(&OutgoingEnvelope::Entry(Entry {
        stream: Stream::Inbox("gina".into()),
        seq: 1,
        body: Body::Message(m.clone()),
    }))
    .expect("encode");
    for _ in 0..2 {
        c.backend
            .publish_outgoing(
                &RouteKey::user("gina").expect("valid"),
                Bytes::from(payload.clone()),
            )
            .await
            .expect("publish");
    }
    let (_, data) = next(&s).await;
    assert_eq!(data["id"], json!(m.id));
    assert_eq!(data["clientMsgId"], json!("k"));
    assert_eq!(data["seq"], json!(1));
    assert_eq!(data["stream"], json!("inbox"));
    quiet(&s, "the duplicate must be dropped").await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_stored_and_delivered_once_with_the_first_id() {
    let c = Cluster::start(2, 2).await;
    let ivan = c.connect(0, "ivan").await;
    let judy = c.connect(1, "judy").await;
    let first = send_ok(
        &ivan,
        json!({ "to": "judy", "content": "once", "clientMsgId": "r-1" }),
    )
    .await;
    let again = send_ok(
        &ivan,
        json!({ "to": "judy", "content": "once", "clientMsgId": "r-1" }),
    )
    .await;
    assert_eq!(first, again);
    // From another gateway, where the first ack is unknown: stored once,
    // delivered with the first id, shown once.
    let ivan2 = c.connect(1, "ivan").await;
    send_ok(
        &ivan2,
        json!({ "to": "judy", "content": "once", "clientMsgId": "r-1" }),
    )
    .await;
    assert_eq!(next(&judy).await.1["id"], json!(first));
    quiet(&judy, "a retry must not show twice").await;
    assert_eq!(c.store.count_messages().await.expect("count"), 1);
    c.stop().await;
}

/// One Redis command over a plain connection (the root crate has no Redis
/// client); enough RESP for a bulk string or an integer reply.
async fn redis_command(args: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect("127.0.0.1:6379")
        .await
        .expect("redis");
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 65536];
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "redis closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(rest) = text.strip_prefix('$') {
            let (len, body) = rest.split_once("\r\n").expect("bulk header");
            let len: usize = len.parse().expect("bulk length");
            if body.len() >= len {
                return body[..len].to_owned();
            }
        } else if text.ends_with("\r\n") {
            return text.trim_end().to_owned();
        }
    }
}

/// A join notice swallowed by a route loss (here: the membership written
/// without one) is applied when the gateway recovers from the loss: the
/// store says what each local user belongs to, and the session receives
/// the channel from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_swallowed_by_a_route_loss_is_applied_after_it() {
    let Some(c) = Cluster::start_broker(fanout::config::BackendKind::Redis, 1, 1).await else {
        return;
    };
    let owner = c.connect(0, "owner").await;
    let alice = c.connect(0, "alice").await;
    c.create_channel(0, "owner", json!({ "id": "late", "name": "Late" }))
        .await;
    c.store
        .add_member("late", "alice", "owner", fanout::protocol::now_ms())
        .await
        .expect("store");
    // The gateway loses its routes: Redis drops its subscriber connection.
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", c.urls[0]))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    let server = ready["serverId"].as_str().expect("server id");
    let name = format!("name={}:sub:{server}", c.config.namespace);
    let list = redis_command(&["CLIENT", "LIST"]).await;
    let id = list
        .lines()
        .find(|l| l.split_whitespace().any(|f| f == name))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .expect("the gateway's subscriber connection")
        .to_owned();
    assert_eq!(redis_command(&["CLIENT", "KILL", "ID", &id]).await, ":1");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = reqwest::get(format!("{}/metrics", c.urls[0]))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        if text.lines().any(|l| l == "fanout_routes_lost_total 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no route loss seen");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let id = send_ok(
        &owner,
        json!({ "channelId": "late", "content": "after the loss" }),
    )
    .await;
    let (name, data) = next_chat(&alice).await;
    assert_eq!(
        (name.as_str(), &data["id"]),
        ("GROUP_MESSAGE_RECEIVE", &json!(id))
    );
    c.stop().await;
}

/// Golden: every refusal of an invalid send, exactly as the client reads
/// it in its ack (code and text), including which rule wins when a send
/// breaks several (the first in `docs/protocol.md`'s table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_sends_are_refused_with_their_exact_code_and_message() {
    let c = Cluster::start(1, 1).await;
    let alice = c.connect(0, "alice").await;
    let max = c.config.limits.max_content_bytes;
    let too_long = "x".repeat(max + 1);
    let not_object = "payload must be an object with `to` or `channelId`, and `content`";
    let bad_to = "`to` must be 1 to 64 characters of [A-Za-z0-9_-]";
    let bad_channel = "`channelId` must be 1 to 64 characters of [A-Za-z0-9_-]";
    let both = "give exactly one of `to` and `channelId`, not both";
    let neither = "give exactly one of `to` and `channelId`";
    let required = "`content` is required";
    let not_string = "`content` must be a string";
    let empty = "`content` must not be empty";
    let too_large = format!(
        "`content` is {} bytes of UTF-8; the limit is {max}",
        max + 1
    );
    let nul = "`content` must not contain U+0000";
    let bad_cid = "`clientMsgId` must be 1 to 64 characters of [A-Za-z0-9_.:-]";
    let cases: Vec<(serde_json::Value, &str, String)> = vec![
        (json!("hi"), "invalid_payload", not_object.into()),
        (json!(null), "invalid_payload", not_object.into()),
        (json!([1, 2]), "invalid_payload", not_object.into()),
        (
            json!({"to": "a:b", "content": "hi"}),
            "invalid_payload",
            bad_to.into(),
        ),
        (
            json!({"to": 5, "content": "hi"}),
            "invalid_payload",
            bad_to.into(),
        ),
        (
            json!({"to": "", "content": "hi"}),
            "invalid_payload",
            bad_to.into(),
        ),
        (
            json!({"to": "x".repeat(65), "content": "hi"}),
            "invalid_payload",
            bad_to.into(),
        ),
        (
            json!({"channelId": "c d", "content": "hi"}),
            "invalid_payload",
            bad_channel.into(),
        ),
        (
            json!({"to": "a:b", "channelId": "c", "content": "hi"}),
            "invalid_payload",
            bad_to.into(),
        ),
        (
            json!({"to": "bob", "channelId": "c:d", "content": "hi"}),
            "invalid_payload",
            bad_channel.into(),
        ),
        (
            json!({"to": "bob", "channelId": "c", "content": "hi"}),
            "invalid_payload",
            both.into(),
        ),
        (json!({"content": "hi"}), "invalid_payload", neither.into()),
        (
            json!({"to": null, "channelId": null, "content": "hi"}),
            "invalid_payload",
            neither.into(),
        ),
        (json!({"content": 3}), "invalid_payload", neither.into()),
        (json!({"to": "bob"}), "invalid_payload", required.into()),
        (
            json!({"to": "bob", "content": null}),
            "invalid_payload",
            required.into(),
        ),
        (
            json!({"to": "bob", "content": 3}),
            "invalid_payload",
            not_string.into(),
        ),
        (
            json!({"to": "bob", "content": ["hi"]}),
            "invalid_payload",
            not_string.into(),
        ),
        (
            json!({"to": "bob", "content": ""}),
            "invalid_payload",
            empty.into(),
        ),
        (
            json!({"to": "bob", "content": "", "clientMsgId": "a b"}),
            "invalid_payload",
            empty.into(),
        ),
        (
            json!({"to": "bob", "content": too_long}),
            "too_large",
            too_large.clone(),
        ),
        (
            json!({"to": "bob", "content": format!("{too_long}\u{0}")}),
            "too_large",
            format!(
                "`content` is {} bytes of UTF-8; the limit is {max}",
                max + 2
            ),
        ),
        (
            json!({"to": "bob", "content": "a\u{0}b"}),
            "invalid_payload",
            nul.into(),
        ),
        (
            json!({"to": "bob", "content": "a\u{0}b", "clientMsgId": "a b"}),
            "invalid_payload",
            nul.into(),
        ),
        (
            json!({"to": "bob", "content": "hi", "clientMsgId": "a b"}),
            "invalid_payload",
            bad_cid.into(),
        ),
        (
            json!({"to": "bob", "content": "hi", "clientMsgId": ""}),
            "invalid_payload",
            bad_cid.into(),
        ),
        (
            json!({"to": "bob", "content": "hi", "clientMsgId": 7}),
            "invalid_payload",
            bad_cid.into(),
        ),
        (
            json!({"to": "bob", "content": "hi", "clientMsgId": "x".repeat(65)}),
            "invalid_payload",
            bad_cid.into(),
        ),
        (
            json!({"channelId": "nowhere", "content": "hi"}),
            "not_member",
            "you are not a member of channel nowhere".into(),
        ),
    ];
    for (payload, code, message) in cases {
        let ack = alice
            .call("sendMessage", &payload, WAIT)
            .await
            .expect("ack");
        assert_eq!(
            ack,
            json!({ "ok": false, "error": { "code": code, "message": message } }),
            "{payload}"
        );
    }
    quiet(&alice, "a refused send delivers nothing").await;
    alice.close().await;
    c.stop().await;
}
