//! The store's behaviour, run on SQLite and on the real PostgreSQL.

mod common;

use std::time::Duration;

use fanout::protocol::{Message, Target};
use fanout::store::{MemberOf, Outcome, Store, StoreError};
use fanout::stream::{Body, Change, Entry, Stream};

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

fn inbox(u: &str) -> Stream {
    Stream::Inbox(u.to_owned())
}

fn channel(c: &str) -> Stream {
    Stream::Channel(c.to_owned())
}

/// `(stream, seq)` of each entry.
fn places(entries: &[Entry]) -> Vec<(Stream, i64)> {
    entries.iter().map(|e| (e.stream.clone(), e.seq)).collect()
}

/// The message id of each entry (`-` for a membership change).
fn message_ids(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| match &e.body {
            Body::Message(m) => m.id.clone(),
            Body::Membership(_) => "-".to_owned(),
        })
        .collect()
}

/// Asserts the stream holds exactly positions 1..=head, and returns head.
async fn assert_gap_free(store: &Store, stream: &Stream) -> i64 {
    let all = store
        .entries_after(stream, 0, 1_000_000)
        .await
        .expect("entries");
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    let n = seqs.len() as i64;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{stream} is gap-free");
    let heads = store
        .heads(std::slice::from_ref(stream))
        .await
        .expect("heads");
    assert_eq!(heads[stream], n, "{stream}'s head is its last position");
    n
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
    assert_eq!(
        places(&out[1].entries),
        [(inbox("bob"), 2), (inbox("alice"), 2)],
        "the receiver's inbox, then the sender's, in batch order"
    );
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
    assert_eq!(again[0].entries, out[0].entries, "and the positions it had");
    assert!(
        again[1].outcome == Outcome::Retry && again[1].message == a,
        "a retry with the same clientMsgId returns the first message, whatever its target"
    );
    assert_eq!(again[1].entries, out[0].entries);
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
    assert_eq!(
        places(&out[0].entries),
        [(inbox("bob"), 3), (inbox("carol"), 1)]
    );
    assert_eq!(out[1].entries, out[0].entries);
    assert_eq!(store.count_messages().await.expect("count"), 3);
    assert_eq!(
        assert_gap_free(store, &inbox("bob")).await,
        3,
        "no position for a duplicate"
    );
    assert_eq!(assert_gap_free(store, &inbox("alice")).await, 2);
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
    let created = store
        .create_channel("x", "X", "alice", &["bob".into(), "alice".into()], 500)
        .await
        .expect("create");
    assert_eq!(
        places(&created),
        [
            (channel("x"), 1),
            (inbox("alice"), 3),
            (channel("x"), 2),
            (inbox("bob"), 4)
        ]
    );
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
    let (new, added) = store
        .add_member("x", "carol", "bob", 700)
        .await
        .expect("add");
    assert!(new);
    assert_eq!(places(&added), [(channel("x"), 3), (inbox("carol"), 2)]);
    let (new, again) = store
        .add_member("x", "carol", "alice", 800)
        .await
        .expect("add again");
    assert!(!new);
    assert_eq!(again, added, "a re-add returns the entries that added them");
    assert_eq!(
        store.member_since("x", "carol").await.expect("since"),
        Some(700)
    );
    let removed = store
        .remove_member("x", "carol", "alice", 900)
        .await
        .expect("remove")
        .expect("was a member");
    assert_eq!(places(&removed), [(channel("x"), 4), (inbox("carol"), 3)]);
    assert!(store
        .remove_member("x", "carol", "alice", 950)
        .await
        .expect("remove again")
        .is_none());
    assert_eq!(store.member_since("x", "carol").await.expect("since"), None);
    assert_eq!(assert_gap_free(store, &channel("x")).await, 4);

    // One statement for a large membership (chunked beyond it).
    let many: Vec<String> = (0..fanout::store::MEMBERS_PER_STATEMENT + 7)
        .map(|n| format!("m{n}"))
        .chain(["bob".to_owned(), "m1".to_owned()])
        .collect();
    let big = store
        .create_channel("big", "Big", "bob", &many, 1200)
        .await
        .expect("create a channel beyond one statement's members");
    assert_eq!(big.len(), 2 * (fanout::store::MEMBERS_PER_STATEMENT + 8));
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
    assert_eq!(
        assert_gap_free(store, &channel("big")).await,
        fanout::store::MEMBERS_PER_STATEMENT as i64 + 8
    );

    // History pages: newest first, `before` exclusive, seq of the stream.
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
    let page = store.channel_history("x", None, 4).await.expect("page");
    assert_eq!(
        message_ids(&page),
        [uuid_at(19), uuid_at(18), uuid_at(17), uuid_at(16)]
    );
    assert_eq!(
        places(&page),
        [
            (channel("x"), 14),
            (channel("x"), 13),
            (channel("x"), 12),
            (channel("x"), 11)
        ],
        "after the 4 membership entries"
    );
    let next = store
        .channel_history("x", Some(&uuid_at(16)), 100)
        .await
        .expect("page");
    assert_eq!(next.len(), 6);
    assert_eq!(message_ids(&next)[0], uuid_at(15));
    let bobs = store
        .personal_history("bob", "alice", None, 10)
        .await
        .expect("dm");
    assert_eq!(places(&bobs), [(inbox("bob"), 2), (inbox("bob"), 1)]);
    let alices = store
        .personal_history("alice", "bob", Some(&uuid_at(2)), 10)
        .await
        .expect("dm");
    assert_eq!(places(&alices), [(inbox("alice"), 1)]);
    let since = store
        .messages_since("ch:x", 5015, 100)
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

/// Positions across batches, to oneself, in channels; membership entries;
/// reads by position.
async fn positions(store: &Store) {
    let m = |n: u64, from: &str, to: Target| msg(&uuid_at(n), from, to, None, n as i64);
    let user = |u: &str| Target::User(u.to_owned());
    let first = store
        .insert_messages(&[
            m(1, "alice", user("bob")),
            m(2, "bob", user("alice")),
            m(3, "carol", user("carol")),
            m(4, "alice", Target::Channel("g".into())),
            m(5, "alice", user("bob")),
        ])
        .await
        .expect("insert");
    let got: Vec<Vec<(Stream, i64)>> = first.iter().map(|s| places(&s.entries)).collect();
    assert_eq!(
        got,
        [
            vec![(inbox("bob"), 1), (inbox("alice"), 1)],
            vec![(inbox("alice"), 2), (inbox("bob"), 2)],
            vec![(inbox("carol"), 1)],
            vec![(channel("g"), 1)],
            vec![(inbox("bob"), 3), (inbox("alice"), 3)],
        ]
    );
    // The next batch goes on from there; a redelivery in it keeps its
    // positions and writes none.
    let second = store
        .insert_messages(&[m(6, "bob", user("alice")), m(2, "bob", user("alice"))])
        .await
        .expect("insert");
    assert_eq!(
        places(&second[0].entries),
        [(inbox("alice"), 4), (inbox("bob"), 4)]
    );
    assert_eq!(second[1].outcome, Outcome::Redelivered);
    assert_eq!(second[1].entries, first[1].entries);
    // One event twice in a batch: stored and positioned once.
    let twice = store
        .insert_messages(&[m(8, "erin", user("frank")), m(8, "erin", user("frank"))])
        .await
        .expect("insert");
    assert_eq!(
        (twice[0].outcome, twice[1].outcome),
        (Outcome::New, Outcome::Redelivered)
    );
    assert_eq!(
        places(&twice[0].entries),
        [(inbox("frank"), 1), (inbox("erin"), 1)]
    );
    assert_eq!(twice[1].entries, twice[0].entries);
    assert_eq!(assert_gap_free(store, &inbox("alice")).await, 4);
    assert_eq!(assert_gap_free(store, &inbox("bob")).await, 4);
    assert_eq!(assert_gap_free(store, &inbox("carol")).await, 1);

    let heads = store
        .heads(&[inbox("alice"), channel("g"), inbox("nobody")])
        .await
        .expect("heads");
    assert_eq!(heads.len(), 3);
    assert_eq!(
        (
            heads[&inbox("alice")],
            heads[&channel("g")],
            heads[&inbox("nobody")]
        ),
        (4, 1, 0)
    );
    assert!(store.heads(&[]).await.expect("none").is_empty());
    let after = store
        .entries_after(&inbox("alice"), 1, 2)
        .await
        .expect("after");
    assert_eq!(places(&after), [(inbox("alice"), 2), (inbox("alice"), 3)]);
    assert_eq!(message_ids(&after), [uuid_at(2), uuid_at(5)]);
    assert_eq!(
        after[0].body,
        Body::Message(m(2, "bob", user("alice"))),
        "with the stored message"
    );
    assert!(store
        .entries_after(&inbox("alice"), 4, 10)
        .await
        .expect("none")
        .is_empty());

    // Membership: creator 1, then the others sorted; each with an inbox twin
    // that carries the channel position.
    let created = store
        .create_channel(
            "club",
            "Club",
            "dave",
            &["carol".into(), "bob".into(), "dave".into()],
            100,
        )
        .await
        .expect("create");
    assert_eq!(
        places(&created),
        [
            (channel("club"), 1),
            (inbox("dave"), 1),
            (channel("club"), 2),
            (inbox("bob"), 5),
            (channel("club"), 3),
            (inbox("carol"), 2),
        ]
    );
    for pair in created.chunks(2) {
        assert_eq!(pair[0].body, pair[1].body, "a twin");
        let c = pair[0].membership().expect("membership");
        assert_eq!((c.change, c.by_user_id.as_str()), (Change::Added, "dave"));
        assert_eq!(c.channel_seq, pair[0].seq);
    }
    assert_eq!(
        store.memberships("carol").await.expect("memberships"),
        [MemberOf {
            channel_id: "club".into(),
            joined_seq: 3,
            inbox_seq: 2
        }]
    );
    let (_, added) = store
        .add_member("club", "alice", "bob", 200)
        .await
        .expect("add");
    assert_eq!(places(&added), [(channel("club"), 4), (inbox("alice"), 5)]);
    assert_eq!(added[1].membership().expect("m").channel_seq, 4);
    assert_eq!(
        added[1].membership().expect("m").by_user_id,
        "bob",
        "by whom"
    );
    let removed = store
        .remove_member("club", "carol", "dave", 300)
        .await
        .expect("remove")
        .expect("member");
    assert_eq!(
        places(&removed),
        [(channel("club"), 5), (inbox("carol"), 3)]
    );
    assert_eq!(removed[1].membership().expect("m").change, Change::Removed);
    assert_eq!(removed[1].membership().expect("m").channel_seq, 5);
    assert!(store.memberships("carol").await.expect("none").is_empty());
    assert_eq!(
        store.removal_after("club", "carol", 0).await.expect("r"),
        Some(5)
    );
    assert_eq!(
        store.removal_after("club", "carol", 4).await.expect("r"),
        Some(5)
    );
    assert_eq!(
        store.removal_after("club", "carol", 5).await.expect("r"),
        None
    );
    assert_eq!(
        store.removal_after("club", "bob", 0).await.expect("r"),
        None
    );
    // A message, then the removed member back: a later removal is found
    // after the later position.
    let sent = store
        .insert_messages(&[m(7, "bob", Target::Channel("club".into()))])
        .await
        .expect("send");
    assert_eq!(places(&sent[0].entries), [(channel("club"), 6)]);
    store
        .add_member("club", "carol", "dave", 400)
        .await
        .expect("re-add");
    store
        .remove_member("club", "carol", "carol", 500)
        .await
        .expect("leave");
    assert_eq!(
        store.removal_after("club", "carol", 5).await.expect("r"),
        Some(8)
    );
    let history = store.channel_history("club", None, 10).await.expect("h");
    assert_eq!(places(&history), [(channel("club"), 6)], "messages only");
    let carols = store
        .entries_after(&inbox("carol"), 1, 100)
        .await
        .expect("carol's inbox");
    let changes: Vec<(Change, i64)> = carols
        .iter()
        .map(|e| {
            let c = e.membership().expect("membership");
            (c.change, c.channel_seq)
        })
        .collect();
    assert_eq!(
        changes,
        [
            (Change::Added, 3),
            (Change::Removed, 5),
            (Change::Added, 7),
            (Change::Removed, 8)
        ]
    );
    assert_eq!(assert_gap_free(store, &channel("club")).await, 8);
    assert_eq!(assert_gap_free(store, &inbox("carol")).await, 5);
}

/// Two stores (two pools) on one database write one user's inbox from
/// different conversations at once, while a third task changes a
/// channel's membership (that user's too): every stream stays exactly
/// 1..=N.
async fn concurrent(url: &str) {
    let one = Store::connect(url, 4, Duration::from_secs(30))
        .await
        .expect("connect");
    let two = Store::connect(url, 4, Duration::from_secs(30))
        .await
        .expect("connect");
    one.create_channel("busy", "Busy", "owner", &[], 0)
        .await
        .expect("create");
    let writer = |store: Store, side: &'static str| async move {
        for b in 0..20u64 {
            let batch: Vec<Message> = (0..10u64)
                .map(|i| {
                    msg(
                        &uuid::Uuid::now_v7().to_string(),
                        &format!("{side}{}", (b * 10 + i) % 7),
                        Target::User("target".into()),
                        None,
                        0,
                    )
                })
                .collect();
            let out = store.insert_messages(&batch).await.expect("insert");
            assert!(out.iter().all(|s| s.outcome == Outcome::New));
        }
    };
    let members = {
        let store = two.clone();
        async move {
            for round in 0..10 {
                for u in ["target", "m1", "m2"] {
                    let (new, _) = store
                        .add_member("busy", u, "owner", round)
                        .await
                        .expect("add");
                    assert!(new);
                }
                for u in ["m2", "target", "m1"] {
                    store
                        .remove_member("busy", u, "owner", round)
                        .await
                        .expect("remove")
                        .expect("member");
                }
            }
        }
    };
    tokio::join!(writer(one.clone(), "a"), writer(two.clone(), "b"), members);
    assert_eq!(
        assert_gap_free(&one, &inbox("target")).await,
        400 + 20,
        "every message and every change of target's membership"
    );
    assert_eq!(assert_gap_free(&two, &channel("busy")).await, 1 + 60);
    for side in ["a", "b"] {
        for n in 0..7 {
            assert_gap_free(&one, &inbox(&format!("{side}{n}"))).await;
        }
    }
    assert_eq!(assert_gap_free(&one, &inbox("m1")).await, 20);
    one.close().await;
    two.close().await;
}

