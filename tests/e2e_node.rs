//! The end-to-end suite in `tests/js/`: the stock JavaScript
//! `socket.io-client` against the real `fanout` binary: `fanout serve` on
//! SQLite (the embedded default), then three gateway and two worker
//! processes on each broker backend and topology, on a fresh PostgreSQL
//! database, where every test also crosses gateways. (`serve` on
//! PostgreSQL is not run apart: the broker runs cover the PostgreSQL store
//! end to end, `serve` the memory backend, and each run costs about 80 s
//! of CI.)
//!
//! Needs `node` (and `npm` when `tests/js/node_modules` is missing); without
//! them the tests skip loudly (or fail under `FANOUT_TEST_REQUIRE_SERVICES=1`).

mod common;

use fanout_localcluster::rabbitmq::RabbitCluster;
use fanout_localcluster::redis::RedisCluster;
use fanout_localcluster::ClusterError;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;

/// The two runs start many servers and time-sensitive checks; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("js")
}

/// Whether `program --version` runs.
fn runs(program: &str) -> Result<(), String> {
    match Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`{program} --version` exited with {s}")),
        Err(e) => Err(format!("cannot run `{program}`: {e}")),
    }
}

/// Checks node (and installs the client with npm if needed); `false` after
/// a skip.
fn prepare() -> bool {
    if let Err(why) = runs("node") {
        common::skip_or_fail("node", &why);
        return false;
    }
    let dir = js_dir();
    if !dir.join("node_modules").join("socket.io-client").exists() {
        if let Err(why) = runs("npm") {
            common::skip_or_fail("npm", &why);
            return false;
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("run npm ci");
        assert!(
            status.success(),
            "npm ci in {} failed: {status}",
            dir.display()
        );
    }
    true
}

/// The suite's files, sorted.
fn test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(js_dir())
        .expect("read tests/js")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".test.mjs"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no tests/js/*.test.mjs files");
    files
}

/// Runs the suite against `database_url` (None = SQLite) on `backend`.
fn run_suite(database_url: Option<&str>, backend: &str) -> ExitStatus {
    run_suite_with(database_url, backend, &[])
}

/// [`run_suite`] with further `FANOUT_*` settings for every server process
/// (the broker's topology).
fn run_suite_with(
    database_url: Option<&str>,
    backend: &str,
    broker_env: &[(&str, &str)],
) -> ExitStatus {
    let mut cmd = Command::new("node");
    cmd.args(["--test", "--test-concurrency=1"])
        .args(test_files())
        .current_dir(js_dir())
        .env("FANOUT_BIN", env!("CARGO_BIN_EXE_fanout"))
        .env_remove("FANOUT_E2E_DATABASE_URL")
        .env("FANOUT_E2E_BACKEND", backend)
        .env(
            "FANOUT_E2E_BROKER_ENV",
            serde_json::Value::Object(
                broker_env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                    .collect(),
            )
            .to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if let Some(url) = database_url {
        cmd.env("FANOUT_E2E_DATABASE_URL", url);
    }
    cmd.status().expect("run node --test")
}

#[test]
fn node_client_sqlite() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !prepare() {
        return;
    }
    let status = run_suite(None, "memory");
    assert!(
        status.success(),
        "the node suite failed on SQLite: {status}"
    );
}

/// Whether a TCP port on this machine answers; skips (or fails) if not.
fn broker_up(name: &str, port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3)) {
        Ok(_) => true,
        Err(e) => {
            common::skip_or_fail(name, &e.to_string());
            false
        }
    }
}

fn broker_suite(backend: &str, name: &str, port: u16) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !prepare() || !broker_up(name, port) {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let Some(db) = runtime.block_on(common::TestDb::create()) else {
        return;
    };
    let status = run_suite(Some(&db.url), backend);
    runtime.block_on(db.drop_db());
    assert!(
        status.success(),
        "the node suite failed on {name}: {status}"
    );
}

#[test]
fn node_client_redis_three_gateways() {
    broker_suite("redis", "Redis", 6379);
}

#[test]
fn node_client_rabbitmq_three_gateways() {
    broker_suite("rabbitmq", "RabbitMQ", 5672);
}

/// A local cluster, or `None` after a loud skip (a failure under CI) when
/// its broker is not installed; a cluster that is installed but does not
/// form fails the test.
fn local_cluster<T>(what: &str, started: Result<T, ClusterError>) -> Option<T> {
    match started {
        Ok(cluster) => Some(cluster),
        Err(ClusterError::Missing(why)) => {
            common::skip_or_fail(what, &why);
            None
        }
        Err(why) => panic!("could not start the test {what}: {why}"),
    }
}

/// The suite on a Redis Cluster (3 primaries with a replica each, started
/// by this test process): three gateways and two workers in cluster mode.
#[test]
fn node_client_redis_cluster_three_gateways() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !prepare() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let Some(cluster) = local_cluster("Redis Cluster", runtime.block_on(RedisCluster::shared()))
    else {
        return;
    };
    let Some(db) = runtime.block_on(common::TestDb::create()) else {
        return;
    };
    let status = run_suite_with(
        Some(&db.url),
        "redis",
        &[
            ("FANOUT_REDIS_URL", &cluster.seeds),
            ("FANOUT_REDIS__CLUSTER", "true"),
        ],
    );
    runtime.block_on(db.drop_db());
    assert!(
        status.success(),
        "the node suite failed on a Redis Cluster: {status}"
    );
}

/// The suite on a three-node RabbitMQ cluster (started by this test
/// process, or the one `.ci/run` started): the processes get the nodes'
/// URL list, each connects to a node of its own choosing.
#[test]
fn node_client_rabbitmq_cluster_three_gateways() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !prepare() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let Some(cluster) = local_cluster(
        "RabbitMQ cluster",
        runtime.block_on(RabbitCluster::shared()),
    ) else {
        return;
    };
    let Some(db) = runtime.block_on(common::TestDb::create()) else {
        return;
    };
    let urls = cluster.url_list();
    let status = run_suite_with(Some(&db.url), "rabbitmq", &[("FANOUT_RABBITMQ_URL", &urls)]);
    runtime.block_on(db.drop_db());
    assert!(
        status.success(),
        "the node suite failed on a RabbitMQ cluster: {status}"
    );
}
