//! A private 6-node Redis Cluster (3 primaries, one replica each) per test
//! process, for the cluster conformance suite and the node-loss fault
//! tests, and the admin operations those tests need (kill a primary, wait
//! for its failover, restart it, kill named clients, purge a namespace).
//!
//! [`shared`] starts it on first use; it needs `redis-server` and `bash`
//! on `PATH` (not `redis-cli`: the cluster is formed with plain commands).
//! Every node is a child of a small `bash` watchdog that `kill -9`s it and
//! removes its directory as soon as the test process is gone, however it
//! ended (a panic, an abort, SIGKILL). The base port is one of 7101, 7201,
//! … 9001: the first whose lock file
//! (`{temp}/fanout-redis-cluster-{base}.lock`, held for the life of the
//! process) is free and whose six ports and cluster bus ports (+10000) are
//! free, so concurrent test processes, and `scripts/redis-cluster` (which
//! refuses to touch a base whose lock is held), never collide.
//!
//! Nothing here is bound to a Tokio runtime (every `#[tokio::test]` has its
//! own): each call opens its own short-lived connections. Waits use
//! `tokio::time`, so not under `start_paused`.

#![allow(dead_code)] // each test file uses a different part

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

/// Nodes of the cluster: ports `base..base + 6`.
const NODES: u16 = 6;
/// Primaries at creation: `base..base + 3`; `base + 3 + i` replicates `base + i`.
const PRIMARIES: u16 = 3;
const SLOTS: u16 = 16384;
/// `cluster-node-timeout`: a killed primary is failed over in 3.2–5 s.
const NODE_TIMEOUT_MS: u64 = 2000;
const FIRST_BASE: u16 = 7101;
const BASE_STEP: u16 = 100;
const BASE_CANDIDATES: u16 = 20;
/// Bound on forming the cluster and on a restarted node's rejoining.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on each admin command to one node.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);

/// What runs each node: `redis-server` under a `bash` watchdog whose
/// stdin is a pipe whose only write end the test process holds (std opens
/// it close-on-exec) until it ends, however it ends. EOF means the test
/// process is gone (a pid check would be fooled by a zombie or a reused
/// pid): then kill -9 the node and remove its directory (and the cluster's,
/// when it is the last). A node killed by a test just ends its watchdog,
/// its files kept for the restart.
const WATCHDOG: &str = r#"
redis-server "$@" </dev/null &
node=$!
while kill -0 "$node" 2>/dev/null; do
    read -r -t 0.5 _
    if [ $? -le 128 ]; then
        kill -9 "$node" 2>/dev/null
        wait "$node" 2>/dev/null
        rm -rf "$NODE_DIR"
        rmdir "$CLUSTER_DIR" 2>/dev/null
        exit 0
    fi
done
exit 0
"#;