/// A database written by the schema before positions: the migration gives
/// the stored messages their positions, and old memberships position 0.
async fn migrated(url: &str) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.expect("connect");
    for old in [
        include_str!("../migrations/20261128000001_init.sql"),
        include_str!("../migrations/20261129000001_catch_up.sql"),
    ] {
        sqlx::raw_sql(old).execute(&pool).await.expect("old schema");
    }
    let rows = [
        (uuid_at(1), "alice", Some("bob"), None),
        (uuid_at(2), "bob", Some("alice"), None),
        (uuid_at(3), "alice", Some("alice"), None),
        (uuid_at(4), "alice", None, Some("old")),
        (uuid_at(5), "bob", None, Some("old")),
        (uuid_at(6), "carol", None, Some("other")),
    ];
    for (id, from, to, ch) in rows {
        let conversation = match (to, ch) {
            (Some(to), _) => fanout_backend::OrderingKey::direct(from, to),
            (None, Some(c)) => fanout_backend::OrderingKey::channel(c),
            _ => unreachable!(),
        };
        sqlx::query(
            "INSERT INTO messages (id, conversation, sender_id, receiver_id, channel_id, content, created_at) VALUES ($1, $2, $3, $4, $5, 'old', 1)",
        )
        .bind(id)
        .bind(conversation.as_str().to_owned())
        .bind(from.to_owned())
        .bind(to.map(str::to_owned))
        .bind(ch.map(str::to_owned))
        .execute(&pool)
        .await
        .expect("old message");
    }
    sqlx::query(
        "INSERT INTO channels (id, name, creator_id, created_at) VALUES ('old', 'Old', 'alice', 1)",
    )
    .execute(&pool)
    .await
    .expect("old channel");
    sqlx::query(
        "INSERT INTO channel_members (channel_id, user_id, added_at) VALUES ('old', 'alice', 1)",
    )
    .execute(&pool)
    .await
    .expect("old member");
    pool.close().await;

    let store = Store::connect(url, 4, Duration::from_secs(5))
        .await
        .expect("migrate");
    let of = |s: Stream| {
        let store = store.clone();
        async move {
            let e = store.entries_after(&s, 0, 100).await.expect("entries");
            message_ids(&e)
        }
    };
    assert_eq!(
        of(inbox("alice")).await,
        [uuid_at(1), uuid_at(2), uuid_at(3)]
    );
    assert_eq!(of(inbox("bob")).await, [uuid_at(1), uuid_at(2)]);
    assert_eq!(of(channel("old")).await, [uuid_at(4), uuid_at(5)]);
    assert_eq!(of(channel("other")).await, [uuid_at(6)]);
    for (s, n) in [
        (inbox("alice"), 3),
        (inbox("bob"), 2),
        (channel("old"), 2),
        (channel("other"), 1),
    ] {
        assert_eq!(assert_gap_free(&store, &s).await, n);
    }
    assert_eq!(
        store.memberships("alice").await.expect("memberships"),
        [MemberOf {
            channel_id: "old".into(),
            joined_seq: 0,
            inbox_seq: 0
        }]
    );
    assert_eq!(
        store
            .add_member("old", "alice", "alice", 2)
            .await
            .expect("re-add"),
        (false, Vec::new()),
        "a member from before positions"
    );
    let out = store
        .insert_messages(&[msg(
            &uuid_at(7),
            "alice",
            Target::User("bob".into()),
            None,
            2,
        )])
        .await
        .expect("insert");
    assert_eq!(
        places(&out[0].entries),
        [(inbox("bob"), 3), (inbox("alice"), 4)]
    );
    let (_, added) = store
        .add_member("old", "bob", "alice", 3)
        .await
        .expect("add");
    assert_eq!(places(&added), [(channel("old"), 3), (inbox("bob"), 4)]);
    let redelivered = store
        .insert_messages(&[msg(
            &uuid_at(2),
            "bob",
            Target::User("alice".into()),
            None,
            1,
        )])
        .await
        .expect("redeliver");
    assert_eq!(
        places(&redelivered[0].entries),
        [(inbox("alice"), 2), (inbox("bob"), 2)]
    );
    store.close().await;
}

