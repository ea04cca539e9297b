//! The worker's error policy (`src/worker.rs`, `docs/reliability.md` G7)
//! on PostgreSQL and every backend: a message the database refuses by its
//! content is dead-lettered alone, after `incoming.max_attempts` refusals,
//! while its neighbours are stored and delivered in order; after the fix,
//! `fanout dead-letters replay` brings it back and it is stored once.
//! (Infrastructure errors never dead-letter: the fault matrix's
//! `database_read_only` and `worker_restarts` rows, `tests/faults.rs`.)

mod common;

use common::cluster::{next, quiet, send_ok, Cluster};
use common::TestDb;
use fanout::config::BackendKind;
use fanout_backend::{DeadLetterAction, DeadLetterSelection};
use serde_json::json;
use sqlx::{Connection, PgConnection, Row};

const REFUSED: &str = "refuse me";
const MAX_ATTEMPTS: u32 = 3;

async fn sql(url: &str, statement: &str) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query(statement)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

async fn count(url: &str, content: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("SELECT count(*) AS n FROM messages WHERE content = $1 OR $1 = ''")
        .bind(content)
        .fetch_one(&mut conn)
        .await
        .expect("count")
        .try_get("n")
        .expect("n")
}

/// Contents of the next `n` events `c` receives.
async fn contents(c: &fanout_bench::client::Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (name, data) = next(c).await;
        assert_eq!(name, "MESSAGE_RECEIVE");
        out.push(data["content"].as_str().unwrap_or_default().to_owned());
    }
    out
}

/// `fanout dead-letters ARGS` against the cluster's broker namespace.
fn cli(c: &Cluster, args: &[&str]) -> std::process::Output {
    let backend = match c.config.backend {
        BackendKind::Rabbitmq => "rabbitmq",
        BackendKind::Redis => "redis",
        BackendKind::Memory => "memory",
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("dead-letters")
        .args(args)
        .current_dir(dir.path())
        .env_remove("FANOUT_CONFIG")
        .env("FANOUT_BACKEND", backend)
        .env("FANOUT_NAMESPACE", &c.config.namespace)
        .env("FANOUT_RABBITMQ_URL", &c.config.rabbitmq_url)
        .env("FANOUT_REDIS_URL", &c.config.redis_url)
        .output()
        .expect("run fanout dead-letters")
}

async fn refused_message_is_dead_lettered_alone_then_replayed(kind: BackendKind) {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let url = db.url.clone();
    let Some(c) = Cluster::start_broker_with(kind, 1, 1, |config| {
        config.database_url = Some(url.clone());
        config.incoming.max_attempts = MAX_ATTEMPTS;
    })
    .await
    else {
        db.drop_db().await;
        return;
    };
    // The database refuses one message by its content (a CHECK constraint:
    // SQLSTATE 23514), as it refuses a value a column cannot hold.
    sql(
        &db.url,
        &format!("ALTER TABLE messages ADD CONSTRAINT refuse_test CHECK (content <> '{REFUSED}')"),
    )
    .await;
    let alice = c.connect(0, "alice").await;
    let bob = c.connect(0, "bob").await;
    let mut ids = Vec::new();
    for content in ["one", REFUSED, "three"] {
        ids.push(send_ok(&alice, json!({ "to": "bob", "content": content })).await);
    }
    assert_eq!(
        contents(&bob, 2).await,
        ["one", "three"],
        "the neighbours are stored and delivered, in order"
    );
    quiet(&bob, "the refused message is not delivered").await;

    let dead = c.backend.dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event.id, ids[1]);
    assert!(
        dead[0]
            .reason
            .starts_with(&format!("refused by the database {MAX_ATTEMPTS} times")),
        "{}",
        dead[0].reason
    );
    assert_eq!(c.worker_metrics.dead_lettered.get(), 1);
    assert_eq!(
        c.worker_metrics.worker_message_refusals.get(),
        u64::from(MAX_ATTEMPTS),
        "each refusal counted once"
    );
    assert_eq!(count(&db.url, "").await, 2);

    // The operator fixes the cause, then replays.
    sql(&db.url, "ALTER TABLE messages DROP CONSTRAINT refuse_test").await;
    if kind == BackendKind::Memory {
        // Its dead letters live in this process: the same call the CLI makes.
        let selection = DeadLetterSelection {
            ids: Some(vec![ids[1].clone()]),
            limit: 10,
        };
        let done = c
            .backend
            .resolve_dead_letters(&selection, DeadLetterAction::Replay)
            .await
            .expect("replay");
        assert_eq!(done.len(), 1);
    } else {
        let listed = cli(&c, &[]);
        assert!(listed.status.success(), "{listed:?}");
        assert!(String::from_utf8_lossy(&listed.stdout).contains(&ids[1]));
        let out = cli(&c, &["replay", "--id", &ids[1]]);
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains(&ids[1]));
        assert!(String::from_utf8_lossy(&out.stderr).contains("replayed 1 dead letters"));
        let again = cli(&c, &["replay", "--id", &ids[1]]);
        assert!(!again.status.success(), "a second replay finds nothing");
        assert!(String::from_utf8_lossy(&again.stderr).contains("no dead letter with id"));
    }
    assert_eq!(contents(&bob, 1).await, [REFUSED], "replayed and delivered");
    assert_eq!(count(&db.url, REFUSED).await, 1, "stored once");
    assert_eq!(count(&db.url, "").await, 3);
    assert!(c.backend.dead_letters(10).await.expect("dead").is_empty());
    alice.close().await;
    bob.close().await;
    c.stop().await;
    db.drop_db().await;
}

