//! The fault matrix: a deployment of real processes (3 gateways, 2
//! workers) under steady 1:1 and group traffic, one fault injected in the
//! middle, and afterwards every message accounted for — acked by a
//! gateway, stored in the database, shown to each recipient's session.
//!
//! [`run_fault`] runs one fault against one backend, on a PostgreSQL
//! database and a broker namespace of its own, and always removes both.
//! `docs/reliability.md` states the guarantees these runs check and the
//! measured matrix; `tests/faults.rs` runs every fault on RabbitMQ and
//! Redis.
//!
//! Parts: `proxy` (the TCP proxy that makes database outages without
//! touching the shared PostgreSQL), `services` (a Redis server of the run's
//! own, `rabbitmqctl`, HTTP calls), `traffic` (the clients and the
//! accounting).

mod proxy;
pub(crate) mod services;
mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::{Connection, Row};
use tokio_util::sync::CancellationToken;

pub use proxy::TcpProxy;

use self::services::{RabbitStopped, RedisServer};
use self::traffic::{Receipt, StoredRow, Traffic};
use crate::pg::{PgError, TempDatabase};
use crate::procs::{Fleet, FleetSpec, ProcError, Role};
use fanout::config::{BackendKind, Config};
use fanout_localcluster::rabbitmq::{self, RabbitCluster};
use fanout_localcluster::redis::RedisCluster;

/// The faults of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// `kill -9` of one of the two workers while it processes traffic.
    WorkerKill,
    /// `kill -9` of one of the three gateways; its clients reconnect to
    /// another one.
    GatewayKill,
    /// Every broker connection of the deployment closed by the broker
    /// (RabbitMQ `close_connection`, Redis `CLIENT KILL`).
    BrokerConnectionKill,
    /// The broker stopped and started again (RabbitMQ `stop_app` /
    /// `start_app`; the run's own Redis shut down and started on its AOF).
    BrokerRestart,
    /// PostgreSQL unreachable for a few seconds (a proxy drops every
    /// connection and refuses new ones).
    DatabaseOutage,
    /// The database turned read-only (`default_transaction_read_only`, its
    /// sessions terminated) for [`FaultSpec::read_only_for`], as after a
    /// failover to a replica: every insert fails with SQLSTATE 25006, an
    /// error that is not a connection loss. One worker, 200 msg/s.
    DatabaseReadOnly,
    /// The only worker killed, a backlog of [`FaultSpec::backlog`] events
    /// built up, then the worker started and killed again
    /// [`FaultSpec::restarts`] times while it works the backlog off.
    WorkerRestarts,
    /// A member of a channel removed (REST `DELETE` on another gateway)
    /// while its own gateway's broker connections are cut, again and again
    /// for [`FaultSpec::outage`], under steady traffic on that channel.
    RemovedWhileDisconnected,
    /// One busy channel ([`FaultSpec::busy_rate`] messages per second, every
    /// member sending, members on every gateway) while one gateway's broker
    /// connections are closed.
    BusyChannelRouteLoss,
    /// On a cluster ([`FaultSpec::cluster`]), SIGKILL of one broker node
    /// under steady traffic, started again once the rest took over.
    /// - Redis: the primary that holds gateway 0's channel (and its share
    ///   of the streams and route sets); its replica is promoted and the
    ///   killed node rejoins as a replica.
    /// - RabbitMQ: the node gateway 0 is connected to (and the leaders of
    ///   the quorum queues it held); the gateway reconnects to another node
    ///   and re-declares its queue there, quorum queues elect new leaders,
    ///   and the killed node rejoins the cluster.
    NodeLoss,
}

impl FaultKind {
    /// Every fault, in the order the matrix runs them.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::WorkerKill,
        FaultKind::GatewayKill,
        FaultKind::BrokerConnectionKill,
        FaultKind::BrokerRestart,
        FaultKind::DatabaseOutage,
        FaultKind::DatabaseReadOnly,
        FaultKind::WorkerRestarts,
        FaultKind::RemovedWhileDisconnected,
        FaultKind::BusyChannelRouteLoss,
        FaultKind::NodeLoss,
    ];

    /// Whether `cargo test --test faults` runs it without
    /// `FANOUT_TEST_FAULTS`: every fault but `busy_channel_route_loss`,
    /// which loses nothing and repeats or skips no position, but whose
    /// 300 msg/s on one channel the debug build does not deliver within 1 s
    /// even before the fault (most deliveries late, so "recovered" fails):
    /// run it by name.
    pub fn by_default(self) -> bool {
        self != FaultKind::BusyChannelRouteLoss
    }

    /// Whether it can run on a single broker node (`cluster` false) or on
    /// a cluster: losing a node takes a cluster, and the single-node faults
    /// are not yet wired to a cluster's nodes.
    pub fn applies(self, cluster: bool) -> bool {
        (self == FaultKind::NodeLoss) == cluster
    }

    /// The snake_case name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::WorkerKill => "worker_kill",
            FaultKind::GatewayKill => "gateway_kill",
            FaultKind::BrokerConnectionKill => "broker_connection_kill",
            FaultKind::BrokerRestart => "broker_restart",
            FaultKind::DatabaseOutage => "database_outage",
            FaultKind::DatabaseReadOnly => "database_read_only",
            FaultKind::WorkerRestarts => "worker_restarts",
            FaultKind::RemovedWhileDisconnected => "removed_while_disconnected",
            FaultKind::BusyChannelRouteLoss => "busy_channel_route_loss",
            FaultKind::NodeLoss => "node_loss",
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to run a fault.
#[derive(Debug, Clone)]
pub struct FaultSpec {
    /// `rabbitmq` or `redis`.
    pub backend: BackendKind,
    /// On a cluster of the run's own (Redis: 3 primaries with a replica
    /// each, on loopback), instead of one broker node.
    pub cluster: bool,
    /// The `fanout` binary the gateways and workers run.
    pub binary: PathBuf,
    /// Server-level PostgreSQL URL; each run creates a database of its own
    /// there, and the fleet reaches it through a proxy.
    pub postgres_admin_url: String,
    /// Where each run's process logs go (a directory per run).
    pub log_dir: PathBuf,
    /// Messages per second, all users together.
    pub rate: f64,
    /// Users (rounded up to an even number), spread over the gateways.
    pub users: usize,
    /// Group channels; each has members on every gateway.
    pub channels: usize,
    /// Traffic before the fault.
    pub before: Duration,
    /// Traffic after the fault is over (after the broker or the database
    /// is back; right after a kill); twice as long after a broker restart
    /// (see [`FaultSpec::after_for`]).
    pub after: Duration,
    /// How long a broker or database stays down.
    pub outage: Duration,
    /// After sending stops, how long unacked sends are retried.
    pub retry_budget: Duration,
    /// Settling ends when nothing new was stored or delivered for this long.
    pub quiet: Duration,
    /// For `WorkerKill`: for three times this long before the kill, the
    /// answer to each batch insert of the workers is held this long (the
    /// rows are committed, the worker does not know yet), so that the
    /// killed worker dies between storing a batch and acking it.
    pub worker_kill_db_delay: Duration,
    /// RabbitMQ URL (the shared broker).
    pub rabbitmq_url: String,
    /// `rabbitmqctl`, for closing connections and restarting the broker.
    pub rabbitmqctl: PathBuf,
    /// `redis-server`: Redis runs use a server of their own.
    pub redis_server: PathBuf,
    /// For `DatabaseReadOnly`: how long the database stays read-only.
    pub read_only_for: Duration,
    /// For `DatabaseReadOnly`: messages per second.
    pub read_only_rate: f64,
    /// For `WorkerRestarts`: events waiting before the first restart.
    pub backlog: u64,
    /// For `WorkerRestarts`: how often the worker is killed and started.
    pub restarts: u32,
    /// For `WorkerRestarts`: how long each restarted worker lives.
    pub restart_every: Duration,
    /// For `BusyChannelRouteLoss`: messages per second, all to one channel.
    pub busy_rate: f64,
    /// For `BusyChannelRouteLoss`: users, all members of that channel.
    pub busy_users: usize,
}

