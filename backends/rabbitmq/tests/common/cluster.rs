//! A three-node RabbitMQ cluster on loopback for the cluster tests, started
//! once per test binary by `scripts/rabbitmq-cluster` (nodes
//! fr1..fr3@localhost, AMQP 5681..5683) and torn down when the binary
//! exits.
//!
//! - Starting takes about 30 s, so every test of a binary shares one
//!   cluster ([`cluster`]). Tests that kill nodes take [`exclusive`] first.
//! - `FANOUT_RABBITMQ_CLUSTER_URLS` (the output of `scripts/rabbitmq-cluster
//!   urls`) makes the tests use a cluster already running (started with
//!   `scripts/rabbitmq-cluster up`), and leave it running.
//! - Without `rabbitmq-server` (or without the rights to run it as the
//!   `rabbitmq` user) the tests skip loudly, or fail when
//!   `FANOUT_TEST_REQUIRE_SERVICES=1`.
//! - Node names and ports are fixed, so only one cluster can run on a
//!   machine: a file lock makes two test runs wait for each other, and a
//!   reaper process (which outlives a killed test binary) stops the nodes
//!   and deletes their directory once the binary is gone.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use fanout_backend::conformance::skip_or_fail;

/// Where the test cluster lives (not the default of the script, so that a
/// cluster a person started by hand is not deleted under them).
const TEST_DIR: &str = "/tmp/fanout-rmq-cluster-test";
/// Held for the life of a test binary that started the cluster.
const LOCK: &str = "/tmp/fanout-rmq-cluster.lock";
/// Nodes of the cluster: 1, 2, 3.
pub const NODES: [usize; 3] = [1, 2, 3];

pub struct Cluster {
    dir: String,
    urls: Vec<String>,
    /// Nodes killed or stopped by a test and not started again.
    down: Mutex<Vec<usize>>,
    /// The lock file, held while this process owns the cluster.
    _lock: Option<File>,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `scripts/rabbitmq-cluster` of the workspace: found upwards from the
/// package of the test that includes this file (the RabbitMQ backend's, or
/// the root package's end-to-end suite).
fn script() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|dir| dir.join("scripts/rabbitmq-cluster"))
        .find(|p| p.exists())
        .unwrap_or_else(|| manifest.join("../../scripts/rabbitmq-cluster"))
}

/// The shared cluster, started on first use; `None` when it cannot run
/// here (after a loud skip line, or a panic under CI).
pub async fn cluster() -> Option<&'static Cluster> {
    // Starting blocks for ~30 s: off the runtime's threads. Concurrent
    // first callers wait on the OnceLock.
    tokio::task::spawn_blocking(|| CLUSTER.get_or_init(start).as_ref())
        .await
        .expect("cluster start task")
}

/// Serialises the tests that kill, stop or measure nodes: they would
/// disturb each other on a shared cluster.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

fn start() -> Option<Cluster> {
    if let Ok(list) = std::env::var("FANOUT_RABBITMQ_CLUSTER_URLS") {
        let urls: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
        eprintln!("using the running RabbitMQ cluster {list}");
        return Some(Cluster {
            dir: std::env::var("FANOUT_RMQ_CLUSTER_DIR")
                .unwrap_or_else(|_| "/tmp/fanout-rmq-cluster".into()),
            urls,
            down: Mutex::default(),
            _lock: None,
        });
    }
    if !std::path::Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() {
        skip_or_fail(
            "RabbitMQ cluster",
            "rabbitmq-server is not installed (/usr/lib/rabbitmq/bin)",
        );
        return None;
    }
    let lock = match File::create(LOCK) {
        Ok(f) => f,
        Err(e) => {
            skip_or_fail("RabbitMQ cluster", &format!("cannot create {LOCK}: {e}"));
            return None;
        }
    };
    // Another test run holds the nodes: wait for it to finish.
    if let Err(e) = lock.lock() {
        skip_or_fail("RabbitMQ cluster", &format!("cannot lock {LOCK}: {e}"));
        return None;
    }
    // The reaper outlives this process, whatever ends it, and then takes
    // the lock itself before stopping the nodes, so it never stops the
    // cluster of a test run that started after this one.
    let reaper = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         exec flock {LOCK} {script} down",
        pid = std::process::id(),
        script = script().display(),
    );
    let spawned = Command::new("setsid")
        .args(["sh", "-c", &reaper])
        .env("FANOUT_RMQ_CLUSTER_DIR", TEST_DIR)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        skip_or_fail("RabbitMQ cluster", &format!("cannot start the reaper: {e}"));
        return None;
    }
    eprintln!("starting a 3-node RabbitMQ cluster (about 30 s)...");
    let t0 = Instant::now();
    // Bounded: a node that never comes up must fail the run, not hang it.
    let out = Command::new("timeout")
        .arg("300")
        .arg(script())
        .arg("up")
        .env("FANOUT_RMQ_CLUSTER_DIR", TEST_DIR)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            skip_or_fail(
                "RabbitMQ cluster",
                &format!(
                    "scripts/rabbitmq-cluster up failed: {}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            );
            return None;
        }
        Err(e) => {
            skip_or_fail(
                "RabbitMQ cluster",
                &format!("run scripts/rabbitmq-cluster: {e}"),
            );
            return None;
        }
    }
    eprintln!("RabbitMQ cluster up in {:.1} s", t0.elapsed().as_secs_f64());
    Some(Cluster {
        dir: TEST_DIR.to_owned(),
        urls: NODES
            .iter()
            .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5680 + n))
            .collect(),
        down: Mutex::default(),
        _lock: Some(lock),
    })
}

