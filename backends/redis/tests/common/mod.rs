//! Shared by the Redis backend's test files: where Redis is, whether it is
//! reachable, cleanup of the namespaces the tests create, and killing
//! their connections.

#![allow(dead_code)] // each test file uses a different part

use std::time::Duration;

use fanout_redis::{RedisBackend, RedisConfig};

/// A private Redis Cluster per test process, for the cluster-mode tests.
pub mod cluster;
/// The conformance harness, standalone or on that cluster.
pub mod harness;

/// The Redis the tests use: `FANOUT_REDIS_URL`, else the local one.
pub fn url() -> String {
    std::env::var("FANOUT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Whether Redis answers a PING within 5 s; if not, skips loudly (or fails
/// under `FANOUT_TEST_REQUIRE_SERVICES=1`).
pub async fn available() -> bool {
    let probe = async {
        let client = redis::Client::open(url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            fanout_backend::conformance::skip_or_fail("Redis", &format!("{}: {e}", url()));
            false
        }
        Err(_) => {
            fanout_backend::conformance::skip_or_fail(
                "Redis",
                &format!("{}: no answer in 5 s", url()),
            );
            false
        }
    }
}

/// A configuration for tests in `namespace`.
pub fn config(namespace: &str) -> RedisConfig {
    RedisConfig {
        url: url(),
        namespace: namespace.to_owned(),
        ..RedisConfig::default()
    }
}

/// A namespace no other run uses.
pub fn namespace() -> String {
    fanout_backend::conformance::fresh_namespace()
}

/// Deletes every key of a namespace.
pub async fn purge(namespace: &str) {
    if let Err(e) = RedisBackend::purge(&url(), namespace, Duration::from_secs(5)).await {
        eprintln!("could not purge test namespace {namespace}: {e}");
    }
}

/// One step of a SCAN over a namespace's keys (SCAN, not KEYS: the Redis
/// is shared).
fn scan(namespace: &str, cursor: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(format!("{namespace}:*"))
        .arg("COUNT")
        .arg(1000);
    cmd
}

/// Deletes every key of a namespace without a runtime (from `Drop`).
pub fn purge_blocking(namespace: &str) {
    let run = || -> redis::RedisResult<()> {
        let client = redis::Client::open(url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = scan(namespace, cursor).query(&mut conn)?;
            if !keys.is_empty() {
                redis::cmd("UNLINK").arg(keys).query::<()>(&mut conn)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    };
    if let Err(e) = run() {
        eprintln!("could not purge test namespace {namespace}: {e}");
    }
}

/// Deletes a namespace's keys when dropped, so a test that panics does not
/// leave its keys on the shared Redis. Declare it before the backend: it
/// drops last.
#[derive(Debug)]
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        purge_blocking(&self.0);
    }
}

/// A backend on a namespace no other run uses, configured by `tweak` from
/// [`config`], and the guard that deletes the namespace's keys; `None` when
/// Redis is unreachable (the test is skipped). Bind it as `(cleanup, b)`:
/// the later binding drops first, so the keys go after the backend.
pub async fn fresh(
    tweak: impl FnOnce(RedisConfig) -> RedisConfig,
) -> Option<(Cleanup, RedisBackend)> {
    if !available().await {
        return None;
    }
    let cleanup = Cleanup(namespace());
    let b = RedisBackend::connect(tweak(config(&cleanup.0)))
        .await
        .expect("connect");
    Some((cleanup, b))
}

/// Keys of a namespace that exist now.
pub async fn keys_of(namespace: &str) -> Vec<String> {
    let mut conn = raw().await;
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = scan(namespace, cursor)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        out.extend(keys);
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// A raw connection for assertions on Redis state.
pub async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Kills (`CLIENT KILL ID`) every client whose `CLIENT LIST` line has a
/// field starting with `name_prefix` (for example `name=ns:sub:`); returns
/// how many. By name, so concurrent runs on the shared Redis are spared.
pub async fn kill_clients(name_prefix: &str) -> usize {
    let mut raw = raw().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut raw)
        .await
        .expect("CLIENT LIST");
    let ids: Vec<String> = list
        .lines()
        .filter(|l| l.split_whitespace().any(|f| f.starts_with(name_prefix)))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    let mut killed = 0;
    for id in ids {
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(&id)
            .query_async(&mut raw)
            .await
            .expect("CLIENT KILL");
        killed += usize::try_from(n).unwrap_or(0);
    }
    killed
}