impl FaultSpec {
    /// The settings `tests/faults.rs` uses: 18 users on 3 gateways, 3
    /// channels of 6, 120 messages per second, 3 s before the fault and
    /// 5 s after it (10 s after a broker restart), outages of 3 s.
    pub fn new(backend: BackendKind, binary: PathBuf) -> FaultSpec {
        FaultSpec {
            backend,
            cluster: false,
            binary,
            postgres_admin_url: std::env::var("FANOUT_BENCH_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            log_dir: std::env::temp_dir().join("fanout-faults"),
            rate: 120.0,
            users: 18,
            channels: 3,
            before: Duration::from_secs(3),
            after: Duration::from_secs(5),
            outage: Duration::from_secs(3),
            retry_budget: Duration::from_secs(20),
            quiet: Duration::from_secs(3),
            worker_kill_db_delay: Duration::from_millis(300),
            rabbitmq_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            rabbitmqctl: PathBuf::from("rabbitmqctl"),
            redis_server: PathBuf::from("redis-server"),
            read_only_for: Duration::from_secs(10),
            read_only_rate: 200.0,
            backlog: 5000,
            restarts: 6,
            restart_every: Duration::from_millis(2500),
            busy_rate: 300.0,
            busy_users: 6,
        }
    }
}

impl FaultSpec {
    /// Traffic after `fault` is over. A broker restart gets twice
    /// [`FaultSpec::after`]: the processes reconnect with a backoff that
    /// reaches seconds during the outage (RabbitMQ: 100 ms doubling to
    /// 5 s; Redis subscribers: 50 ms doubling to 5 s), the clients retry
    /// with theirs (up to 2 s), and then the backlog the outage built
    /// drains; measured, RabbitMQ needed 5–6 s after the broker was back.
    pub fn after_for(&self, fault: FaultKind) -> Duration {
        match fault {
            // A failover takes seconds before the clients' retries and the
            // gateways' catch-up run.
            FaultKind::BrokerRestart | FaultKind::DatabaseReadOnly | FaultKind::NodeLoss => {
                self.after * 2
            }
            // A lone worker works off the backlog and what came meanwhile.
            FaultKind::WorkerRestarts => self.after * 3,
            _ => self.after,
        }
    }

    /// Worker processes for `fault`: one where the fault is about what a
    /// lone worker does with events it cannot store or keeps losing.
    pub fn workers_for(&self, fault: FaultKind) -> usize {
        match fault {
            FaultKind::DatabaseReadOnly | FaultKind::WorkerRestarts => 1,
            _ => 2,
        }
    }