/// Serializes the tests of one binary that kill nodes (see
/// [`Cluster::faults`]).
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The one cluster of this test process, or why there is none (repeated
/// to every test that asks).
static SHARED: OnceCell<Started> = OnceCell::const_new();

#[derive(Debug)]
enum Started {
    Up(Cluster),
    /// `redis-server` is not installed: skip (or fail when required).
    Missing(String),
    /// `redis-server` is there but the cluster did not form: fail.
    Failed(String),
}

/// A running cluster; see the module documentation.
#[derive(Debug)]
pub struct Cluster {
    /// Comma-separated `redis://127.0.0.1:PORT` URLs of the three primaries
    /// at creation: what `FANOUT_REDIS_URL` / `RedisConfig::url` take. After
    /// a failover one of them may be a replica or dead; a cluster client
    /// finds the rest from any live seed.
    pub seeds: String,
    /// First port; the nodes are `base..base + 6`.
    pub base: u16,
    dir: PathBuf,
    nodes: Mutex<Nodes>,
    /// Held (flock) for the life of the process: this base is ours.
    _lock: File,
}

#[derive(Debug, Default)]
struct Nodes {
    /// The watchdog of each node started, by port, with the write end of
    /// its stdin: kept open for the life of the process.
    watchdogs: HashMap<u16, Child>,
    /// The redis-server pid of each running node, by port.
    pids: HashMap<u16, u32>,
    /// Ports killed by [`Cluster::kill_primary_of`] and not restarted.
    down: HashSet<u16>,
}

/// A primary killed by [`Cluster::kill_primary_of`]; give it to
/// [`Cluster::wait_failover`] and then to [`Cluster::restart`].
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

/// What [`Cluster::wait_failover`] waits for: the slot of a key, a slot, or
/// a [`KilledNode`] (then the time is counted from the kill, and its port
/// must no longer be the slot's primary).
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
#[derive(Debug, Clone)]
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

/// The cluster of this test process, started by the first caller (the
/// others wait); `None` when `redis-server` is not installed, after a loud
/// skip line, and a panic instead under `FANOUT_TEST_REQUIRE_SERVICES=1`
/// (like `common::available`). Panics if `redis-server` is there but the
/// cluster cannot be formed: that is a broken setup, not a missing one.
pub async fn shared() -> Option<&'static Cluster> {
    let started = SHARED
        .get_or_init(|| async {
            if let Err(why) = redis_server_installed() {
                return Started::Missing(why);
            }
            match Cluster::start().await {
                Ok(cluster) => Started::Up(cluster),
                Err(why) => Started::Failed(why),
            }
        })
        .await;
    match started {
        Started::Up(cluster) => Some(cluster),
        Started::Missing(why) => {
            fanout_backend::conformance::skip_or_fail("Redis Cluster", why);
            None
        }
        Started::Failed(why) => panic!("could not start the test Redis Cluster: {why}"),
    }
}

/// Whether `redis-server` runs at all, so a machine without Redis skips
/// instead of failing.
fn redis_server_installed() -> Result<(), String> {
    match Command::new("redis-server")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`redis-server --version` exited with {s}")),
        Err(e) => Err(format!(
            "cannot run redis-server ({e}): install Redis 7 to run the cluster tests"
        )),
    }
}

