//! A private 6-node Redis Cluster (3 primaries, one replica each) on
//! loopback, and the admin operations the tests, the benchmark and the
//! fault matrix need (kill a primary, wait for its failover, restart it,
//! kill named clients, purge a namespace).
//!
//! [`RedisCluster::start`] starts one of the caller's own;
//! [`RedisCluster::shared`] starts one per process on first use. Both need
//! `redis-server` and `bash` on `PATH` (not `redis-cli`: the cluster is
//! formed with plain commands). Every node is a child of a small `bash`
//! watchdog that `kill -9`s it and removes its directory as soon as the
//! process is gone, however it ended (a panic, an abort, SIGKILL), or the
//! cluster is dropped or stopped. The base port is one of 7101, 7201, …
//! 9001: the first whose lock file (`{temp}/fanout-redis-cluster-{base}.lock`,
//! held for the life of the cluster) is free and whose six ports and
//! cluster bus ports (+10000) are free, so concurrent processes, and
//! `scripts/redis-cluster` (which refuses to touch a base whose lock is
//! held), never collide.
//!
//! Nothing here is bound to a Tokio runtime (every `#[tokio::test]` has its
//! own): each call opens its own short-lived connections. Waits use
//! `tokio::time`, so not under `start_paused`.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::process::{self, Stopping};
pub use crate::ClusterError;

/// Nodes of the cluster: ports `base..base + 6`.
const NODES: u16 = 6;
/// Primaries at creation: `base..base + 3`; `base + 3 + i` replicates `base + i`.
const PRIMARIES: u16 = 3;
const SLOTS: u16 = 16384;
/// `cluster-node-timeout`: a killed primary is failed over in 3.2–5 s.
const NODE_TIMEOUT_MS: u64 = 2000;
/// Lock files are `{temp}/fanout-redis-cluster-{base}.lock`, the name
/// `scripts/redis-cluster` checks.
const LOCK_NAME: &str = "fanout-redis-cluster";
const FIRST_BASE: u16 = 7101;
const BASE_STEP: u16 = 100;
const BASE_CANDIDATES: u16 = 20;
/// Bound on forming the cluster and on a restarted node's rejoining.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a started node's first answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on each admin command to one node.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);

