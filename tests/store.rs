//! The store's behaviour, run on SQLite and on the real PostgreSQL.

mod common;

use std::time::Duration;

use fanout::protocol::{Message, Target};
use fanout::store::{Outcome, Store, StoreError};

fn msg(id: &str, sender: &str, target: Target, cid: Option<&str>, at: i64) -> Message {
    Message {
        id: id.to_owned(),
        sender_id: sender.to_owned(),
        target,
        content: format!("content of {id}"),
        client_msg_id: cid.map(str::to_owned),
        created_at: at,
    }
}

fn uuid_at(n: u64) -> String {
    // Time-ordered like UUIDv7: the order of n is the order of the text.
    format!("01900000-0000-7000-8000-{n:012x}")
}

async fn behaviours(store: &Store) {
    // Batch insert, idempotent by id and by (sender, clientMsgId).
    let a = msg(
        &uuid_at(1),
        "alice",
        Target::User("bob".into()),
        Some("c1"),
        1000,
    );
    let b = msg(&uuid_at(2), "alice", Target::User("bob".into()), None, 1001);
    let out = store
        .insert_messages(&[a.clone(), b.clone()])
        .await
        .expect("insert");
    assert!(out.iter().all(|s| s.outcome == Outcome::New));
    let retry = msg(
        &uuid_at(3),
        "alice",
        Target::Channel("x".into()),
        Some("c1"),
        2000,
    );
    let again = store
        .insert_messages(&[a.clone(), retry.clone()])
        .await
        .expect("insert again");
    assert!(
        again[0].outcome == Outcome::Redelivered && again[0].message == a,
        "redelivery returns the stored row"
    );
    assert!(
        again[1].outcome == Outcome::Retry && again[1].message == a,
        "a retry with the same clientMsgId returns the first message, whatever its target"
    );
    // Two sends with one clientMsgId in one batch store one message.
    let c1 = msg(
        &uuid_at(4),
        "carol",
        Target::User("bob".into()),
        Some("dup"),
        3000,
    );
    let c2 = msg(
        &uuid_at(5),
        "carol",
        Target::User("bob".into()),
        Some("dup"),
        3001,
    );
    let out = store
        .insert_messages(&[c1.clone(), c2])
        .await
        .expect("insert");
    assert!(
        out[0].outcome == Outcome::New && out[1].outcome == Outcome::Retry && out[1].message == c1
    );
    assert_eq!(store.count_messages().await.expect("count"), 3);
    assert_eq!(
        store
            .find_by_client_msg_id("alice", "c1")
            .await
            .expect("find"),
        Some(a.clone())
    );
    assert_eq!(
        store
            .find_by_client_msg_id("bob", "c1")
            .await
            .expect("find"),
        None
    );

    // Channels and members.
    store
        .create_channel("x", "X", "alice", &["bob".into(), "alice".into()], 500)
        .await
        .expect("create");
    assert!(matches!(
        store.create_channel("x", "X", "carol", &[], 600).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store
            .channel("x")
            .await
            .expect("get")
            .expect("exists")
            .creator_id,
        "alice"
    );
    assert_eq!(
        store.channels_of("bob").await.expect("channels"),
        vec!["x".to_owned()]
    );
    assert!(store.add_member("x", "carol", 700).await.expect("add"));
    assert!(!store
        .add_member("x", "carol", 800)
        .await
        .expect("add again"));
    assert_eq!(
        store.member_since("x", "carol").await.expect("since"),
        Some(700)
    );
    assert!(store.remove_member("x", "carol").await.expect("remove"));
    assert!(!store
        .remove_member("x", "carol")
        .await
        .expect("remove again"));
    assert_eq!(store.member_since("x", "carol").await.expect("since"), None);

    // One statement for a large membership, and for member changes.
    assert_eq!(
        store.add_member_since("x", "dave", 900).await.expect("add"),
        900
    );
    assert_eq!(
        store
            .add_member_since("x", "dave", 950)
            .await
            .expect("again"),
        900,
        "an existing membership keeps its start"
    );
    let many: Vec<String> = (0..fanout::store::MEMBERS_PER_STATEMENT + 7)
        .map(|n| format!("m{n}"))
        .chain(["bob".to_owned(), "m1".to_owned()])
        .collect();
    store
        .create_channel("big", "Big", "bob", &many, 1200)
        .await
        .expect("create a channel beyond one statement's members");
    for u in [
        "m0",
        "m1",
        "bob",
        &format!("m{}", fanout::store::MEMBERS_PER_STATEMENT + 6),
    ] {
        assert_eq!(
            store.member_since("big", u).await.expect("since"),
            Some(1200),
            "{u} is a member"
        );
    }
    assert_eq!(
        store.channels_of("m3").await.expect("channels"),
        vec!["big".to_owned()]
    );

    // History pages: newest first, `before` exclusive.
    let group: Vec<Message> = (10..20)
        .map(|n| {
            msg(
                &uuid_at(n),
                "bob",
                Target::Channel("x".into()),
                None,
                5000 + n as i64,
            )
        })
        .collect();
    store.insert_messages(&group).await.expect("insert group");
    let conv = fanout_backend::OrderingKey::channel("x");
    let page = store.history(conv.as_str(), None, 4).await.expect("page");
    let ids: Vec<&str> = page.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [uuid_at(19), uuid_at(18), uuid_at(17), uuid_at(16)]);
    let next = store
        .history(conv.as_str(), Some(&uuid_at(16)), 100)
        .await
        .expect("page");
    assert_eq!(next.len(), 6);
    assert_eq!(next[0].id, uuid_at(15));
    let dm = fanout_backend::OrderingKey::direct("bob", "alice");
    assert_eq!(
        store
            .history(dm.as_str(), None, 10)
            .await
            .expect("dm")
            .len(),
        2
    );
    let since = store
        .messages_since(conv.as_str(), 5015, 100)
        .await
        .expect("since");
    assert_eq!(
        since.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        (15..20).map(uuid_at).collect::<Vec<_>>()
    );

    // A route loss's catch-up: a user's personal messages both ways, from
    // a time on, oldest first, never a channel's.
    let ids = |ms: Vec<Message>| ms.into_iter().map(|m| m.id).collect::<Vec<_>>();
    let bob = store
        .personal_messages_since("bob", 1001, 100)
        .await
        .expect("bob's");
    assert_eq!(ids(bob), [uuid_at(2), uuid_at(4)]);
    let alice = store
        .personal_messages_since("alice", 0, 100)
        .await
        .expect("alice's");
    assert_eq!(ids(alice), [uuid_at(1), uuid_at(2)], "sent ones count");
    let limited = store
        .personal_messages_since("bob", 0, 1)
        .await
        .expect("limited");
    assert_eq!(ids(limited), [uuid_at(1)]);
    assert!(store
        .personal_messages_since("carol", 3001, 100)
        .await
        .expect("carol's")
        .is_empty());
}

#[tokio::test]
async fn sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "sqlite:{}?mode=rwc",
        dir.path().join("sub/fanout.db").display()
    );
    let store = Store::connect(&url, 4, Duration::from_secs(5))
        .await
        .expect("connect");
    behaviours(&store).await;
    // Migrations are idempotent.
    Store::connect(&url, 4, Duration::from_secs(5))
        .await
        .expect("reconnect");
}

#[tokio::test]
async fn postgres() {
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    let store = Store::connect(&db.url, 4, Duration::from_secs(5))
        .await
        .expect("connect");
    behaviours(&store).await;
    store.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn unsupported_url_is_a_clear_error() {
    let err = Store::connect("mysql://x", 1, Duration::from_secs(1))
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("sqlite:PATH or postgres://"),
        "{err}"
    );
}