fn sqlite_url(dir: &tempfile::TempDir, name: &str) -> String {
    format!("sqlite:{}?mode=rwc", dir.path().join(name).display())
}

#[tokio::test]
async fn sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(&dir, "sub/fanout.db");
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
async fn sqlite_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::connect(&sqlite_url(&dir, "p.db"), 4, Duration::from_secs(5))
        .await
        .expect("connect");
    positions(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    concurrent(&sqlite_url(&dir, "c.db")).await;
}

#[tokio::test]
async fn sqlite_migration_backfills_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    migrated(&sqlite_url(&dir, "m.db")).await;
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
async fn postgres_positions() {
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    let store = Store::connect(&db.url, 4, Duration::from_secs(5))
        .await
        .expect("connect");
    positions(&store).await;
    store.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_positions() {
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    concurrent(&db.url).await;
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_migration_backfills_positions() {
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    migrated(&db.url).await;
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
/// Not an assertion: the time of 100 batches of 64 personal messages on
/// PostgreSQL (`cargo test --release --test store -- --ignored --nocapture timing`).
#[tokio::test]
#[ignore]
async fn timing_personal_batches_postgres() {
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    let store = Store::connect(&db.url, 4, Duration::from_secs(5))
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    for b in 0..100u64 {
        let batch: Vec<Message> = (0..64u64)
            .map(|i| {
                let n = b * 64 + i;
                msg(
                    &uuid::Uuid::now_v7().to_string(),
                    &format!("u{}", n % 16),
                    Target::User(format!("u{}", (n + 1 + n / 16) % 16)),
                    None,
                    n as i64,
                )
            })
            .collect();
        store.insert_messages(&batch).await.expect("insert");
    }
    let took = started.elapsed();
    println!(
        "TIMING 100 batches x 64 personal messages on PostgreSQL: {took:?} ({:?} a batch)",
        took / 100
    );
    store.close().await;
    db.drop_db().await;
}

/// The largest batch the configuration allows is one statement on
/// PostgreSQL (13 bound values a message, 65,535 at most): stored whole,
/// every inbox gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_largest_batch_is_one_statement() {
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    let store = Store::connect(&db.url, 4, Duration::from_secs(5))
        .await
        .expect("connect");
    let n = fanout::config::MAX_WORKER_BATCH as usize;
    let batch: Vec<Message> = (0..n)
        .map(|i| {
            let to = Target::User(format!("u{}", (i + 1) % 50));
            msg(
                &uuid_at(i as u64 + 1),
                &format!("u{}", i % 50),
                to,
                None,
                i as i64,
            )
        })
        .collect();
    let stored = store.insert_messages(&batch).await.expect("one statement");
    assert_eq!(stored.len(), n);
    assert!(stored
        .iter()
        .all(|s| s.outcome == Outcome::New && s.entries.len() == 2));
    let mut total = 0;
    for u in 0..50 {
        total += assert_gap_free(&store, &inbox(&format!("u{u}"))).await;
    }
    assert_eq!(total, 2 * n as i64, "two inbox entries a message");
    store.close().await;
    db.drop_db().await;
}