impl Cluster {
    /// The comma-separated URLs of every node: what `FANOUT_RABBITMQ_URL`
    /// holds for a cluster.
    pub fn url_list(&self) -> String {
        self.urls.join(",")
    }

    /// The URL of node `n` alone.
    pub fn url(&self, n: usize) -> String {
        self.urls[n - 1].clone()
    }

    /// The node a URL (as `RabbitMqBackend::connected_node` shows it)
    /// points to, by its port.
    pub fn node_of(&self, url: &str) -> Option<usize> {
        NODES
            .into_iter()
            .find(|n| url.contains(&format!(":{}/", 5680 + n)))
    }

    /// Runs the cluster script with `args`; its stdout. Panics if it fails.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .arg("180")
            .arg(script())
            .args(args)
            .env("FANOUT_RMQ_CLUSTER_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/rabbitmq-cluster");
        assert!(
            out.status.success(),
            "scripts/rabbitmq-cluster {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `rabbitmqctl -n fr{n}@localhost args`; its stdout.
    pub fn ctl(&self, n: usize, args: &[&str]) -> String {
        let n = n.to_string();
        let mut all = vec!["ctl", n.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `rabbitmqctl` on any node not killed or stopped by a test.
    pub fn ctl_any(&self, args: &[&str]) -> String {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let n = NODES
            .into_iter()
            .find(|n| !down.contains(n))
            .expect("a live node");
        self.ctl(n, args)
    }

    /// SIGKILLs node `n` (a crash: its data stays, it can be started again).
    pub fn kill(&self, n: usize) {
        self.mark_down(n);
        self.run(&["kill", &n.to_string()]);
    }

    /// Stops node `n` cleanly.
    pub fn stop(&self, n: usize) {
        self.mark_down(n);
        self.run(&["stop", &n.to_string()]);
    }

    /// Starts node `n` again and waits until it runs (it rejoins the
    /// cluster on its own).
    pub fn start(&self, n: usize) {
        self.run(&["start", &n.to_string()]);
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| *d != n);
    }

    fn mark_down(&self, n: usize) {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).push(n);
    }

    /// Closes the connections whose `connection_name` starts with `prefix`,
    /// on whichever node they are; how many.
    pub fn kill_connections_named(&self, prefix: &str) -> usize {
        let listing = self.ctl_any(&["list_connections", "pid", "client_properties", "-q"]);
        let mut closed = 0;
        for line in listing.lines() {
            if !line.contains(&format!("\"{prefix}")) {
                continue;
            }
            let Some(pid) = line.split('\t').next().filter(|p| p.starts_with('<')) else {
                continue;
            };
            self.ctl_any(&[
                "close_connection",
                pid,
                "fanout test: simulated connection loss",
            ]);
            closed += 1;
        }
        closed
    }

    /// The node holding the leader of each quorum queue named
    /// `{prefix}*`, as `rabbitmqctl list_queues name leader` says.
    pub fn leaders(&self, prefix: &str) -> Vec<(String, String)> {
        self.ctl_any(&["list_queues", "name", "leader", "-q", "--no-table-headers"])
            .lines()
            .filter_map(|l| {
                let mut cols = l.split('\t');
                let (name, leader) = (cols.next()?, cols.next()?);
                name.starts_with(prefix)
                    .then(|| (name.to_owned(), leader.trim().to_owned()))
            })
            .collect()
    }
}

/// Polls `cond` until it holds; how long that took. Panics after `within`.
pub async fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < within,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}