    /// Messages per second for `fault`.
    pub fn rate_for(&self, fault: FaultKind) -> f64 {
        match fault {
            FaultKind::DatabaseReadOnly => self.read_only_rate,
            FaultKind::BusyChannelRouteLoss => self.busy_rate,
            _ => self.rate,
        }
    }
}

/// Why a fault run could not be carried out (as opposed to what it
/// measured, which is in [`FaultResult`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// Starting or stopping the fleet.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// Creating the run's database.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// Reading the run's database back.
    #[error("reading the run's database: {0}")]
    Db(#[from] sqlx::Error),
    /// Local I/O (ports, files, child processes).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A broker or helper service did not do what was asked.
    #[error("{0}")]
    Service(String),
    /// The clients could not be set up.
    #[error("{0}")]
    Client(String),
}

/// What one fault run measured. Deliveries count (message, recipient user)
/// pairs: a 1:1 message is due to its sender and its receiver, a group
/// message to every member.
#[derive(Debug, Clone, Serialize)]
pub struct FaultResult {
    /// The backend.
    pub backend: BackendKind,
    /// On a cluster of the run's own.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// The fault.
    pub fault: FaultKind,
    /// Messages composed (distinct `clientMsgId`s).
    pub sent: u64,
    /// Messages acked `ok`, at the first send or a retry.
    pub acked: u64,
    /// Messages that needed more than one send.
    pub retried: u64,
    /// Messages never acked before the retry budget ran out.
    pub never_acked: u64,
    /// Messages in the database.
    pub stored: u64,
    /// Acked but not in the database: must be 0.
    pub acked_not_stored: u64,
    /// In the database but never acked to the sender.
    pub stored_not_acked: u64,
    /// Acked with another id than the stored one (allowed: a retry that
    /// reached a gateway before any worker stored the first send).
    pub ack_id_differs: u64,
    /// Deliveries due for stored messages.
    pub expected_deliveries: u64,
    /// Deliveries that arrived.
    pub delivered: u64,
    /// Of those, arrived more than 1 s after the message was composed.
    pub delivered_late: u64,
    /// Extra copies of a message shown to one session: must be 0.
    pub duplicates: u64,
    /// Messages a session was shown after a later message of the same
    /// sender to the same conversation.
    pub reordered: u64,
    /// Events in the dead letters after the run: must be 0 (every event of
    /// the run is valid; no fault may make the worker give up on one).
    pub dead_lettered: u64,
    /// Events for a message that is not stored, or under another id than
    /// the stored one: must be 0.
    pub unknown_deliveries: u64,
    /// Due deliveries that never arrived although the recipient's session
    /// was up throughout.
    pub not_delivered_online: u64,
    /// Due deliveries that never arrived to a recipient whose session was
    /// down during the message's life (it reconnects; history has them).
    pub not_delivered_offline: u64,
    /// Redelivered messages the gateways' sessions dropped (at or below their position)
    /// (`duplicates_dropped` of the surviving gateways).
    pub redeliveries_suppressed: u64,
    /// For a worker kill: messages already stored when the worker died but
    /// shown to nobody until more than 1 s later — the batch it was in
    /// the middle of (stored, not yet published or acked), delivered again
    /// by the broker and stored idempotently by the other worker.
    pub stored_unacked_at_kill: Option<u64>,
    /// Times gateways re-bound their routes after a broker connection loss.
    pub routes_lost: u64,
    /// Client sessions re-established after a loss.
    pub reconnects: u64,
    /// The longest time one user was without a session.
    pub longest_offline_ms: u64,
    /// Why sends had to be repeated: failure and count.
    pub send_failures: Vec<(String, u64)>,
    /// How long the injection itself took (the outage).
    pub fault_ms: u64,
    /// From the injection until the last message the fault disturbed (not
    /// acked at its first send, delivered late, or lost to an online
    /// recipient) was settled (acked and shown to every recipient that got
    /// it); `None` if the last messages of the run were still disturbed.
    pub recovery_ms: Option<u64>,
    /// Wall time of the whole run, set-up and clean-up included.
    pub run_ms: u64,
    /// Events whose `seq` was not their session's last position of that
    /// stream plus one (a repeat or a skip): must be 0.
    pub position_violations: u64,
    /// For `RemovedWhileDisconnected`: the status of the `DELETE`.
    pub delete_status: Option<u16>,
    /// For `RemovedWhileDisconnected`: events of the channel beyond the
    /// removal shown to the removed member: must be 0.
    pub after_removal: Option<u64>,
    /// For `RemovedWhileDisconnected`: 1 when the removed member's session
    /// never received its removal on the channel's stream: must be 0.
    pub removal_missing: Option<u64>,
    /// What was done, and what the numbers mean.
    pub note: String,
}

impl FaultResult {
    /// The guarantees that must hold whatever the fault: nothing acked is
    /// lost, no session sees a message twice, nothing unstored is shown,
    /// the system recovered, and no online recipient misses a message
    /// (what a broker connection loss drops on the outgoing side, the
    /// gateway reads back from the store after re-binding). Empty when all
    /// hold.
    pub fn violations(&self) -> Vec<String> {
        let nonzero = |n: u64, what: &str| (n > 0).then(|| format!("{n} {what}"));
        [
            nonzero(self.acked_not_stored, "acked but not stored"),
            nonzero(self.duplicates, "duplicates shown to a session"),
            nonzero(
                self.unknown_deliveries,
                "deliveries of unstored messages or under a wrong id",
            ),
            nonzero(self.never_acked, "sends never acked"),
            self.recovery_ms
                .is_none()
                .then(|| "did not recover before the run ended".into()),
            nonzero(
                self.not_delivered_online,
                "deliveries lost to online sessions",
            ),
            (self.delivered == 0).then(|| "nothing was delivered at all".into()),
            nonzero(self.dead_lettered, "valid events dead-lettered"),
            nonzero(self.reordered, "messages shown out of their sender's order"),
            nonzero(
                self.position_violations,
                "events not at their session's last position + 1",
            ),
            self.delete_status
                .filter(|s| *s != 204)
                .map(|s| format!("the removal's DELETE answered {s}, not 204")),
            nonzero(
                self.after_removal.unwrap_or(0),
                "channel events beyond the removal shown to the removed member",
            ),
            nonzero(
                self.removal_missing.unwrap_or(0),
                "removals never received by the removed member's session",
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The header of [`FaultResult::table_row`]'s table (Markdown).
    pub fn table_header() -> &'static str {
        "| backend | fault | sent | acked | retried | acked, not stored | stored, not acked | due deliveries | delivered | late (>1 s) | duplicates | reordered | lost online | missed offline | dead letters | redeliveries suppressed | position violations | fault ms | recovery ms |\n\
         | --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |"
    }

    /// One Markdown table row.
    pub fn table_row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            crate::topology::Target {
                kind: self.backend,
                cluster: self.cluster
            },
            self.fault,
            self.sent,
            self.acked,
            self.retried,
            self.acked_not_stored,
            self.stored_not_acked,
            self.expected_deliveries,
            self.delivered,
            self.delivered_late,
            self.duplicates,
            self.reordered,
            self.not_delivered_online,
            self.not_delivered_offline,
            self.dead_lettered,
            self.redeliveries_suppressed,
            self.position_violations,
            self.fault_ms,
            self.recovery_ms
                .map_or_else(|| "not recovered".to_owned(), |ms| ms.to_string()),
        )
    }
}

/// The tag of an insert's CommandComplete in PostgreSQL's wire protocol.
const INSERT_DONE: &[u8] = b"INSERT 0 ";

/// Everything a run starts, so that it can all be removed on any path.
#[derive(Debug, Default)]
struct Resources {
    namespace: String,
    db: Option<TempDatabase>,
    /// Between the gateways and PostgreSQL.
    proxy: Option<TcpProxy>,
    /// Between the workers and PostgreSQL: a worker kill slows only the
    /// workers' database, so that the gateways keep feeding them.
    worker_proxy: Option<TcpProxy>,
    redis: Option<RedisServer>,
    /// The run's Redis Cluster ([`FaultSpec::cluster`]).
    redis_cluster: Option<RedisCluster>,
    /// The process's RabbitMQ cluster ([`FaultSpec::cluster`]): one per
    /// process (its node names are fixed), shared by the runs.
    rabbit_cluster: Option<&'static RabbitCluster>,
    fleet: Option<Fleet>,
    traffic: Option<Arc<Traffic>>,
    /// For `RemovedWhileDisconnected`: what the `DELETE` answered.
    delete_status: Option<u16>,
}

/// Runs `fault` against `spec.backend` (see the module doc) and accounts
/// for every message. Whatever happens, the fleet is stopped, the broker
/// namespace purged and the database dropped before this returns.
pub async fn run_fault(spec: &FaultSpec, fault: FaultKind) -> Result<FaultResult, FaultError> {
    let started = Instant::now();
    let mut res = Resources {
        namespace: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        ..Resources::default()
    };
    let result = execute(spec, fault, &mut res).await;
    teardown(spec, &mut res).await;
    result.map(|mut r| {
        r.run_ms = started.elapsed().as_millis() as u64;
        r
    })
}

async fn execute(
    spec: &FaultSpec,
    fault: FaultKind,
    res: &mut Resources,
) -> Result<FaultResult, FaultError> {
    if !matches!(spec.backend, BackendKind::Rabbitmq | BackendKind::Redis) {
        return Err(FaultError::Service(
            "the fault matrix needs a broker shared by processes: rabbitmq or redis".into(),
        ));
    }
    let dir = spec.log_dir.join(format!(
        "{}-{}-{}",
        crate::topology::Target {
            kind: spec.backend,
            cluster: spec.cluster
        },
        fault,
        res.namespace
    ));
    let db = res
        .db
        .insert(TempDatabase::create(&spec.postgres_admin_url, "fanout_faults").await?);
    let db_url = db.url.clone();
    let upstream = postgres_addr(&spec.postgres_admin_url).await?;
    let start_proxy = || async {
        TcpProxy::start(upstream)
            .await
            .map_err(|source| FaultError::Io {
                what: "starting a database proxy".into(),
                source,
            })
    };
    let fleet_db_url = via(&db_url, res.proxy.insert(start_proxy().await?).addr);
    let worker_db_url = via(&db_url, res.worker_proxy.insert(start_proxy().await?).addr);

    let secret = uuid::Uuid::new_v4().simple().to_string();
    let mut env: Vec<(String, String)> = [
        // The clients send ~7 messages a second each, plus retries.
        ("FANOUT_LIMITS__MESSAGES_PER_SECOND", "1000"),
        ("FANOUT_LIMITS__MESSAGE_BURST", "1000"),
        // A send the broker cannot take is answered within 3 s, so the
        // client retries rather than waits.
        ("FANOUT_BROKER_TIMEOUT_MS", "3000"),
        // Redis: a dead worker's partitions move after 2 s and its entries
        // are claimed after 1 s idle (defaults: 10 s each), so a worker
        // kill settles within the run. The gateways' liveness TTL stays at
        // its default: a dead gateway's stale routes reach no subscriber
        // and change no count here, and a short one would expire every
        // gateway's liveness during a broker restart.
        ("FANOUT_REDIS__LEASE_TTL_MS", "2000"),
        ("FANOUT_REDIS__CLAIM_IDLE_MS", "1000"),
        ("FANOUT_RABBITMQ_URL", spec.rabbitmq_url.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if spec.backend == BackendKind::Redis && spec.cluster {
        let cluster = res.redis_cluster.insert(
            RedisCluster::start()
                .await
                .map_err(|e| FaultError::Service(format!("starting a Redis Cluster: {e}")))?,
        );
        env.push(("FANOUT_REDIS_URL".into(), cluster.seeds.clone()));
        env.push(("FANOUT_REDIS__CLUSTER".into(), "true".into()));
    } else if spec.backend == BackendKind::Redis {
        let redis = res
            .redis
            .insert(RedisServer::start(&spec.redis_server, &dir.join("redis")).await?);
        env.push(("FANOUT_REDIS_URL".into(), redis.url()));
    } else if spec.cluster {
        let cluster = RabbitCluster::shared()
            .await
            .map_err(|e| FaultError::Service(format!("starting a RabbitMQ cluster: {e}")))?;
        res.rabbit_cluster = Some(cluster);
        env.retain(|(k, _)| k != "FANOUT_RABBITMQ_URL");
        env.push(("FANOUT_RABBITMQ_URL".into(), cluster.url_list()));
    }
    let fleet = res.fleet.insert(
        Fleet::start_with_role_env(
            FleetSpec {
                binary: spec.binary.clone(),
                backend: spec.backend,
                namespace: res.namespace.clone(),
                database_url: fleet_db_url,
                jwt_secret: secret.clone(),
                env,
                log_dir: dir.clone(),
            },
            3,
            spec.workers_for(fault),
            vec![(Role::Worker, "FANOUT_DATABASE_URL".into(), worker_db_url)],
        )
        .await?,
    );
    let urls = fleet.urls();
    let first_gateway = urls
        .first()
        .cloned()
        .ok_or_else(|| FaultError::Service("the fleet has no gateway".into()))?;
    let busy = fault == FaultKind::BusyChannelRouteLoss;
    let traffic = res
        .traffic
        .insert(Traffic::with_mix(
            urls.clone(),
            fanout::auth::Tokens::new(secret.as_bytes()),
            if busy { spec.busy_users } else { spec.users },
            if busy { 1 } else { spec.channels },
            busy,
        ))
        .clone();
    create_channels(&traffic, &first_gateway).await?;
    traffic.connect_all().await?;

    // Steady traffic, the fault in the middle of it.
    let stop_sending = CancellationToken::new();
    let give_up = CancellationToken::new();
    // Whichever way this function returns, the clients stop composing and
    // retrying (the connections are closed by the teardown).
    let _stop_guard = stop_sending.clone().drop_guard();
    let _give_up_guard = give_up.clone().drop_guard();
    let sending =
        traffic.start_sending(spec.rate_for(fault), stop_sending.clone(), give_up.clone());
    tokio::time::sleep(spec.before).await;
    if let Some(fleet) = res.fleet.as_mut() {
        fleet.check_alive()?;
    }
    // For a worker kill: what was stored at the instant it died (the
    // connection is opened beforehand, so the read follows the kill).
    let mut snapshot_conn = match fault {
        FaultKind::WorkerKill => {
            let conn = sqlx::PgConnection::connect(&db_url).await?;
            if let Some(proxy) = &res.worker_proxy {
                proxy.set_delay(spec.worker_kill_db_delay, INSERT_DONE);
            }
            // From now on every batch insert commits at once and its answer
            // comes `worker_kill_db_delay` later: a worker spends nearly all
            // its time between storing a batch and acking it. A few batches
            // go by before the kill.
            tokio::time::sleep(spec.worker_kill_db_delay * 3).await;
            Some(conn)
        }
        _ => None,
    };
    // The connections to close are listed beforehand: the fault is the
    // closing, not the listing.
    let rabbit_pids = match (fault, spec.backend) {
        (FaultKind::BrokerConnectionKill, BackendKind::Rabbitmq) => {
            services::rabbitmq_connections(&spec.rabbitmqctl, &res.namespace).await?
        }
        _ => Vec::new(),
    };
    let mut fault_at = Instant::now();
    let injected = inject(spec, fault, res, &rabbit_pids).await;
    let fault_over = Instant::now();
    let stored_at_fault = match snapshot_conn.as_mut() {
        Some(conn) => Some(read_stored(conn).await?),
        None => None,
    };
    if let Some(conn) = snapshot_conn {
        let _ = conn.close().await;
    }
    let (mut what, took_effect) = injected?;
    fault_at = took_effect.unwrap_or(fault_at);
    let fault_ms = fault_over.saturating_duration_since(fault_at).as_millis() as u64;
    tokio::time::sleep(spec.after_for(fault)).await;
    stop_sending.cancel();
    let sending_stopped = Instant::now();

    // Let every queued send be acked (retrying), then let the system
    // settle: until every due delivery to an online session arrived, or
    // nothing new was stored or delivered for `quiet`.
    tokio::pin!(sending);
    if tokio::time::timeout(spec.retry_budget, &mut sending)
        .await
        .is_err()
    {
        give_up.cancel();
        let _ = sending.await;
    }
    let mut db_conn = sqlx::PgConnection::connect(&db_url).await?;
    let settle_deadline = Instant::now() + spec.retry_budget;
    let mut last = (0usize, 0usize);
    let mut last_progress = Instant::now();
    let (stored, accounting) = loop {
        let stored = read_stored(&mut db_conn).await?;
        let now = Instant::now();
        let a = traffic.account(&stored, fault_at, now);
        let progress = (stored.len(), traffic.receipt_count());
        if progress != last {
            last = progress;
            last_progress = now;
        }
        let complete = a.acked_not_stored == 0 && a.not_delivered_online == 0;
        // A short floor, so that a redelivery still on its way is seen
        // (and counted if it were shown twice).
        let floor = now.duration_since(sending_stopped) > Duration::from_secs(2);
        if (complete && floor)
            || now.duration_since(last_progress) > spec.quiet
            || now > settle_deadline
        {
            break (stored, a);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = db_conn.close().await;

    // Stored when the worker died, yet shown to nobody until well after:
    // the killed worker had stored them and not yet published or acked
    // them; they came back by redelivery (the surviving worker publishes
    // what it stored within the held answer's delay; a take-over of the
    // dead worker's partitions takes seconds).
    let caught_mid_batch = stored_at_fault.map(|rows| {
        let arrivals = traffic.first_arrivals();
        let after = fault_at + Duration::from_secs(1);
        rows.iter()
            .filter(|r| arrivals.get(&r.id).is_none_or(|at| *at > after))
            .count() as u64
    });
    let live = res.fleet.as_ref().map(Fleet::urls).unwrap_or_default();
    let (suppressed, routes_lost) = scrape_gateways(&live).await;
    let removal = (fault == FaultKind::RemovedWhileDisconnected)
        .then(|| removal_check(&traffic))
        .flatten();
    let dead_lettered = fanout::app::dead_letters(&broker_config(spec, res), 10_000)
        .await
        .map_err(|e| FaultError::Service(format!("reading the dead letters: {e}")))?
        .len() as u64;
    let mut result = FaultResult {
        backend: spec.backend,
        cluster: spec.cluster,
        fault,
        sent: accounting.sent,
        acked: accounting.acked,
        retried: accounting.retried,
        never_acked: accounting.never_acked,
        stored: stored.len() as u64,
        acked_not_stored: accounting.acked_not_stored,
        stored_not_acked: accounting.stored_not_acked,
        ack_id_differs: accounting.ack_id_differs,
        expected_deliveries: accounting.expected_deliveries,
        delivered: accounting.delivered,
        delivered_late: accounting.delivered_late,
        duplicates: accounting.duplicates,
        reordered: accounting.reordered,
        dead_lettered,
        unknown_deliveries: accounting.unknown_deliveries,
        not_delivered_online: accounting.not_delivered_online,
        not_delivered_offline: accounting.not_delivered_offline,
        redeliveries_suppressed: suppressed,
        stored_unacked_at_kill: caught_mid_batch,
        routes_lost,
        reconnects: traffic.reconnects(),
        longest_offline_ms: accounting.longest_offline.as_millis() as u64,
        send_failures: accounting.failures,
        fault_ms,
        recovery_ms: accounting.recovery.map(|d| d.as_millis() as u64),
        run_ms: 0,
        position_violations: accounting.position_violations,
        delete_status: res.delete_status,
        after_removal: removal.as_ref().map(|r| r.0),
        removal_missing: removal.as_ref().map(|r| r.1),
        note: String::new(),
    };
    if let Some((_, _, detail)) = removal {
        what = format!("{what}; {detail}");
    }
    result.note = note(spec, &result, &what);
    Ok(result)
}

/// Injects the fault; returns what was done, for the note, and when the
/// fault took effect if that is later than the call (the connections are
/// closed at the end of the `rabbitmqctl eval`, after its VM started).
async fn inject(
    spec: &FaultSpec,
    fault: FaultKind,
    res: &mut Resources,
    rabbit_pids: &[String],
) -> Result<(String, Option<Instant>), FaultError> {
    let not_running = || FaultError::Service("the fleet is not running".into());
    let what = match fault {
        FaultKind::WorkerKill => {
            let fleet = res.fleet.as_mut().ok_or_else(not_running)?;
            let idx = fleet.live(Role::Worker, 0).ok_or_else(not_running)?;
            let name = fleet.nodes[idx].name.clone();
            fleet.kill9(idx).await;
            if let Some(proxy) = &res.worker_proxy {
                proxy.set_delay(Duration::ZERO, b"");
            }
            format!(
                "SIGKILL to {name} under traffic, while the answers to the workers' batch inserts were held {} ms (committed, not yet known to the worker) so that it died between storing a batch and acking it",
                spec.worker_kill_db_delay.as_millis()
            )
        }
        FaultKind::GatewayKill => {
            let fleet = res.fleet.as_mut().ok_or_else(not_running)?;
            let idx = fleet.live(Role::Gateway, 0).ok_or_else(not_running)?;
            let name = fleet.nodes[idx].name.clone();
            fleet.kill9(idx).await;
            format!("SIGKILL to {name}; its clients reconnected to the other gateways")
        }
        FaultKind::BrokerConnectionKill => match spec.backend {
            BackendKind::Redis => {
                let redis = res.redis.as_ref().ok_or_else(not_running)?;
                let n = redis.kill_clients().await?;
                format!(
                    "CLIENT KILL TYPE normal and TYPE pubsub on the run's Redis: {n} connections"
                )
            }
            _ => {
                if rabbit_pids.is_empty() {
                    return Err(FaultError::Service(format!(
                        "no RabbitMQ connection of namespace {} found to close",
                        res.namespace
                    )));
                }
                services::rabbitmq_close(&spec.rabbitmqctl, rabbit_pids).await?;
                return Ok((
                    format!(
                        "every one of the deployment's {} RabbitMQ connections closed by the broker at once (rabbit_networking:close_connection through rabbitmqctl eval)",
                        rabbit_pids.len()
                    ),
                    Some(Instant::now()),
                ));
            }
        },
        FaultKind::BrokerRestart => match spec.backend {
            BackendKind::Redis => {
                let redis = res.redis.as_mut().ok_or_else(not_running)?;
                redis.restart(spec.outage).await?;
                format!(
                    "the run's redis-server (appendonly yes, appendfsync everysec) stopped with SIGTERM, down {} ms, started again on its AOF",
                    spec.outage.as_millis()
                )
            }
            _ => {
                let stopped = RabbitStopped::stop(&spec.rabbitmqctl).await?;
                tokio::time::sleep(spec.outage).await;
                stopped.start().await?;
                format!(
                    "rabbitmqctl stop_app, {} ms, start_app (and await_startup)",
                    spec.outage.as_millis()
                )
            }
        },
        FaultKind::DatabaseOutage => {
            let proxy = res.proxy.as_ref().ok_or_else(not_running)?;
            let worker_proxy = res.worker_proxy.as_ref().ok_or_else(not_running)?;
            proxy.cut();
            worker_proxy.cut();
            tokio::time::sleep(spec.outage).await;
            proxy.restore();
            worker_proxy.restore();
            format!(
                "every PostgreSQL connection of the fleet dropped and new ones refused for {} ms",
                spec.outage.as_millis()
            )
        }
        FaultKind::DatabaseReadOnly => {
            let db = res.db.as_ref().ok_or_else(not_running)?;
            db.set_read_only(true).await?;
            tokio::time::sleep(spec.read_only_for).await;
            db.set_read_only(false).await?;
            format!(
                "the database set read-only (default_transaction_read_only = on, its sessions terminated) for {} ms under {} msg/s with one worker, then read-write again (sessions terminated again)",
                spec.read_only_for.as_millis(),
                spec.read_only_rate
            )
        }
        FaultKind::WorkerRestarts => {
            let traffic = res.traffic.clone().ok_or_else(not_running)?;
            let fleet = res.fleet.as_mut().ok_or_else(not_running)?;
            let idx = fleet.live(Role::Worker, 0).ok_or_else(not_running)?;
            fleet.kill9(idx).await;
            let acked_at_kill = traffic.acked_count();
            traffic.burst(usize::try_from(spec.backlog).unwrap_or(usize::MAX));
            let deadline = Instant::now() + Duration::from_secs(120);
            while traffic.acked_count().saturating_sub(acked_at_kill) < spec.backlog {
                if Instant::now() > deadline {
                    return Err(FaultError::Service(format!(
                        "no backlog of {} events within 120 s",
                        spec.backlog
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let backlog = traffic.acked_count() - acked_at_kill;
            for _ in 0..spec.restarts {
                let idx = fleet.spawn(Role::Worker).await?;
                tokio::time::sleep(spec.restart_every).await;
                fleet.kill9(idx).await;
            }
            fleet.spawn(Role::Worker).await?;
            format!(
                "the only worker killed (SIGKILL), a burst of {} messages sent until {backlog} events waited, then the worker started and killed again {} times, {} ms apart, while it worked the backlog off, then started for good",
                spec.backlog,
                spec.restarts,
                spec.restart_every.as_millis()
            )
        }
        FaultKind::RemovedWhileDisconnected => {
            let traffic = res.traffic.clone().ok_or_else(not_running)?;
            let fleet = res.fleet.as_ref().ok_or_else(not_running)?;
            let urls = fleet.urls();
            let pid = gateway_pid(fleet, 0).ok_or_else(not_running)?;
            let ch = traffic.channels[0].clone();
            let creator = ch.members[0];
            let victim = ch
                .members
                .iter()
                .copied()
                .skip(1)
                .find(|&m| traffic.users[m].home == 0)
                .ok_or_else(|| FaultError::Service("no member to remove on gateway 0".into()))?;
            let token = traffic.token(creator)?;
            let path = format!(
                "/api/channels/{}/members/{}",
                ch.id, traffic.users[victim].name
            );
            let until = Instant::now() + spec.outage;
            let mut cut = cut_gateway_broker(spec, res, pid).await?;
            traffic.removing(victim, 0);
            let (status, body) =
                services::http(&urls[1], "DELETE", &path, Some(&token), None).await?;
            res.delete_status = Some(status);
            let mut rounds = 1;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
                cut += cut_gateway_broker(spec, res, pid).await?;
                rounds += 1;
            }
            format!(
                "gateway 0's broker connections closed ({cut} connections in {rounds} rounds over {} ms: closed again as soon as it reconnected); right after the first close, {} (creator of {}) removed {} (whose session was on gateway 0) with DELETE on gateway 1: {status} {}",
                spec.outage.as_millis(),
                traffic.users[creator].name,
                ch.id,
                traffic.users[victim].name,
                body.trim()
            )
        }
        FaultKind::NodeLoss if res.rabbit_cluster.is_some() => {
            return rabbitmq_node_loss(res).await;
        }
        FaultKind::NodeLoss => {
            let fleet = res.fleet.as_ref().ok_or_else(not_running)?;
            let idx = fleet.live(Role::Gateway, 0).ok_or_else(not_running)?;
            let server = format!("{}-{}", res.namespace, fleet.nodes[idx].name);
            let cluster = res.redis_cluster.as_ref().ok_or_else(|| {
                FaultError::Service("node_loss needs a cluster (FaultSpec::cluster)".into())
            })?;
            let failed = |e: fanout_localcluster::redis::ClusterError| {
                FaultError::Service(format!("the Redis Cluster: {e}"))
            };
            // The channel's name as the backend spells it (keys.rs).
            let channel = format!("{ns}:out:{{{ns}.{server}}}", ns = res.namespace);
            let killed = cluster.kill_primary_of(&channel).await.map_err(failed)?;
            let killed_at = killed.killed_at;
            let port = killed.port;
            let failover = cluster
                .wait_failover(&killed, Duration::from_secs(30))
                .await
                .map_err(failed)?;
            let rejoin = cluster.restart(killed).await.map_err(failed)?;
            return Ok((
                format!(
                    "SIGKILL to the Redis primary on port {port} (gateway 0's channel, a third of the streams and route sets); its replica took over {} ms later; the killed node rejoined as a replica in {} ms",
                    failover.as_millis(),
                    rejoin.as_millis()
                ),
                Some(killed_at),
            ));
        }
        FaultKind::BusyChannelRouteLoss => {
            let fleet = res.fleet.as_ref().ok_or_else(not_running)?;
            let pid = gateway_pid(fleet, 0).ok_or_else(not_running)?;
            let cut = cut_gateway_broker(spec, res, pid).await?;
            if cut == 0 {
                return Err(FaultError::Service(
                    "no broker connection of gateway 0 found to close".into(),
                ));
            }
            return Ok((
                format!(
                    "one channel of {} members (every gateway), {} msg/s in total from every member; gateway 0's {cut} broker connections closed by the broker",
                    spec.busy_users, spec.busy_rate
                ),
                Some(Instant::now()),
            ));
        }
    };
    Ok((what, None))
}

async fn teardown(spec: &FaultSpec, res: &mut Resources) {
    // Processes shutting down may still want the database.
    for proxy in [&res.proxy, &res.worker_proxy].into_iter().flatten() {
        proxy.restore();
        proxy.set_delay(Duration::ZERO, b"");
    }
    if let Some(traffic) = res.traffic.take() {
        traffic.close();
        // Let the clients' close frames go out before the gateways stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(mut fleet) = res.fleet.take() {
        fleet.stop().await;
    }
    let config = broker_config(spec, res);
    let purge =
        res.redis.is_some() || res.redis_cluster.is_some() || spec.backend == BackendKind::Rabbitmq;
    res.rabbit_cluster = None;
    if purge {
        if let Err(e) = fanout::app::purge_namespace(&config).await {
            tracing::warn!(namespace = %res.namespace, error = %e, "cannot purge the run's namespace");
        }
    }
    if let Some(redis) = res.redis.take() {
        redis.discard().await;
    }
    if let Some(cluster) = res.redis_cluster.take() {
        cluster.stop().await;
    }
    res.proxy = None;
    res.worker_proxy = None;
    if let Some(db) = res.db.take() {
        db.drop_db().await;
    }
}

/// A configuration that reaches the run's broker namespace.
fn broker_config(spec: &FaultSpec, res: &Resources) -> Config {
    let mut config = Config {
        backend: spec.backend,
        namespace: res.namespace.clone(),
        rabbitmq_url: spec.rabbitmq_url.clone(),
        ..Config::default()
    };
    if let Some(redis) = &res.redis {
        config.redis_url = redis.url();
    }
    if let Some(cluster) = &res.redis_cluster {
        config.redis_url = cluster.seeds.clone();
        config.redis.cluster = true;
    }
    if let Some(cluster) = res.rabbit_cluster {
        config.rabbitmq_url = cluster.url_list();
    }
    config
}

/// [`FaultKind::NodeLoss`] on the RabbitMQ cluster: SIGKILL of the node
/// gateway 0 is connected to; once the gateway is connected to another
/// node (or 30 s passed), the killed node is started again. The fault
/// time is the kill.
async fn rabbitmq_node_loss(res: &Resources) -> Result<(String, Option<Instant>), FaultError> {
    let not_running = || FaultError::Service("the fleet is not running".into());
    let fleet = res.fleet.as_ref().ok_or_else(not_running)?;
    let pid = gateway_pid(fleet, 0).ok_or_else(not_running)?;
    let cluster = res
        .rabbit_cluster
        .ok_or_else(|| FaultError::Service("node_loss needs a cluster".into()))?;
    let nodes_of = |pid: u32| -> Vec<usize> {
        rabbitmq::NODES
            .into_iter()
            .filter(|&n| !local_ports_to(pid, rabbitmq::amqp_port(n)).is_empty())
            .collect()
    };
    let victim = *nodes_of(pid).first().ok_or_else(|| {
        FaultError::Service("gateway 0 has no connection to any node of the cluster".into())
    })?;
    let killed_at = Instant::now();
    on_cluster(move || cluster.kill(victim)).await?;
    // Its connections are gone with the node; a new one elsewhere is the
    // gateway's failover.
    let moved = loop {
        let now = nodes_of(pid);
        if now.iter().any(|&n| n != victim) {
            break Some(killed_at.elapsed());
        }
        if killed_at.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let restart = Instant::now();
    on_cluster(move || cluster.start_node(victim)).await?;
    Ok((
        format!(
            "SIGKILL to RabbitMQ node {victim} (port {}, gateway 0's node, with its share of the quorum leaders); gateway 0 connected to another node {}; the killed node was started again and rejoined in {} ms",
            rabbitmq::amqp_port(victim),
            moved.map_or_else(
                || "NOT within 30 s".to_owned(),
                |d| format!("{} ms after the kill", d.as_millis())
            ),
            restart.elapsed().as_millis()
        ),
        Some(killed_at),
    ))
}

/// Runs a (blocking) cluster operation off the runtime's threads.
async fn on_cluster(
    op: impl FnOnce() -> Result<(), fanout_localcluster::ClusterError> + Send + 'static,
) -> Result<(), FaultError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|e| FaultError::Service(format!("a RabbitMQ cluster task: {e}")))?
        .map_err(|e| FaultError::Service(format!("the RabbitMQ cluster: {e}")))
}

/// The pid of the `i`-th live gateway.
fn gateway_pid(fleet: &Fleet, i: usize) -> Option<u32> {
    fleet.live(Role::Gateway, i).map(|idx| fleet.nodes[idx].pid)
}

/// Closes, from the broker's side, the broker connections of the process
/// `pid` (found by their local ports in `/proc`); how many were closed.
async fn cut_gateway_broker(
    spec: &FaultSpec,
    res: &Resources,
    pid: u32,
) -> Result<u64, FaultError> {
    let port = match &res.redis {
        Some(r) => r.port,
        None => amqp_port(&spec.rabbitmq_url),
    };
    let local = local_ports_to(pid, port);
    if local.is_empty() {
        return Ok(0);
    }
    match &res.redis {
        Some(redis) => redis.kill_addrs(&local).await,
        None => {
            let listing = services::rabbitmqctl(
                &spec.rabbitmqctl,
                &["list_connections", "-q", "pid", "peer_port"],
                Duration::from_secs(30),
            )
            .await?;
            let pids: Vec<String> = listing
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .filter(|(_, p)| p.trim().parse::<u16>().is_ok_and(|p| local.contains(&p)))
                .map(|(pid, _)| pid.to_owned())
                .filter(|p| {
                    p.starts_with('<')
                        && p.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"<>@._-".contains(&b))
                })
                .collect();
            if !pids.is_empty() {
                services::rabbitmq_close(&spec.rabbitmqctl, &pids).await?;
            }
            Ok(pids.len() as u64)
        }
    }
}

/// The port of an `amqp://user:pass@host:port/vhost` URL (5672 if none).
fn amqp_port(url: &str) -> u16 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hostport
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(5672)
}

/// Local ports of the established TCP connections of process `pid` to
/// remote port `port`.
fn local_ports_to(pid: u32, port: u16) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    let hex_port = |a: &str| {
        a.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "01" && hex_port(f[2]) == Some(port) && inodes.contains(f[9])
            {
                out.extend(hex_port(f[1]));
            }
        }
    }
    out
}

/// For `RemovedWhileDisconnected`: (channel events beyond the removal shown
/// to the removed member, 1 if it never got its removal, what arrived).
fn removal_check(t: &Traffic) -> Option<(u64, u64, String)> {
    let r = t.removals().into_iter().next()?;
    let stream = format!("channel:{}", t.channels[r.channel].id);
    let victim = t.users[r.user].name.clone();
    let receipts = t.receipts();
    let is_removal = |e: &Receipt| {
        e.stream == stream
            && e.change
                .as_ref()
                .is_some_and(|(u, c)| *u == victim && c == "removed")
    };
    let removal_seq = receipts.iter().find(|e| is_removal(e)).map(|e| e.seq);
    let mine: Vec<&Receipt> = receipts
        .iter()
        .filter(|e| e.user == r.user && e.stream == stream)
        .collect();
    let got = mine.iter().any(|e| is_removal(e));
    let beyond: Vec<&&Receipt> = mine
        .iter()
        .filter(|e| removal_seq.is_some_and(|s| e.seq > s))
        .collect();
    let last = mine.last().map_or_else(
        || "none".to_owned(),
        |e| format!("#{} {} (session {})", e.seq, e.event, e.session),
    );
    let shown: Vec<String> = beyond
        .iter()
        .take(5)
        .map(|e| {
            format!(
                "#{} {} {}/{} (session {})",
                e.seq, e.event, e.sender, e.cmid, e.session
            )
        })
        .collect();
    let detail = format!(
        "the removal of {victim} is {stream} {}; {victim}'s sessions received {} events of {stream}, the last {last}, the removal {}; beyond it {} [{}]",
        removal_seq.map_or_else(|| "never seen by anyone".to_owned(), |s| format!("#{s}")),
        mine.len(),
        if got { "included" } else { "MISSING" },
        beyond.len(),
        shown.join(", ")
    );
    Some((beyond.len() as u64, u64::from(!got), detail))
}

/// Creates the run's channels through the REST API.
async fn create_channels(traffic: &Traffic, url: &str) -> Result<(), FaultError> {
    for ch in &traffic.channels {
        let Some((&creator, others)) = ch.members.split_first() else {
            continue;
        };
        let members: Vec<&str> = others
            .iter()
            .map(|&u| traffic.users[u].name.as_str())
            .collect();
        let token = traffic.token(creator)?;
        crate::load::create_channel(&reqwest::Client::new(), url, &token, &ch.id, &members)
            .await
            .map_err(FaultError::Service)?;
    }
    Ok(())
}

async fn read_stored(conn: &mut sqlx::PgConnection) -> Result<Vec<StoredRow>, FaultError> {
    let rows = sqlx::query("SELECT id, sender_id, client_msg_id FROM messages")
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(StoredRow {
                id: r.try_get("id")?,
                sender: r.try_get("sender_id")?,
                cmid: r.try_get("client_msg_id")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(FaultError::from)
}

/// Sums `duplicates_dropped` and `routes_lost` over the live gateways.
async fn scrape_gateways(urls: &[String]) -> (u64, u64) {
    let (mut dups, mut lost) = (0.0, 0.0);
    for url in urls {
        match services::http(url, "GET", "/metrics", None, None).await {
            Ok((200, text)) => {
                dups += services::metric_sum(&text, "duplicates_dropped_total");
                lost += services::metric_sum(&text, "routes_lost_total");
            }
            other => tracing::warn!(%url, result = ?other.map(|(s, _)| s), "cannot read metrics"),
        }
    }
    (dups as u64, lost as u64)
}

/// Host and port of a `postgres://user@host:port/db` URL.
async fn postgres_addr(url: &str) -> Result<SocketAddr, FaultError> {
    let bad = || FaultError::Service(format!("cannot find host and port in {url:?}"));
    let rest = url.split_once("://").ok_or_else(bad)?.1;
    let authority = rest.split('/').next().ok_or_else(bad)?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let mut addrs = tokio::net::lookup_host(hostport.as_str())
        .await
        .map_err(|source| FaultError::Io {
            what: format!("resolving {hostport}"),
            source,
        })?;
    addrs.next().ok_or_else(bad)
}

/// `url` with its host and port replaced by `addr`.
fn via(url: &str, addr: SocketAddr) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let user = authority.rsplit_once('@').map(|(u, _)| u);
    match user {
        Some(u) => format!("{scheme}://{u}@{addr}/{path}"),
        None => format!("{scheme}://{addr}/{path}"),
    }
}

/// What was done, and what the numbers say, in words.
fn note(spec: &FaultSpec, r: &FaultResult, what: &str) -> String {
    let mut parts = vec![format!("{what}.")];
    if r.retried > 0 {
        let why: Vec<String> = r
            .send_failures
            .iter()
            .map(|(f, n)| format!("{n} {f}"))
            .collect();
        parts.push(format!(
            "{} messages needed a retry with the same clientMsgId (failed sends: {}).",
            r.retried,
            why.join(", ")
        ));
    }
    if let Some(n) = r.stored_unacked_at_kill {
        parts.push(format!(
            "{n} messages were stored but not yet published or acked by the killed worker; the broker redelivered them and they were shown once."
        ));
    }
    if r.redeliveries_suppressed > 0 {
        parts.push(format!(
            "{} redelivered copies were dropped by the sessions (at or below their position).",
            r.redeliveries_suppressed
        ));
    }
    if r.reconnects > 0 {
        parts.push(format!(
            "{} sessions were re-established, the longest gap {} ms.",
            r.reconnects, r.longest_offline_ms
        ));
    }
    if r.not_delivered_offline > 0 {
        parts.push(format!(
            "{} deliveries were missed by sessions that were down; they are in the history.",
            r.not_delivered_offline
        ));
    }
    if r.not_delivered_online > 0 {
        let why = match (spec.backend, r.fault) {
            (BackendKind::Redis, _) => {
                "messages published to a gateway's Pub/Sub channel while its subscriber was reconnecting are dropped by Redis, and the gateway does not catch up from the store after re-binding"
            }
            (_, FaultKind::BrokerConnectionKill | FaultKind::BrokerRestart) => {
                "a gateway's exclusive queue is deleted with its connection (with what it held), and messages routed before the gateway re-bound are unroutable; the gateway does not catch up from the store after re-binding"
            }
            _ => "not expected for this fault: see the logs",
        };
        parts.push(format!(
            "{} deliveries to connected sessions were lost: {why}.",
            r.not_delivered_online
        ));
    }
    if r.stored_not_acked > 0 {
        parts.push(format!(
            "{} stored messages were never acked (the retry budget ran out).",
            r.stored_not_acked
        ));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_database_urls() {
        let addr: SocketAddr = "127.0.0.1:6000".parse().expect("addr");
        assert_eq!(
            via("postgres://postgres@127.0.0.1:5432/fanout_x", addr),
            "postgres://postgres@127.0.0.1:6000/fanout_x"
        );
        assert_eq!(
            via("postgres://localhost/db", addr),
            "postgres://127.0.0.1:6000/db"
        );
    }

    #[test]
    fn fault_names_are_snake_case() {
        for f in FaultKind::ALL {
            let json = serde_json::to_string(&f).expect("serializes");
            assert_eq!(json, format!("\"{}\"", f.as_str()));
        }
    }
}