/// `redis://127.0.0.1:{port}`: one node, for tests that talk to one node
/// directly.
pub fn url_of(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

impl Cluster {
    /// Takes a free base, starts the six nodes and forms the cluster, so
    /// tests start from a healthy 3 + 3 layout.
    async fn start() -> Result<Self, String> {
        let (base, lock) = take_base()?;
        let dir = std::env::temp_dir().join(format!(
            "fanout-redis-cluster-test-{}-{base}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let seeds = (0..PRIMARIES)
            .map(|i| url_of(base + i))
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

    /// Every node's port, primaries and replicas, dead or alive.
    pub fn ports(&self) -> Vec<u16> {
        (self.base..self.base + NODES).collect()
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
    /// watchdog, so it cannot outlive the test process.
    fn spawn_node(&self, port: u16) -> Result<(), String> {
        let node_dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir)
            .map_err(|e| format!("create {}: {e}", node_dir.display()))?;
        let child = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("fanout-redis-cluster-node")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            // A rejoining node syncs at once, not after the 5 s default.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&node_dir)
            .arg("--logfile")
            .arg(node_dir.join("log"))
            .env("NODE_DIR", &node_dir)
            .env("CLUSTER_DIR", &self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start bash for redis-server on port {port}: {e}"))?;
        if let Some(mut old) = self.lock().watchdogs.insert(port, child) {
            // The previous watchdog ended with its node; reap it.
            let _ = old.wait();
        }
        Ok(())
    }

    /// Waits until a started node answers, and notes its pid for a later
    /// kill -9.
    async fn await_node(&self, port: u16) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Ok(info) = query::<String>(port, redis::cmd("INFO").arg("server")).await {
                let pid = info_field(&info, "process_id")
                    .and_then(|p| p.parse::<u32>().ok())
                    .ok_or_else(|| format!("no process_id in INFO of port {port}"))?;
                let mut nodes = self.lock();
                nodes.pids.insert(port, pid);
                nodes.down.remove(&port);
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "redis-server on port {port} does not answer after 10 s (log: {})",
                    self.dir.join(port.to_string()).join("log").display()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Forms the cluster with plain commands (what `redis-cli --cluster
    /// create` does), with a fixed layout: primary `base + i` owns the
    /// i-th third of the slots and `base + 3 + i` replicates it.
    async fn form(&self) -> Result<(), String> {
        let ranges = [(0u16, 5460u16), (5461, 10922), (10923, SLOTS - 1)];
        for (i, port) in self.ports().into_iter().enumerate() {
            let epoch = i + 1;
            query::<()>(
                port,
                redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(epoch),
            )
            .await
            .map_err(|e| format!("CLUSTER SET-CONFIG-EPOCH on {port}: {e}"))?;
        }
        for (port, &(from, to)) in (self.base..).zip(ranges.iter()) {
            query::<()>(
                port,
                redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(from).arg(to),
            )
            .await
            .map_err(|e| format!("CLUSTER ADDSLOTSRANGE on {port}: {e}"))?;
        }
        for port in self.ports().into_iter().skip(1) {
            query::<()>(
                self.base,
                redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(port),
            )
            .await
            .map_err(|e| format!("CLUSTER MEET {port}: {e}"))?;
        }
        let started = Instant::now();
        for i in 0..PRIMARIES {
            let primary = self.base + i;
            let replica = self.base + PRIMARIES + i;
            let id: String = query(primary, redis::cmd("CLUSTER").arg("MYID"))
                .await
                .map_err(|e| format!("CLUSTER MYID on {primary}: {e}"))?;
            // The replica must have learnt of the primary by gossip first.
            loop {
                match query::<()>(replica, redis::cmd("CLUSTER").arg("REPLICATE").arg(&id)).await {
                    Ok(()) => break,
                    Err(e) if started.elapsed() > SETTLE_TIMEOUT => {
                        return Err(format!("CLUSTER REPLICATE on {replica}: {e}"));
                    }
                    Err(_) => tokio::time::sleep(POLL).await,
                }
            }
        }
        self.settle(started, SETTLE_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|why| format!("the new cluster did not settle: {why}"))
    }

    /// Waits until every node is up and agrees on a healthy 3 + 3 cluster,
    /// so the next test starts from the same state as the first.
    async fn settle(&self, since: Instant, timeout: Duration) -> Result<Duration, String> {
        loop {
            let why = match self.healthy().await {
                Ok(()) => return Ok(since.elapsed()),
                Err(why) => why,
            };
            if since.elapsed() > timeout {
                return Err(format!(
                    "{why} (after {:?}){}",
                    since.elapsed(),
                    self.dump().await
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `Ok` when every running node says `cluster_state:ok`, serves every
    /// slot, and all agree on the same 3 primaries (which say
    /// `role:master`) and the replicas (link up) with nothing failing but
    /// the nodes still down: the state failover tests rely on. Agreement
    /// matters after a restart, when the returning node briefly still
    /// believes it is the primary.
    async fn healthy(&self) -> Result<(), String> {
        let down = self.lock().down.clone();
        let mut agreed: Option<Vec<u16>> = None;
        let mut masters = Vec::new();
        for port in self.live() {
            let info: String = query(port, redis::cmd("CLUSTER").arg("INFO")).await?;
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
            let mut view = nodes_of(port).await?;
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
            let repl: String = query(port, redis::cmd("INFO").arg("replication")).await?;
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

    /// `CLUSTER NODES` of every live node, for the panic message of a wait
    /// that timed out.
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
    async fn view(&self) -> Vec<NodeLine> {
        let mut last = String::from("no live node");
        for port in self.live() {
            match nodes_of(port).await {
                Ok(v) => return v,
                Err(e) => last = e,
            }
        }
        panic!("no node of the test cluster answers CLUSTER NODES: {last}");
    }

    /// The slot a key hashes to, asked of Redis so hash tags count exactly
    /// as the cluster counts them.
    async fn slot_of(&self, key: &str) -> u16 {
        for port in self.live() {
            if let Ok(slot) =
                query::<u16>(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await
            {
                return slot;
            }
        }
        panic!("no node of the test cluster answers CLUSTER KEYSLOT");
    }

    /// Ports of the primaries now serving slots, sorted: which nodes a test
    /// may kill, and where the keys are.
    pub async fn primaries(&self) -> Vec<u16> {
        let live = self.live();
        let mut ports: Vec<u16> = self
            .view()
            .await
            .into_iter()
            .filter(|n| n.is_primary() && !n.slots.is_empty() && !n.failing())
            .map(|n| n.port)
            .filter(|p| live.contains(p))
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Held by a test while it kills and restarts nodes: two node-loss
    /// tests at once in one binary would take each other's replicas, and
    /// tests that need a healthy cluster can hold it too (the tests of a
    /// binary run in parallel).
    pub async fn faults(&self) -> tokio::sync::MutexGuard<'static, ()> {
        FAULTS.lock().await
    }

    /// Kills (SIGKILL, no goodbye to the cluster) the primary that serves
    /// `key`, as a crashed machine would; panics if it has no replica to
    /// take over (restart the previous victim first).
    pub async fn kill_primary_of(&self, key: &str) -> KilledNode {
        let slot = self.slot_of(key).await;
        let view = self.view().await;
        let primary = view
            .iter()
            .find(|n| n.is_primary() && !n.failing() && n.serves(slot))
            .unwrap_or_else(|| panic!("no live primary serves slot {slot} (key {key:?})"))
            .clone();
        let replicas: Vec<u16> = view
            .iter()
            .filter(|n| n.primary_of.as_deref() == Some(primary.id.as_str()) && !n.failing())
            .map(|n| n.port)
            .collect();
        assert!(
            !replicas.is_empty(),
            "primary {} (slot {slot}) has no live replica to promote: restart the node killed before",
            primary.port
        );
        let pid = self
            .lock()
            .pids
            .get(&primary.port)
            .copied()
            .unwrap_or_else(|| panic!("no pid known for port {}", primary.port));
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("run kill");
        let killed_at = Instant::now();
        assert!(
            status.success(),
            "kill -9 {pid} (port {}) failed",
            primary.port
        );
        {
            let mut nodes = self.lock();
            nodes.down.insert(primary.port);
            nodes.pids.remove(&primary.port);
        }
        // Gone once its port refuses connections.
        while std::net::TcpStream::connect(("127.0.0.1", primary.port)).is_ok() {
            assert!(
                killed_at.elapsed() < Duration::from_secs(5),
                "port {} still accepts connections 5 s after kill -9",
                primary.port
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        KilledNode {
            port: primary.port,
            node_id: primary.id,
            slot,
            replicas,
            killed_at,
        }
    }

    /// Waits until the slot is served by a live primary again (for a
    /// [`KilledNode`]: not the killed one, i.e. a replica was promoted) and
    /// every live node says `cluster_state:ok`; returns how long that took
    /// (from the kill for a [`KilledNode`], else from the call). Panics
    /// after `timeout` with every node's view.
    pub async fn wait_failover(&self, of: impl Into<FailoverOf>, timeout: Duration) -> Duration {
        let called = Instant::now();
        let (slot, dead, since) = match of.into() {
            FailoverOf::Key(key) => (self.slot_of(&key).await, None, called),
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
                let owner = self
                    .view()
                    .await
                    .into_iter()
                    .find(|n| n.is_primary() && !n.failing() && n.serves(slot))
                    .map(|n| n.port);
                ok = owner.is_some_and(|p| live.contains(&p) && Some(p) != dead);
            }
            if ok {
                return since.elapsed();
            }
            assert!(
                called.elapsed() < timeout,
                "no failover of slot {slot} within {timeout:?}{}",
                self.dump().await
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts a killed node again from its `nodes.conf` (it rejoins as a
    /// replica of the node promoted in its place) and waits until every
    /// running node agrees the cluster is healthy, so later tests may kill
    /// again; returns how long the rejoin took.
    pub async fn restart(&self, killed: KilledNode) -> Duration {
        let started = Instant::now();
        self.spawn_node(killed.port)
            .unwrap_or_else(|e| panic!("restart port {}: {e}", killed.port));
        self.await_node(killed.port)
            .await
            .unwrap_or_else(|e| panic!("restart port {}: {e}", killed.port));
        self.settle(started, SETTLE_TIMEOUT)
            .await
            .unwrap_or_else(|why| {
                panic!(
                    "cluster not healthy after restarting port {}: {why}",
                    killed.port
                )
            })
    }

    /// Kills (`CLIENT KILL ID`) on every live node each client whose
    /// `CLIENT LIST` line has a field starting with `name_prefix` (for
    /// example `name=ns:sub:`), as `common::kill_clients` does on the
    /// standalone Redis; a cluster client holds connections to several
    /// nodes. Returns how many.
    pub async fn kill_clients(&self, name_prefix: &str) -> usize {
        let mut killed = 0;
        for port in self.live() {
            let list: String = query(port, redis::cmd("CLIENT").arg("LIST"))
                .await
                .unwrap_or_else(|e| panic!("CLIENT LIST on {port}: {e}"));
            let ids: Vec<String> = list
                .lines()
                .filter(|l| l.split_whitespace().any(|f| f.starts_with(name_prefix)))
                .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
                .map(str::to_owned)
                .collect();
            for id in ids {
                let n: i64 = query(port, redis::cmd("CLIENT").arg("KILL").arg("ID").arg(&id))
                    .await
                    .unwrap_or_else(|e| panic!("CLIENT KILL on {port}: {e}"));
                killed += usize::try_from(n).unwrap_or(0);
            }
        }
        killed
    }

    /// Deletes every key `{namespace}:*` on every primary: a key lives on
    /// the primary of its slot, so one SCAN per primary finds them all, and
    /// one UNLINK per key avoids CROSSSLOT. Errors are printed, not raised
    /// (clean-up must not mask the test's own failure).
    pub async fn purge(&self, namespace: &str) {
        for port in self.primaries().await {
            if let Err(e) = purge_node(port, namespace).await {
                eprintln!("could not purge test namespace {namespace} on port {port}: {e}");
            }
        }
    }
}

/// One primary's share of [`Cluster::purge`].
async fn purge_node(port: u16, namespace: &str) -> redis::RedisResult<()> {
    let mut conn = connect(port).await?;
    let mut cursor: u64 = 0;
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
                pipe.cmd("UNLINK").arg(key).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The first base (7101, 7201, …) whose lock this process gets and whose
/// ports are all free; the lock stays held so no other test process takes
/// it while this one runs.
fn take_base() -> Result<(u16, File), String> {
    for i in 0..BASE_CANDIDATES {
        let base = FIRST_BASE + i * BASE_STEP;
        let path = std::env::temp_dir().join(format!("fanout-redis-cluster-{base}.lock"));
        let Ok(lock) = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        let free = (base..base + NODES)
            .flat_map(|p| [p, p + 10_000])
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return Ok((base, lock));
        }
    }
    Err(format!(
        "no free base port among {FIRST_BASE}, {}, … {} (each needs 6 ports and their bus ports +10000)",
        FIRST_BASE + BASE_STEP,
        FIRST_BASE + (BASE_CANDIDATES - 1) * BASE_STEP
    ))
}

/// A fresh connection to one node, in the caller's runtime.
async fn connect(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url_of(port))?;
    match tokio::time::timeout(CALL_TIMEOUT, client.get_multiplexed_async_connection()).await {
        Ok(conn) => conn,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to port {port}: no answer in {CALL_TIMEOUT:?}"),
        ))),
    }
}

/// One command to one node, bounded by [`CALL_TIMEOUT`], so a hung node
/// fails a wait instead of hanging the test.
async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let call = async {
        let mut conn = connect(port).await?;
        cmd.query_async::<T>(&mut conn).await
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("port {port}: {e}")),
        Err(_) => Err(format!("port {port}: no answer in {CALL_TIMEOUT:?}")),
    }
}

/// `CLUSTER NODES` of one node, parsed.
async fn nodes_of(port: u16) -> Result<Vec<NodeLine>, String> {
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