common::backend_tests!(refused_message_is_dead_lettered_alone_then_replayed {
    memory_refused_message_is_dead_lettered_alone_then_replayed: Memory,
    rabbitmq_refused_message_is_dead_lettered_alone_then_replayed: Rabbitmq,
    redis_refused_message_is_dead_lettered_alone_then_replayed: Redis,
});

/// Golden: each kind of poison event is dead-lettered at once with its
/// exact reason, and when an event breaks several rules the first one in
/// the worker's order names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_dead_lettered_at_once_with_their_exact_reasons() {
    use fanout::protocol::{IncomingEnvelope, Message, Target};
    use fanout_backend::{IncomingEvent, OrderingKey};

    let c = Cluster::start(0, 1).await;
    let good = Message {
        id: uuid::Uuid::now_v7().to_string(),
        sender_id: "alice".into(),
        target: Target::User("bob".into()),
        content: "hi".into(),
        client_msg_id: Some("c-1".into()),
        created_at: 1_700_000_000_000,
    };
    let envelope = |v: u32, f: &dyn Fn(&mut Message)| {
        let mut message = good.clone();
        f(&mut message);
        serde_json::to_vec(&IncomingEnvelope { v, message }).expect("encode")
    };
    let undecodable = |bytes: &[u8]| {
        let e = serde_json::from_slice::<IncomingEnvelope>(bytes).expect_err("undecodable");
        format!("undecodable event: {e}")
    };
    let too_long = "x".repeat(fanout::config::MAX_CONTENT_BYTES_CEILING + 1);
    let cases: Vec<(Vec<u8>, String)> = vec![
        (b"not json".to_vec(), undecodable(b"not json")),
        (br#"{"v":1}"#.to_vec(), undecodable(br#"{"v":1}"#)),
        (envelope(2, &|_| {}), "unknown envelope version".into()),
        (
            envelope(2, &|m| m.id = "nope".into()),
            "unknown envelope version".into(),
        ),
        (
            envelope(1, &|m| m.id = "nope".into()),
            "message id is not a UUID".into(),
        ),
        (
            envelope(1, &|m| {
                m.id = "nope".into();
                m.sender_id = "a:b".into();
            }),
            "message id is not a UUID".into(),
        ),
        (
            envelope(1, &|m| m.sender_id = "a:b".into()),
            "invalid sender id".into(),
        ),
        (
            envelope(1, &|m| {
                m.sender_id = String::new();
                m.target = Target::User(String::new());
            }),
            "invalid sender id".into(),
        ),
        (
            envelope(1, &|m| m.target = Target::User(String::new())),
            "invalid target id".into(),
        ),
        (
            envelope(1, &|m| m.target = Target::Channel("x".repeat(65))),
            "invalid target id".into(),
        ),
        (
            envelope(1, &|m| {
                m.target = Target::Channel("c d".into());
                m.content = String::new();
            }),
            "invalid target id".into(),
        ),
        (
            envelope(1, &|m| m.content = String::new()),
            "invalid content".into(),
        ),
        (
            envelope(1, &|m| m.content = too_long.clone()),
            "invalid content".into(),
        ),
        (
            envelope(1, &|m| m.content = "a\u{0}b".into()),
            "invalid content".into(),
        ),
        (
            envelope(1, &|m| {
                m.content = String::new();
                m.client_msg_id = Some("a b".into());
            }),
            "invalid content".into(),
        ),
        (
            envelope(1, &|m| m.client_msg_id = Some("a b".into())),
            "invalid clientMsgId".into(),
        ),
        (
            envelope(1, &|m| m.client_msg_id = Some(String::new())),
            "invalid clientMsgId".into(),
        ),
    ];
    let mut want = std::collections::HashMap::new();
    for (payload, reason) in cases {
        let id = uuid::Uuid::now_v7().to_string();
        c.backend
            .publish_incoming(IncomingEvent {
                id: id.clone(),
                ordering_key: OrderingKey::direct("alice", "bob"),
                payload: payload.into(),
            })
            .await
            .expect("publish");
        want.insert(id, reason);
    }
    let deadline = tokio::time::Instant::now() + common::cluster::WAIT;
    let dead = loop {
        let dead = c.backend.dead_letters(100).await.expect("dead letters");
        if dead.len() >= want.len() {
            break dead;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} poison events dead-lettered",
            dead.len(),
            want.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(dead.len(), want.len(), "{dead:?}");
    for d in &dead {
        assert_eq!(Some(&d.reason), want.get(&d.event.id), "{}", d.event.id);
    }
    assert_eq!(c.worker_metrics.dead_lettered.get(), want.len() as u64);
    c.stop().await;
}
