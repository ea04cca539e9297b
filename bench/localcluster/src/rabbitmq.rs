//! A three-node RabbitMQ cluster on loopback, run by
//! `scripts/rabbitmq-cluster` (nodes fr1..fr3@localhost, AMQP 5681..5683),
//! and the admin operations the tests, the benchmark and the fault matrix
//! need (kill, stop or start a node, close named connections, list quorum
//! leaders).
//!
//! - Starting takes about 30 s. [`RabbitCluster::shared`] starts one per
//!   process on first use (the tests); [`RabbitCluster::start`] starts one
//!   the caller stops (the benchmark, one target at a time).
//! - `FANOUT_RABBITMQ_CLUSTER_URLS` (the output of `scripts/rabbitmq-cluster
//!   urls`) makes both use a cluster already running, started with
//!   `scripts/rabbitmq-cluster up` (by a person, or once by `.ci/run` for
//!   every test binary), and leave it running. `FANOUT_RMQ_CLUSTER_DIR`
//!   then names its directory, for kills and restarts.
//! - Node names and ports are fixed, so only one cluster can run on a
//!   machine: a file lock makes two processes wait for each other, and a
//!   reaper process (which outlives a killed test binary) stops the nodes
//!   and deletes their directory once the process is gone.
//!
//! The script is compiled in, so a binary runs it from anywhere; it needs
//! `rabbitmq-server` installed and root (or the `rabbitmq` user).
//! Every method that runs the script blocks (a node start takes seconds):
//! call it from `spawn_blocking` in async code.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::OnceCell;

pub use crate::ClusterError;

/// The script, run as `sh -c SCRIPT rabbitmq-cluster ARGS...`.
const SCRIPT: &str = include_str!("../../../scripts/rabbitmq-cluster");
/// Held for the life of a cluster a process started.
const LOCK: &str = "/tmp/fanout-rmq-cluster.lock";
/// Where a cluster started here lives (not the script's default, so that a
/// cluster a person started by hand is not deleted under them).
const OWN_DIR: &str = "/tmp/fanout-rmq-cluster-test";
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Bound on `up` (three nodes, then `join_cluster`).
const UP_TIMEOUT_SECS: &str = "300";
/// Bound on every other script command (a node start is the longest).
const RUN_TIMEOUT_SECS: &str = "180";

/// The cluster's nodes: 1, 2, 3.
pub const NODES: [usize; 3] = [1, 2, 3];
/// A running cluster's URL list; see the module documentation.
pub const URLS_ENV: &str = "FANOUT_RABBITMQ_CLUSTER_URLS";
/// A running cluster's directory; see the module documentation.
pub const DIR_ENV: &str = "FANOUT_RMQ_CLUSTER_DIR";

static SHARED: OnceCell<Result<RabbitCluster, ClusterError>> = OnceCell::const_new();
/// Whether this process holds [`LOCK`]: a second start here would wait for
/// itself forever.
static HELD_HERE: AtomicBool = AtomicBool::new(false);

/// A running cluster; see the module documentation. A cluster this process
/// started is stopped by [`RabbitCluster::stop`], on drop, or by its reaper
/// when the process ends; one found running is left running.
#[derive(Debug)]
pub struct RabbitCluster {
    dir: PathBuf,
    urls: Vec<String>,
    /// Nodes killed or stopped and not started again.
    down: Mutex<Vec<usize>>,
    /// The lock and the reaper, when this process started the cluster.
    own: Option<Owned>,
}

#[derive(Debug)]
struct Owned {
    _lock: File,
    reaper: Child,
}

fn failed(why: impl Into<String>) -> ClusterError {
    ClusterError::Failed(why.into())
}