/// Serializes the callers that kill nodes (see [`RedisCluster::faults`]).
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The one cluster of this process, or why there is none (repeated to
/// every caller that asks).
static SHARED: OnceCell<Result<RedisCluster, ClusterError>> = OnceCell::const_new();

/// A running cluster; see the module documentation. Dropping it (or
/// [`RedisCluster::stop`]) kills its nodes and frees its base.
#[derive(Debug)]
pub struct RedisCluster {
    /// Comma-separated `redis://127.0.0.1:PORT` URLs of the three primaries
    /// at creation: what `FANOUT_REDIS_URL` / `RedisConfig::url` take. After
    /// a failover one of them may be a replica or dead; a cluster client
    /// finds the rest from any live seed.
    pub seeds: String,
    /// First port; the nodes are `base..base + 6`.
    pub base: u16,
    dir: PathBuf,
    nodes: Mutex<Nodes>,
    /// Held (flock) while the cluster runs: this base is ours. Dropped after
    /// the nodes are gone (fields drop after [`Drop::drop`]).
    _lock: File,
}

#[derive(Debug, Default)]
struct Nodes {
    /// The watchdog of each node started, by port, with the write end of
    /// its stdin: kept open while the cluster runs.
    watchdogs: HashMap<u16, Child>,
    /// The redis-server pid of each running node, by port.
    pids: HashMap<u16, u32>,
    /// Ports killed by [`RedisCluster::kill_primary_of`] and not restarted.
    down: HashSet<u16>,
}

/// A primary killed by [`RedisCluster::kill_primary_of`]; give it to
/// [`RedisCluster::wait_failover`] and then to [`RedisCluster::restart`].
#[derive(Debug, Clone)]
pub struct KilledNode {
    /// Its port (`redis://127.0.0.1:{port}`).
    pub port: u16,
    /// Its cluster node id.
    pub node_id: String,
    /// The slot of the key it was killed for.
    pub slot: u16,
    /// Ports of the replicas it had: one of them takes over.
    pub replicas: Vec<u16>,
    /// When the SIGKILL was sent.
    pub killed_at: Instant,
}

/// What [`RedisCluster::wait_failover`] waits for: the slot of a key, a
/// slot, or a [`KilledNode`] (then the time is counted from the kill, and
/// its port must no longer be the slot's primary).
#[derive(Debug, Clone)]
pub enum FailoverOf {
    Key(String),
    Slot(u16),
    Killed { slot: u16, port: u16, at: Instant },
}

impl From<&str> for FailoverOf {
    fn from(key: &str) -> Self {
        Self::Key(key.to_owned())
    }
}

impl From<u16> for FailoverOf {
    fn from(slot: u16) -> Self {
        Self::Slot(slot)
    }
}

impl From<&KilledNode> for FailoverOf {
    fn from(k: &KilledNode) -> Self {
        Self::Killed {
            slot: k.slot,
            port: k.port,
            at: k.killed_at,
        }
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// Node id of its primary (replicas only).
    primary_of: Option<String>,
    /// Slot ranges it serves, inclusive.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn is_primary(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    fn failing(&self) -> bool {
        self.flags
            .iter()
            .any(|f| f == "fail" || f == "fail?" || f == "handshake" || f == "noaddr")
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

fn failed(why: impl Into<String>) -> ClusterError {
    ClusterError::Failed(why.into())
}

impl RedisCluster {
    /// Takes a free base, starts the six nodes and forms the cluster, so
    /// callers start from a healthy 3 + 3 layout. [`ClusterError::Missing`]
    /// when `redis-server` or `bash` is not installed. A cluster that fails
    /// to form is torn down before the error returns.
    pub async fn start() -> Result<RedisCluster, ClusterError> {
        process::installed(
            "redis-server",
            "install Redis 7 to run a local Redis Cluster",
        )?;
        let (base, lock) = process::take_base(
            LOCK_NAME,
            (0..BASE_CANDIDATES).map(|i| FIRST_BASE + i * BASE_STEP),
            |base| {
                (base..base + NODES)
                    .flat_map(|p| [p, p + 10_000])
                    .collect()
            },
        )
        .ok_or_else(|| {
            failed(format!(
                "no free base port among {FIRST_BASE}, {}, … {} (each needs 6 ports and their bus ports +10000)",
                FIRST_BASE + BASE_STEP,
                FIRST_BASE + (BASE_CANDIDATES - 1) * BASE_STEP
            ))
        })?;
        let dir = std::env::temp_dir().join(format!(
            "fanout-redis-cluster-test-{}-{base}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(format!("create {}: {e}", dir.display())))?;
        let seeds = (0..PRIMARIES)
            .map(|i| Self::url_of(base + i))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = Self {
            seeds,
            base,
            dir,
            nodes: Mutex::new(Nodes::default()),
            _lock: lock,
        };
        for port in cluster.ports() {
            cluster.spawn_node(port)?;
        }
        for port in cluster.ports() {
            cluster.await_node(port).await?;
        }
        cluster.form().await?;
        Ok(cluster)
    }

    /// The cluster of this process, started by the first caller (the
    /// others wait); every caller gets the same cluster, or the same error.
    /// Never stopped: its nodes end with the process (the watchdogs).
    pub async fn shared() -> Result<&'static RedisCluster, ClusterError> {
        SHARED
            .get_or_init(Self::start)
            .await
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Every node's port, primaries and replicas, dead or alive.
    pub fn ports(&self) -> Vec<u16> {
        (self.base..self.base + NODES).collect()
    }

    /// `redis://127.0.0.1:{port}`: one node, for callers that talk to one
    /// node directly.
    pub fn url_of(port: u16) -> String {
        format!("redis://127.0.0.1:{port}")
    }

    /// The pid of each running redis-server, by port (sorted), for per-node
    /// CPU figures; a killed node is absent until restarted.
    pub fn node_pids(&self) -> Vec<(u16, u32)> {
        let mut pids: Vec<(u16, u32)> = self.lock().pids.iter().map(|(&p, &i)| (p, i)).collect();
        pids.sort_unstable();
        pids
    }

    /// Ports believed running (not killed and not yet restarted), so admin
    /// calls do not wait on dead nodes.
    fn live(&self) -> Vec<u16> {
        let down = self.lock().down.clone();
        self.ports()
            .into_iter()
            .filter(|p| !down.contains(p))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Nodes> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts one node (fresh, or again from its `nodes.conf`) under a
    /// watchdog, so it cannot outlive the process or the cluster.
    fn spawn_node(&self, port: u16) -> Result<(), ClusterError> {
        let node_dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir)
            .map_err(|e| failed(format!("create {}: {e}", node_dir.display())))?;
        let mut command: Vec<OsString> = [
            "redis-server",
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &format!("nodes-{port}.conf"),
            "--cluster-node-timeout",
            &NODE_TIMEOUT_MS.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            // A rejoining node syncs at once, not after the 5 s default.
            "--repl-diskless-sync-delay",
            "0",
            "--daemonize",
            "no",
            "--dir",
        ]
        .map(OsString::from)
        .into();
        command.push(node_dir.clone().into_os_string());
        command.push("--logfile".into());
        command.push(node_dir.join("log").into_os_string());
        let child =
            process::spawn_watched("fanout-redis-cluster-node", command, &node_dir, &self.dir)?;
        if let Some(mut old) = self.lock().watchdogs.insert(port, child) {
            // The previous watchdog ended with its node; reap it.
            let _ = old.wait();
        }
        Ok(())
    }

    /// Waits until a started node answers, and notes its pid for a later
    /// kill -9.
    async fn await_node(&self, port: u16) -> Result<(), ClusterError> {
        let started = Instant::now();
        loop {
            if let Ok(info) = query::<String>(port, redis::cmd("INFO").arg("server")).await {
                let pid = info_field(&info, "process_id")
                    .and_then(|p| p.parse::<u32>().ok())
                    .ok_or_else(|| failed(format!("no process_id in INFO of port {port}")))?;
                let mut nodes = self.lock();
                nodes.pids.insert(port, pid);
                nodes.down.remove(&port);
                return Ok(());
            }
            if started.elapsed() > ANSWER_TIMEOUT {
                return Err(failed(format!(
                    "redis-server on port {port} does not answer after {ANSWER_TIMEOUT:?} (log: {})",
                    self.dir.join(port.to_string()).join("log").display()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Forms the cluster with plain commands (what `redis-cli --cluster
    /// create` does), with a fixed layout: primary `base + i` owns the
    /// i-th third of the slots and `base + 3 + i` replicates it.
    async fn form(&self) -> Result<(), ClusterError> {
        let ranges = [(0u16, 5460u16), (5461, 10922), (10923, SLOTS - 1)];
        for (i, port) in self.ports().into_iter().enumerate() {
            let epoch = i + 1;
            query::<()>(
                port,
                redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(epoch),
            )
            .await
            .map_err(|e| failed(format!("CLUSTER SET-CONFIG-EPOCH: {e}")))?;
        }
        for (port, &(from, to)) in (self.base..).zip(ranges.iter()) {
            query::<()>(
                port,
                redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(from).arg(to),
            )
            .await
            .map_err(|e| failed(format!("CLUSTER ADDSLOTSRANGE: {e}")))?;
        }
        for port in self.ports().into_iter().skip(1) {
            query::<()>(
                self.base,
                redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(port),
            )
            .await
            .map_err(|e| failed(format!("CLUSTER MEET {port}: {e}")))?;
        }
        let started = Instant::now();
        for i in 0..PRIMARIES {
            let primary = self.base + i;
            let replica = self.base + PRIMARIES + i;
            let id: String = query(primary, redis::cmd("CLUSTER").arg("MYID"))
                .await
                .map_err(|e| failed(format!("CLUSTER MYID: {e}")))?;
            // The replica must have learnt of the primary by gossip first.
            loop {
                match query::<()>(replica, redis::cmd("CLUSTER").arg("REPLICATE").arg(&id)).await {
                    Ok(()) => break,
                    Err(e) if started.elapsed() > SETTLE_TIMEOUT => {
                        return Err(failed(format!("CLUSTER REPLICATE: {e}")));
                    }
                    Err(_) => tokio::time::sleep(POLL).await,
                }
            }
        }
        self.settle(started, SETTLE_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|why| failed(format!("the new cluster did not settle: {why}")))
    }

    /// Waits until every node is up and agrees on a healthy 3 + 3 cluster,
    /// so the next fault starts from the same state as the first;
    /// [`ClusterError::Timeout`] (with every node's view) after `timeout`.
    async fn settle(&self, since: Instant, timeout: Duration) -> Result<Duration, ClusterError> {
        loop {
            let why = match self.healthy().await {
                Ok(()) => return Ok(since.elapsed()),
                Err(why) => why,
            };
            if since.elapsed() > timeout {
                return Err(ClusterError::Timeout(format!(
                    "{why} (after {:?}){}",
                    since.elapsed(),
                    self.dump().await
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `Ok` when every running node says `cluster_state:ok`, serves every
    /// slot, and all agree on the same 3 primaries (which say
    /// `role:master`) and the replicas (link up) with nothing failing but
    /// the nodes still down: the state failover tests rely on. Agreement
    /// matters after a restart, when the returning node briefly still
    /// believes it is the primary. `Err` says what is not healthy yet.
    async fn healthy(&self) -> Result<(), String> {
        let down = self.lock().down.clone();
        let mut agreed: Option<Vec<u16>> = None;
        let mut masters = Vec::new();
        for port in self.live() {
            let info: String = query(port, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .map_err(|e| e.to_string())?;
            for (field, want) in [
                ("cluster_state", "ok".to_owned()),
                ("cluster_slots_ok", SLOTS.to_string()),
                ("cluster_known_nodes", NODES.to_string()),
            ] {
                let got = info_field(&info, field).unwrap_or("?");
                if got != want {
                    return Err(format!("port {port}: {field}:{got}"));
                }
            }
            let mut view = nodes_of(port).await.map_err(|e| e.to_string())?;
            view.retain(|n| !down.contains(&n.port));
            if let Some(bad) = view.iter().find(|n| n.failing()) {
                return Err(format!("port {port} sees {} as {:?}", bad.port, bad.flags));
            }
            let mut primaries: Vec<u16> = view
                .iter()
                .filter(|n| n.is_primary() && !n.slots.is_empty())
                .map(|n| n.port)
                .collect();
            primaries.sort_unstable();
            let replicas = view.iter().filter(|n| n.primary_of.is_some()).count();
            if primaries.len() != usize::from(PRIMARIES)
                || replicas != usize::from(NODES - PRIMARIES) - down.len()
            {
                return Err(format!(
                    "port {port} sees primaries {primaries:?} and {replicas} replicas"
                ));
            }
            match &agreed {
                None => agreed = Some(primaries),
                Some(first) if *first != primaries => {
                    return Err(format!(
                        "nodes disagree on the primaries: {first:?} vs {primaries:?} (port {port})"
                    ));
                }
                Some(_) => {}
            }
            let repl: String = query(port, redis::cmd("INFO").arg("replication"))
                .await
                .map_err(|e| e.to_string())?;
            match info_field(&repl, "role") {
                Some("master") => masters.push(port),
                Some("slave") if info_field(&repl, "master_link_status") == Some("up") => {}
                Some("slave") => return Err(format!("replica {port}: link to its primary not up")),
                other => return Err(format!("port {port}: role {other:?}")),
            }
        }
        if agreed.as_ref() != Some(&masters) {
            return Err(format!(
                "primaries by CLUSTER NODES {agreed:?}, by role {masters:?}"
            ));
        }
        Ok(())
    }

    /// `CLUSTER NODES` of every live node, for the message of a wait that
    /// timed out.
    async fn dump(&self) -> String {
        let mut out = String::new();
        for port in self.live() {
            let text = query::<String>(port, redis::cmd("CLUSTER").arg("NODES"))
                .await
                .unwrap_or_else(|e| format!("{e}\n"));
            let _ = write!(out, "\nCLUSTER NODES as {port} sees it:\n{text}");
        }
        out
    }

    /// The cluster as one live node sees it, the first that answers.
    async fn view(&self) -> Result<Vec<NodeLine>, ClusterError> {
        let mut last = String::from("no live node");
        for port in self.live() {
            match nodes_of(port).await {
                Ok(v) => return Ok(v),
                Err(e) => last = e.to_string(),
            }
        }
        Err(failed(format!(
            "no node of the cluster answers CLUSTER NODES: {last}"
        )))
    }

    /// The slot a key hashes to, asked of Redis so hash tags count exactly
    /// as the cluster counts them.
    async fn slot_of(&self, key: &str) -> Result<u16, ClusterError> {
        let mut last = String::from("no live node");
        for port in self.live() {
            match query::<u16>(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await {
                Ok(slot) => return Ok(slot),
                Err(e) => last = e.to_string(),
            }
        }
        Err(failed(format!(
            "no node of the cluster answers CLUSTER KEYSLOT: {last}"
        )))
    }

    /// Ports of the primaries now serving slots, sorted: which nodes a
    /// caller may kill, and where the keys are.
    pub async fn primaries(&self) -> Result<Vec<u16>, ClusterError> {
        let live = self.live();
        let mut ports: Vec<u16> = self
            .view()
            .await?
            .into_iter()
            .filter(|n| n.is_primary() && !n.slots.is_empty() && !n.failing())
            .map(|n| n.port)
            .filter(|p| live.contains(p))
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// Held by a caller while it kills and restarts nodes: two node-loss
    /// tests at once in one binary would take each other's replicas, and
    /// tests that need a healthy cluster can hold it too (the tests of a
    /// binary run in parallel). One lock per process, for every cluster.
    pub async fn faults(&self) -> tokio::sync::MutexGuard<'static, ()> {
        FAULTS.lock().await
    }

    /// Kills (SIGKILL, no goodbye to the cluster) the primary that serves
    /// `key`, as a crashed machine would; [`ClusterError::Failed`] if it
    /// has no replica to take over (restart the previous victim first).
    pub async fn kill_primary_of(&self, key: &str) -> Result<KilledNode, ClusterError> {
        let slot = self.slot_of(key).await?;
        let view = self.view().await?;
        let primary = view
            .iter()
            .find(|n| n.is_primary() && !n.failing() && n.serves(slot))
            .ok_or_else(|| failed(format!("no live primary serves slot {slot} (key {key:?})")))?
            .clone();
        let replicas: Vec<u16> = view
            .iter()
            .filter(|n| n.primary_of.as_deref() == Some(primary.id.as_str()) && !n.failing())
            .map(|n| n.port)
            .collect();
        if replicas.is_empty() {
            return Err(failed(format!(
                "primary {} (slot {slot}) has no live replica to promote: restart the node killed before",
                primary.port
            )));
        }
        let pid = self
            .lock()
            .pids
            .get(&primary.port)
            .copied()
            .ok_or_else(|| failed(format!("no pid known for port {}", primary.port)))?;
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .map_err(|e| failed(format!("cannot run kill: {e}")))?;
        let killed_at = Instant::now();
        if !status.success() {
            return Err(failed(format!(
                "kill -9 {pid} (port {}) failed: {status}",
                primary.port
            )));
        }
        {
            let mut nodes = self.lock();
            nodes.down.insert(primary.port);
            nodes.pids.remove(&primary.port);
        }
        // Gone once its port refuses connections.
        while std::net::TcpStream::connect(("127.0.0.1", primary.port)).is_ok() {
            if killed_at.elapsed() > Duration::from_secs(5) {
                return Err(failed(format!(
                    "port {} still accepts connections 5 s after kill -9",
                    primary.port
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(KilledNode {
            port: primary.port,
            node_id: primary.id,
            slot,
            replicas,
            killed_at,
        })
    }

    /// Waits until the slot is served by a live primary again (for a
    /// [`KilledNode`]: not the killed one, i.e. a replica was promoted) and
    /// every live node says `cluster_state:ok`; returns how long that took
    /// (from the kill for a [`KilledNode`], else from the call).
    /// [`ClusterError::Timeout`] after `timeout`, with every node's view.
    pub async fn wait_failover(
        &self,
        of: impl Into<FailoverOf>,
        timeout: Duration,
    ) -> Result<Duration, ClusterError> {
        let called = Instant::now();
        let (slot, dead, since) = match of.into() {
            FailoverOf::Key(key) => (self.slot_of(&key).await?, None, called),
            FailoverOf::Slot(slot) => (slot, None, called),
            FailoverOf::Killed { slot, port, at } => (slot, Some(port), at),
        };
        loop {
            let live = self.live();
            let mut ok = true;
            for &port in &live {
                let state = query::<String>(port, redis::cmd("CLUSTER").arg("INFO"))
                    .await
                    .ok()
                    .and_then(|i| {
                        Some((
                            info_field(&i, "cluster_state")? == "ok",
                            info_field(&i, "cluster_slots_ok")? == SLOTS.to_string(),
                        ))
                    });
                if state != Some((true, true)) {
                    ok = false;
                    break;
                }
            }
            if ok {
                // A node that does not answer now is a failover not done yet.
                let owner = self.view().await.ok().and_then(|view| {
                    view.into_iter()
                        .find(|n| n.is_primary() && !n.failing() && n.serves(slot))
                        .map(|n| n.port)
                });
                ok = owner.is_some_and(|p| live.contains(&p) && Some(p) != dead);
            }
            if ok {
                return Ok(since.elapsed());
            }
            if called.elapsed() >= timeout {
                return Err(ClusterError::Timeout(format!(
                    "no failover of slot {slot} within {timeout:?}{}",
                    self.dump().await
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts a killed node again from its `nodes.conf` (it rejoins as a
    /// replica of the node promoted in its place) and waits until every
    /// running node agrees the cluster is healthy, so later faults start
    /// from the same state; returns how long the rejoin took.
    pub async fn restart(&self, killed: KilledNode) -> Result<Duration, ClusterError> {
        let started = Instant::now();
        let port = killed.port;
        self.spawn_node(port)?;
        self.await_node(port).await?;
        self.settle(started, SETTLE_TIMEOUT)
            .await
            .map_err(|e| match e {
                ClusterError::Timeout(why) => ClusterError::Timeout(format!(
                    "cluster not healthy after restarting port {port}: {why}"
                )),
                other => other,
            })
    }

    /// Kills (`CLIENT KILL ID`) on every live node each client whose
    /// `CLIENT LIST` line has a field starting with `name_prefix` (for
    /// example `name=ns:sub:`), as the standalone Redis tests do; a cluster
    /// client holds connections to several nodes. Returns how many.
    pub async fn kill_clients(&self, name_prefix: &str) -> Result<usize, ClusterError> {
        let mut killed = 0;
        for port in self.live() {
            let list: String = query(port, redis::cmd("CLIENT").arg("LIST")).await?;
            for id in client_ids(&list, name_prefix) {
                let n: i64 =
                    query(port, redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id)).await?;
                killed += usize::try_from(n).unwrap_or(0);
            }
        }
        Ok(killed)
    }

    /// Deletes every key `{namespace}:*` on every primary: a key lives on
    /// the primary of its slot, so one SCAN per primary finds them all, and
    /// one UNLINK per key avoids CROSSSLOT. Every primary is tried even
    /// when one fails (the first error is returned); returns how many keys
    /// went.
    pub async fn purge(&self, namespace: &str) -> Result<u64, ClusterError> {
        let mut deleted = 0;
        let mut first_error = None;
        for port in self.primaries().await? {
            match tokio::time::timeout(SETTLE_TIMEOUT, purge_node(port, namespace)).await {
                Ok(Ok(n)) => deleted += n,
                Ok(Err(e)) => {
                    first_error.get_or_insert_with(|| {
                        failed(format!("purge {namespace} on port {port}: {e}"))
                    });
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| {
                        ClusterError::Timeout(format!(
                            "purge {namespace} on port {port}: not done in {SETTLE_TIMEOUT:?}"
                        ))
                    });
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }

    /// Kills every node, waits until they are gone and frees the base: what
    /// dropping the cluster does, without blocking the runtime.
    pub async fn stop(self) {
        let mut stopping = self.hang_up();
        let pids = self.lock().pids.clone();
        while !stopping.poll(&pids) {
            tokio::time::sleep(POLL).await;
        }
        self.lock().pids.clear();
        // Drop removes the directory and releases the lock.
    }

    /// Closes every watchdog's pipe, so each kills its node.
    fn hang_up(&self) -> Stopping {
        Stopping::new(std::mem::take(&mut self.lock().watchdogs))
    }
}

impl Drop for RedisCluster {
    /// Kills the nodes and waits (briefly: a kill -9 each) until they are
    /// gone, so the base's ports are free once the lock is released.
    fn drop(&mut self) {
        let mut stopping = self.hang_up();
        let pids = self.lock().pids.clone();
        while !stopping.poll(&pids) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Killed nodes never restarted keep their files; nothing else
        // would remove them.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The ids of the clients in `CLIENT LIST` output with a field starting
/// with `name_prefix`.
fn client_ids<'a>(list: &'a str, name_prefix: &'a str) -> impl Iterator<Item = &'a str> {
    list.lines()
        .filter(move |l| l.split_whitespace().any(|f| f.starts_with(name_prefix)))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
}

/// One primary's share of [`RedisCluster::purge`]: how many keys went.
async fn purge_node(port: u16, namespace: &str) -> redis::RedisResult<u64> {
    let mut conn = connect(port).await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("UNLINK").arg(key);
            }
            let gone: Vec<u64> = pipe.query_async(&mut conn).await?;
            deleted += gone.iter().sum::<u64>();
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// A fresh connection to one node, in the caller's runtime.
async fn connect(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(RedisCluster::url_of(port))?;
    match tokio::time::timeout(CALL_TIMEOUT, client.get_multiplexed_async_connection()).await {
        Ok(conn) => conn,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to port {port}: no answer in {CALL_TIMEOUT:?}"),
        ))),
    }
}

/// One command to one node, bounded by [`CALL_TIMEOUT`], so a hung node
/// fails a wait instead of hanging the caller.
async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, ClusterError> {
    let call = async {
        let mut conn = connect(port).await?;
        cmd.query_async::<T>(&mut conn).await
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(failed(format!("port {port}: {e}"))),
        Err(_) => Err(failed(format!(
            "port {port}: no answer in {CALL_TIMEOUT:?}"
        ))),
    }
}

/// `CLUSTER NODES` of one node, parsed.
async fn nodes_of(port: u16) -> Result<Vec<NodeLine>, ClusterError> {
    let text: String = query(port, redis::cmd("CLUSTER").arg("NODES")).await?;
    Ok(text.lines().filter_map(parse_node_line).collect())
}

/// `<id> <ip:port@bus> <flags> <primary|-> <ping> <pong> <epoch> <link>
/// <slot>…`; slots being migrated (`[…]`) are not served yet, so skipped.
fn parse_node_line(line: &str) -> Option<NodeLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        return None;
    }
    let addr = f[1].split('@').next()?;
    let port = addr.rsplit(':').next()?.parse().ok()?;
    let slots = f[8..]
        .iter()
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|x| (x, x)),
        })
        .collect();
    Some(NodeLine {
        id: f[0].to_owned(),
        port,
        flags: f[2].split(',').map(str::to_owned).collect(),
        primary_of: (f[3] != "-").then(|| f[3].to_owned()),
        slots,
    })
}

/// A `name:value` line of `INFO` or `CLUSTER INFO`.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_primary_with_slots_and_a_migrating_one() {
        let line = "07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:7101@17101 myself,master - 0 1426238317239 1 connected 0-5460 7000 [5461->-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]";
        let n = parse_node_line(line).expect("a node line");
        assert_eq!(n.port, 7101);
        assert_eq!(n.flags, ["myself", "master"]);
        assert_eq!(n.primary_of, None);
        assert_eq!(n.slots, [(0, 5460), (7000, 7000)]);
        assert!(n.is_primary() && !n.failing());
        assert!(n.serves(5460) && n.serves(7000) && !n.serves(5461));
    }

    #[test]
    fn parses_a_failing_replica_with_a_hostname() {
        let line = "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:7104@17104,redis-4 slave,fail? 07c37dfeb235213a872192d90877d0cd55635b91 0 1426238316232 4 connected";
        let n = parse_node_line(line).expect("a node line");
        assert_eq!(n.port, 7104);
        assert_eq!(
            n.primary_of.as_deref(),
            Some("07c37dfeb235213a872192d90877d0cd55635b91")
        );
        assert!(n.slots.is_empty());
        assert!(!n.is_primary() && n.failing());
    }

    #[test]
    fn skips_short_lines() {
        assert_eq!(parse_node_line(""), None);
        assert_eq!(parse_node_line("abc 127.0.0.1:7101@17101 master -"), None);
    }

    #[test]
    fn reads_info_fields() {
        let info = "# Cluster\r\ncluster_state:ok\r\ncluster_slots_ok:16384\r\n";
        assert_eq!(info_field(info, "cluster_state"), Some("ok"));
        assert_eq!(info_field(info, "cluster_slots_ok"), Some("16384"));
        assert_eq!(info_field(info, "cluster_slots"), None);
    }

    #[test]
    fn finds_clients_by_name_prefix() {
        let list = "id=3 addr=127.0.0.1:1 name=ns:sub:g1 db=0\nid=4 addr=127.0.0.1:2 name=other db=0\nid=5 addr=127.0.0.1:3 name=ns:sub:g2 db=0\n";
        let ids: Vec<&str> = client_ids(list, "name=ns:sub:").collect();
        assert_eq!(ids, ["3", "5"]);
    }
}