/// `sh -c SCRIPT rabbitmq-cluster args` on the cluster in `dir`, bounded by
/// `timeout`; its stdout.
fn script(dir: &Path, timeout: &str, args: &[&str]) -> Result<String, ClusterError> {
    let out = Command::new("timeout")
        .arg(timeout)
        .args(["sh", "-c", SCRIPT, "rabbitmq-cluster"])
        .args(args)
        .env(DIR_ENV, dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot run sh for scripts/rabbitmq-cluster: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "scripts/rabbitmq-cluster {}: {}{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RabbitCluster {
    /// The cluster `FANOUT_RABBITMQ_CLUSTER_URLS` names, or a new one this
    /// caller owns (waiting for another process's to be stopped first).
    /// [`ClusterError::Missing`] when RabbitMQ is not installed.
    pub async fn start() -> Result<RabbitCluster, ClusterError> {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .map_err(|e| failed(format!("the cluster start task: {e}")))?
    }

    /// One cluster per process, started on first use; every caller gets
    /// the same one (or the same error).
    pub async fn shared() -> Result<&'static RabbitCluster, ClusterError> {
        SHARED
            .get_or_init(Self::start)
            .await
            .as_ref()
            .map_err(Clone::clone)
    }

    fn start_blocking() -> Result<RabbitCluster, ClusterError> {
        if let Ok(list) = std::env::var(URLS_ENV) {
            let urls: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
            if urls.len() != NODES.len() || urls.iter().any(String::is_empty) {
                return Err(failed(format!(
                    "{URLS_ENV} must list the {} nodes' URLs (scripts/rabbitmq-cluster urls), got {list:?}",
                    NODES.len()
                )));
            }
            return Ok(RabbitCluster {
                dir: std::env::var_os(DIR_ENV)
                    .map_or_else(|| PathBuf::from("/tmp/fanout-rmq-cluster"), PathBuf::from),
                urls,
                down: Mutex::default(),
                own: None,
            });
        }
        if !Path::new(SERVER).exists() {
            return Err(ClusterError::Missing(format!(
                "rabbitmq-server is not installed ({SERVER})"
            )));
        }
        if HELD_HERE.swap(true, Ordering::SeqCst) {
            return Err(failed(
                "this process already runs a RabbitMQ cluster (node names are fixed): stop it first, or use RabbitCluster::shared",
            ));
        }
        let started = Self::own_blocking();
        if started.is_err() {
            HELD_HERE.store(false, Ordering::SeqCst);
        }
        started
    }

    fn own_blocking() -> Result<RabbitCluster, ClusterError> {
        let lock = File::create(LOCK).map_err(|e| failed(format!("cannot create {LOCK}: {e}")))?;
        // Another process runs the nodes: wait for it to finish.
        lock.lock()
            .map_err(|e| failed(format!("cannot lock {LOCK}: {e}")))?;
        // The reaper outlives this process, whatever ends it, and then
        // takes the lock itself before stopping the nodes, so it never
        // stops the cluster of a process that started after this one.
        let reaper = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             exec flock {LOCK} sh -c \"$RMQ_CLUSTER_SCRIPT\" rabbitmq-cluster down",
            pid = std::process::id(),
        );
        let reaper = Command::new("setsid")
            .args(["sh", "-c", &reaper])
            .env("RMQ_CLUSTER_SCRIPT", SCRIPT)
            .env(DIR_ENV, OWN_DIR)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| failed(format!("cannot start the reaper (setsid sh): {e}")))?;
        let mut cluster = RabbitCluster {
            dir: PathBuf::from(OWN_DIR),
            urls: NODES
                .iter()
                .map(|&n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", amqp_port(n)))
                .collect(),
            down: Mutex::default(),
            own: Some(Owned {
                _lock: lock,
                reaper,
            }),
        };
        let t0 = Instant::now();
        eprintln!("starting a 3-node RabbitMQ cluster (about 30 s)...");
        match script(&cluster.dir, UP_TIMEOUT_SECS, &["up"]) {
            Ok(_) => {
                eprintln!("RabbitMQ cluster up in {:.1} s", t0.elapsed().as_secs_f64());
                Ok(cluster)
            }
            Err(e) => {
                cluster.halt();
                Err(e)
            }
        }
    }

    /// Whether this process started the cluster (and stops it).
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// The comma-separated URLs of every node: what `FANOUT_RABBITMQ_URL`
    /// holds for a cluster.
    pub fn url_list(&self) -> String {
        self.urls.join(",")
    }

    /// The URL of node `n` alone.
    pub fn url(&self, n: usize) -> String {
        self.urls[n - 1].clone()
    }

    /// The node a URL points to, by its port.
    pub fn node_of(&self, url: &str) -> Option<usize> {
        NODES
            .into_iter()
            .find(|&n| url.contains(&format!(":{}/", amqp_port(n))))
    }

    /// Runs the script on this cluster.
    fn run(&self, args: &[&str]) -> Result<String, ClusterError> {
        script(&self.dir, RUN_TIMEOUT_SECS, args)
    }

    /// `rabbitmqctl -n fr{n}@localhost args`; its stdout.
    pub fn ctl(&self, n: usize, args: &[&str]) -> Result<String, ClusterError> {
        let n = n.to_string();
        let mut all = vec!["ctl", n.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `rabbitmqctl` on any node not killed or stopped.
    pub fn ctl_any(&self, args: &[&str]) -> Result<String, ClusterError> {
        let down = self.down_nodes();
        let n = NODES
            .into_iter()
            .find(|n| !down.contains(n))
            .ok_or_else(|| failed("every node is down"))?;
        self.ctl(n, args)
    }

    /// SIGKILLs node `n` (a crash: its data stays, it can be started
    /// again) and waits until its process is gone.
    pub fn kill(&self, n: usize) -> Result<(), ClusterError> {
        self.mark_down(n);
        self.run(&["kill", &n.to_string()]).map(drop)
    }

    /// Stops node `n` cleanly.
    pub fn stop_node(&self, n: usize) -> Result<(), ClusterError> {
        self.mark_down(n);
        self.run(&["stop", &n.to_string()]).map(drop)
    }

    /// Starts node `n` again and waits until it runs (it rejoins the
    /// cluster on its own).
    pub fn start_node(&self, n: usize) -> Result<(), ClusterError> {
        self.run(&["start", &n.to_string()])?;
        self.lock_down().retain(|d| *d != n);
        Ok(())
    }

    fn lock_down(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.down.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_down(&self, n: usize) {
        self.lock_down().push(n);
    }

    /// The nodes killed or stopped and not started again.
    pub fn down_nodes(&self) -> Vec<usize> {
        self.lock_down().clone()
    }

    /// The OS pid of each running node (the Erlang VM), for per-node CPU.
    pub fn node_pids(&self) -> Vec<(usize, u32)> {
        NODES
            .into_iter()
            .filter_map(|n| {
                let out = self.run(&["pid", &n.to_string()]).ok()?;
                let pid = out.lines().next()?.trim().parse().ok()?;
                Some((n, pid))
            })
            .collect()
    }

    /// Closes the connections whose `connection_name` starts with
    /// `prefix`, on whichever node they are; how many.
    pub fn kill_connections_named(&self, prefix: &str) -> Result<usize, ClusterError> {
        let listing = self.ctl_any(&["list_connections", "pid", "client_properties", "-q"])?;
        let mut closed = 0;
        for line in listing.lines() {
            if !line.contains(&format!("\"{prefix}")) {
                continue;
            }
            let Some(pid) = line.split('\t').next().filter(|p| p.starts_with('<')) else {
                continue;
            };
            self.ctl_any(&["close_connection", pid, "fanout: simulated connection loss"])?;
            closed += 1;
        }
        Ok(closed)
    }

    /// The node holding the leader of each quorum queue named `{prefix}*`,
    /// as `rabbitmqctl list_queues name leader` says.
    pub fn leaders(&self, prefix: &str) -> Result<Vec<(String, String)>, ClusterError> {
        Ok(self
            .ctl_any(&["list_queues", "name", "leader", "-q", "--no-table-headers"])?
            .lines()
            .filter_map(|l| {
                let mut cols = l.split('\t');
                let (name, leader) = (cols.next()?, cols.next()?);
                name.starts_with(prefix)
                    .then(|| (name.to_owned(), leader.trim().to_owned()))
            })
            .collect())
    }

    /// Stops the nodes and deletes their directory, if this process
    /// started them; a cluster found running is left running.
    pub async fn stop(mut self) {
        let _ = tokio::task::spawn_blocking(move || self.halt()).await;
    }

    /// [`RabbitCluster::stop`], blocking.
    fn halt(&mut self) {
        let Some(mut own) = self.own.take() else {
            return;
        };
        if let Err(e) = script(&self.dir, RUN_TIMEOUT_SECS, &["down"]) {
            eprintln!("stopping the RabbitMQ cluster: {e}");
        }
        // Its work is done; it would only wait for this process to end.
        let _ = own.reaper.kill();
        let _ = own.reaper.wait();
        drop(own);
        HELD_HERE.store(false, Ordering::SeqCst);
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Node `n`'s AMQP port.
pub fn amqp_port(n: usize) -> u16 {
    5680 + n as u16
}

/// The node listening on AMQP port `port`, if one of the cluster's.
pub fn node_of_port(port: u16) -> Option<usize> {
    NODES.into_iter().find(|&n| amqp_port(n) == port)
}
