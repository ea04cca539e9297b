//! One typed configuration, read from a TOML file and then `FANOUT_*`
//! environment variables (the environment wins). Unknown keys are an error
//! at start, so a typo never becomes a silent default.
//!
//! Top-level keys map to `FANOUT_<KEY>` (`FANOUT_DATABASE_URL`); keys in a
//! section to `FANOUT_<SECTION>__<KEY>` (`FANOUT_LIMITS__MAX_CONTENT_BYTES`).
//! `docs/configuration.md` lists every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Every `FANOUT_*` environment variable the project uses that is not a
/// configuration key, in one place: the config file's path, and the
/// switches of the test suites and the benchmark. Lower case, without the
/// `FANOUT_` prefix; a trailing `*` matches any rest. Any other `FANOUT_*`
/// variable is a key, and an unknown key is refused at start, so a process
/// that inherits one of these from a test or CI shell must still start
/// (`tests/ops.rs` sets them all).
pub const NON_CONFIG_ENV: &[&str] = &[
    "config",
    "bench_postgres_url",
    "bench_report_dir",
    "bin",
    "e2e_*",
    "rabbitmq_cluster_urls",
    "rabbitmq_queue_type",
    "redis_test_*",
    "rmq_cluster_dir",
    "test_*",
];

/// Whether `name` (`FANOUT_TEST_FAULTS` or `test_faults`, any case) is one
/// of [`NON_CONFIG_ENV`].
pub fn is_non_config_env(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let key = lower.strip_prefix("fanout_").unwrap_or(&lower);
    NON_CONFIG_ENV.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => key == *p,
    })
}

/// The worker's default address: the gateway's default port is 3000, and a
/// worker beside a gateway on one host must not take it.
pub const WORKER_DEFAULT_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 3100);

/// Which broker carries events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// In-process; single node only. The default.
    Memory,
    /// RabbitMQ: exchanges, partition queues, bindings as the routing table.
    Rabbitmq,
    /// Redis: route sets, per-server Pub/Sub, partitioned streams.
    Redis,
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Broker backend: `memory`, `rabbitmq` or `redis`. Default `memory`.
    pub backend: BackendKind,
    /// Address the gateway (or the worker's health and metrics endpoint)
    /// listens on. Default `127.0.0.1:3000`, and `127.0.0.1:3100` for
    /// `fanout worker` when not set; port 0 picks a free port (the chosen
    /// address is printed on stdout).
    pub listen: SocketAddr,
    /// Whether `listen` was set (file or environment) rather than defaulted.
    #[serde(skip)]
    pub listen_set: bool,
    /// `sqlite:PATH` or `postgres://...`. Default: `sqlite:` a file
    /// `fanout.db` in `data_dir`, created if missing.
    pub database_url: Option<String>,
    /// HS256 secret for client tokens, at least 32 bytes. Default: none;
    /// `serve` and `token` then use (and create) `data_dir/jwt-secret`,
    /// `gateway` and `worker` refuse to start.
    pub jwt_secret: Option<String>,
    /// Directory for the embedded defaults (SQLite file, generated secret).
    /// Default `fanout-data`.
    pub data_dir: PathBuf,
    /// Prefix of every name the backend creates on its broker. Default `fanout`.
    pub namespace: String,
    /// This gateway's id among live gateways. Default: `gw-` and a random id.
    pub server_id: Option<String>,
    /// Log filter (tracing's `EnvFilter` syntax). Default `info`.
    pub log: String,
    /// RabbitMQ URL. Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub rabbitmq_url: String,
    /// Redis URL, or with `redis.cluster` a comma-separated list of seed
    /// nodes. Default `redis://127.0.0.1:6379`.
    pub redis_url: String,
    /// Bound on every broker call (publish confirm, bind, ...), in
    /// milliseconds; a send not confirmed in time is answered
    /// `unavailable`. Default 5000.
    pub broker_timeout_ms: u64,
    /// RabbitMQ backend settings.
    pub rabbitmq: RabbitMqSection,
    /// Redis backend settings.
    pub redis: RedisSection,
    /// The incoming side.
    pub incoming: IncomingConfig,
    /// Workers.
    pub worker: WorkerConfig,
    /// Gateways.
    pub gateway: GatewayConfig,
    /// Limits on client input.
    pub limits: LimitsConfig,
    /// The database pool.
    pub database: DatabaseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backend: BackendKind::Memory,
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            listen_set: false,
            database_url: None,
            jwt_secret: None,
            data_dir: PathBuf::from("fanout-data"),
            namespace: "fanout".to_owned(),
            server_id: None,
            log: "info".to_owned(),
            rabbitmq_url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            broker_timeout_ms: 5000,
            rabbitmq: RabbitMqSection::default(),
            redis: RedisSection::default(),
            incoming: IncomingConfig::default(),
            worker: WorkerConfig::default(),
            gateway: GatewayConfig::default(),
            limits: LimitsConfig::default(),
            database: DatabaseConfig::default(),
        }
    }
}

/// RabbitMQ incoming queue types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// Replicated, with a broker-side delivery limit. The default.
    Quorum,
    /// Cheaper, single-node; attempts counted by the consumer.
    Classic,
}

/// `[rabbitmq]`: the RabbitMQ backend (`docs/backends/rabbitmq.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitMqSection {
    /// Type of the incoming partition queues: `quorum` or `classic`.
    /// Default `quorum`.
    pub queue_type: QueueKind,
    /// Unacked deliveries per gateway queue. Default 1000.
    pub server_prefetch: u16,
}

impl Default for RabbitMqSection {
    fn default() -> Self {
        Self {
            queue_type: QueueKind::Quorum,
            server_prefetch: 1000,
        }
    }
}

/// `[redis]`: the Redis backend (`docs/backends/redis.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// Redis Cluster mode (`FANOUT_REDIS__CLUSTER=true`): `redis_url` is
    /// then a comma-separated list of seed nodes, keys carry hash tags and
    /// each gateway's channel is a sharded channel. Default false.
    pub cluster: bool,
    /// Replicas that must confirm an accepted event, a route or a lease
    /// before it counts (Redis `WAIT`), so losing a primary loses none of
    /// them. Default 1 with `cluster` (a cluster without replicas needs 0),
    /// else 0.
    pub wait_replicas: Option<u32>,
    /// TTL of a gateway's liveness key, ms; a crashed gateway's routes are
    /// gone within 1.375 times this. Default 10000.
    pub liveness_ttl_ms: u64,
    /// TTL of a worker's partition lease, ms: how long a crashed worker's
    /// partitions wait before another takes them. Default 10000.
    pub lease_ttl_ms: u64,
    /// Idle time before a dead consumer's pending entries are claimed, ms;
    /// keep it above the slowest event's processing time. Default 10000.
    pub claim_idle_ms: u64,
    /// Beyond this many entries, a stream is trimmed of every acked entry
    /// (never of an unacked one, so a backlog may exceed it). Default 100000.
    pub max_stream_len: usize,
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            cluster: false,
            wait_replicas: None,
            liveness_ttl_ms: 10_000,
            lease_ttl_ms: 10_000,
            claim_idle_ms: 10_000,
            max_stream_len: 100_000,
        }
    }
}

/// The incoming side: how it is partitioned and when an event is poison.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IncomingConfig {
    /// Partitions of the incoming side; each is consumed by one worker at a
    /// time, so this bounds worker parallelism. Every process of one
    /// deployment must use the same value. Default 16.
    pub partitions: u32,
    /// Times a worker tries to store a message that the database refuses
    /// by its content (while it takes a probe message) before it
    /// dead-letters it. Broker redeliveries and infrastructure errors never
    /// count. Default 5.
    pub max_attempts: u32,
}

impl Default for IncomingConfig {
    fn default() -> Self {
        Self {
            partitions: 16,
            max_attempts: 5,
        }
    }
}

/// Workers: consume, persist, route.
/// The largest `worker.batch_size`: a batch is one statement of 13 bound
/// values a message on PostgreSQL, which takes at most 65,535.
pub const MAX_WORKER_BATCH: u32 = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Consumers per worker process (each owns a share of the partitions).
    /// Default 2.
    pub consumers: u32,
    /// Most events written to the database in one round trip. Default 256,
    /// at most [`MAX_WORKER_BATCH`].
    pub batch_size: u32,
    /// Most unsettled events per consumer. Default 512.
    pub prefetch: u16,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            consumers: 2,
            batch_size: 256,
            prefetch: 512,
        }
    }
}

/// Gateways: sessions and delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// No effect since sessions are sequenced by position (a session drops
    /// what it already has by position, whatever the window); accepted so
    /// that older configuration files still load.
    pub dedup_window: usize,
    /// `(sender, clientMsgId)` pairs remembered per gateway so that a retry's
    /// ack carries the first send's id. Default 65536.
    pub retry_cache: usize,
    /// No effect since membership changes have positions; accepted so that
    /// older configuration files still load.
    pub catch_up_skew_ms: i64,
    /// No effect since sessions are filled by position after a route loss;
    /// accepted so that older configuration files still load.
    pub loss_catch_up_ms: i64,
    /// How long a session waits for a missing position before the gateway
    /// reads it from the store, in milliseconds. Entries of one inbox come
    /// from several workers and may arrive out of order by a few
    /// milliseconds; a read is only made if the gap is still there.
    /// Default 150.
    pub gap_wait_ms: u64,
    /// Most entries a resume replays per stream; a stream missing more is
    /// replayed from its newest `replay_limit` entries and reported in
    /// `RESUMED.incomplete` (the client reloads the rest from history).
    /// Written at the socket's pace, so it may exceed `limits.send_buffer`.
    /// Default 500.
    pub replay_limit: u32,
    /// Seconds a graceful shutdown waits for in-flight sends. Default 10.
    pub shutdown_grace_secs: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            dedup_window: 1024,
            retry_cache: 65_536,
            catch_up_skew_ms: 0,
            loss_catch_up_ms: 5000,
            gap_wait_ms: 150,
            replay_limit: 500,
            shutdown_grace_secs: 10,
        }
    }
}

/// Limits on what clients send, and on what a slow client may hold back.
/// `docs/security.md` says what each one defends against.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message `content`, in UTF-8 bytes; at most
    /// [`MAX_CONTENT_BYTES_CEILING`]. Default 4096.
    pub max_content_bytes: usize,
    /// Largest Engine.IO payload (a polling body, one WebSocket message or
    /// frame, or the binary attachments of one event together), in bytes;
    /// larger ones close the connection. Default 65536.
    pub max_payload_bytes: u64,
    /// Largest HTTP API request body, in bytes. Default 65536.
    pub max_http_body_bytes: usize,
    /// Sustained `sendMessage` events per second per connection. Default 50.
    pub messages_per_second: u32,
    /// Burst above the sustained rate. Default 100.
    pub message_burst: u32,
    /// Sustained `sendMessage` events per second of one user, all of the
    /// user's connections to one gateway together. Default: twice
    /// `messages_per_second` (two tabs at full speed).
    pub user_messages_per_second: Option<u32>,
    /// Burst above the per-user rate. Default: twice `message_burst`.
    pub user_message_burst: Option<u32>,
    /// Sends queued per connection while earlier ones wait for the broker;
    /// beyond it sends are answered `rate_limited`. Default 256.
    pub send_queue: usize,
    /// Live connections of one user on one gateway; one more is refused
    /// with `too_many_connections`. Default 16.
    pub max_connections_per_user: usize,
    /// Engine.IO packets (events, acks, pings) waiting to be written to
    /// one connection. A connection whose buffer is full is a slow client:
    /// it is sent nothing more and disconnected. Default 1024.
    pub send_buffer: usize,
    /// Members given when creating a channel. Default 1000.
    pub max_initial_members: usize,
    /// Sustained HTTP API requests per second of one user on one gateway
    /// (`429 rate_limited` beyond). Default 50.
    pub api_requests_per_second: u32,
    /// Burst above the API rate. Default 100.
    pub api_burst: u32,
    /// Sustained channel membership changes per second of one user on one
    /// gateway: each member named at creation (the creator included), each
    /// added and each removed member counts one (`429 rate_limited`
    /// beyond). Default 100.
    pub membership_changes_per_second: u32,
    /// Burst above the membership rate; at least
    /// `max_initial_members + 1`, so one full channel creation always fits.
    /// Default 2000.
    pub membership_burst: u32,
    /// Sustained Socket.IO handshakes per second of one user on one gateway
    /// (`connect_error` `rate_limited` beyond). Default 2.
    pub handshakes_per_second: u32,
    /// Burst above the handshake rate: every tab of a user reconnecting at
    /// once after a gateway restart fits. Default 32.
    pub handshake_burst: u32,
}

/// The largest `limits.max_content_bytes` a gateway may accept: the worker
/// refuses (dead-letters) anything longer, so a higher limit would ack
/// messages that can never be stored.
pub const MAX_CONTENT_BYTES_CEILING: usize = 1 << 20;

/// The smallest `limits.send_buffer`: acks and pings share the buffer
/// with events, so a tiny one would cut off clients that are merely busy.
pub const MIN_SEND_BUFFER: usize = 16;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_content_bytes: 4096,
            max_payload_bytes: 65_536,
            max_http_body_bytes: 65_536,
            messages_per_second: 50,
            message_burst: 100,
            user_messages_per_second: None,
            user_message_burst: None,
            send_queue: 256,
            max_connections_per_user: 16,
            send_buffer: 1024,
            max_initial_members: 1000,
            api_requests_per_second: 50,
            api_burst: 100,
            membership_changes_per_second: 100,
            membership_burst: 2000,
            handshakes_per_second: 2,
            handshake_burst: 32,
        }
    }
}

impl LimitsConfig {
    /// The per-user sustained send rate, with its default filled in.
    pub fn user_rate(&self) -> u32 {
        self.user_messages_per_second
            .unwrap_or_else(|| self.messages_per_second.saturating_mul(2))
    }

    /// The per-user burst, with its default filled in.
    pub fn user_burst(&self) -> u32 {
        self.user_message_burst
            .unwrap_or_else(|| self.message_burst.saturating_mul(2))
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_content_bytes == 0 || self.messages_per_second == 0 || self.send_queue == 0 {
            return Err("limits.max_content_bytes, limits.messages_per_second and limits.send_queue must be at least 1".into());
        }
        if self.max_content_bytes > MAX_CONTENT_BYTES_CEILING {
            return Err(format!(
                "limits.max_content_bytes must be at most {MAX_CONTENT_BYTES_CEILING} (what workers store)"
            ));
        }
        if self.max_payload_bytes < self.max_content_bytes as u64 + 512 {
            return Err("limits.max_payload_bytes must exceed limits.max_content_bytes by at least 512 bytes of envelope".into());
        }
        if self.user_messages_per_second == Some(0) || self.user_message_burst == Some(0) {
            return Err(
                "limits.user_messages_per_second and limits.user_message_burst must be at least 1"
                    .into(),
            );
        }
        if self.max_connections_per_user == 0
            || self.api_requests_per_second == 0
            || self.api_burst == 0
        {
            return Err("limits.max_connections_per_user, limits.api_requests_per_second and limits.api_burst must be at least 1".into());
        }
        if self.membership_changes_per_second == 0
            || self.handshakes_per_second == 0
            || self.handshake_burst == 0
        {
            return Err("limits.membership_changes_per_second, limits.handshakes_per_second and limits.handshake_burst must be at least 1".into());
        }
        if (self.membership_burst as usize) <= self.max_initial_members {
            return Err(format!(
                "limits.membership_burst must exceed limits.max_initial_members ({}), so that one full channel creation fits; got {}",
                self.max_initial_members, self.membership_burst
            ));
        }
        if self.send_buffer < MIN_SEND_BUFFER {
            return Err(format!(
                "limits.send_buffer must be at least {MIN_SEND_BUFFER} packets"
            ));
        }
        Ok(())
    }
}

/// The database pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Pool size. Default 10.
    pub max_connections: u32,
    /// Seconds to wait for a connection before an operation fails. Default 5.
    pub acquire_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout_secs: 5,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Parsing or merging failed (unknown key, wrong type, bad file).
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// A value is out of its range.
    #[error("invalid configuration: {0}")]
    Value(String),
}

/// The `--config` option both binaries (`fanout`, `fanout-bench`) take;
/// `#[command(flatten)]` it into a clap parser.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file (default: ./fanout.toml if present).
    /// FANOUT_* environment variables override it.
    #[arg(long, global = true, env = "FANOUT_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// The configuration these arguments name (see [`Config::load`]).
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref())
    }
}

impl Config {
    /// Reads defaults, then `file` (if given, it must exist; otherwise
    /// `fanout.toml` if present), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // What the operator set, apart from the defaults: `listen_set`.
        let mut fig = Figment::new();
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Value(format!(
                        "config file {} does not exist",
                        path.display()
                    )));
                }
                fig = fig.merge(Toml::file_exact(path));
            }
            None => fig = fig.merge(Toml::file("fanout.toml")),
        }
        let env = Env::prefixed("FANOUT_")
            .split("__")
            .filter(|k| !is_non_config_env(k.as_str()));
        let set = fig.merge(env);
        let mut config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(set.clone())
            .extract()
            .map_err(Box::new)?;
        config.listen_set = set.contains("listen");
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Value(m.to_owned()));
        if self.incoming.partitions == 0 || self.incoming.partitions > 1024 {
            return bad("incoming.partitions must be 1 to 1024");
        }
        if self.incoming.max_attempts == 0 {
            return bad("incoming.max_attempts must be at least 1");
        }
        if self.worker.consumers == 0 || self.worker.batch_size == 0 || self.worker.prefetch == 0 {
            return bad(
                "worker.consumers, worker.batch_size and worker.prefetch must be at least 1",
            );
        }
        if self.worker.batch_size > MAX_WORKER_BATCH {
            return bad(&format!("worker.batch_size must be at most {MAX_WORKER_BATCH} (one statement binds 13 values a message; PostgreSQL takes 65535)"));
        }
        self.limits.validate().map_err(ConfigError::Value)?;
        if self.gateway.replay_limit == 0 || self.gateway.replay_limit > 100_000 {
            return bad("gateway.replay_limit must be 1 to 100000");
        }
        if self.gateway.gap_wait_ms > 60_000 {
            return bad("gateway.gap_wait_ms must be at most 60000");
        }
        if self.broker_timeout_ms == 0
            || self.redis.liveness_ttl_ms < 1000
            || self.redis.lease_ttl_ms < 1000
        {
            return bad("broker_timeout_ms must be positive; redis.liveness_ttl_ms and redis.lease_ttl_ms at least 1000");
        }
        if !fanout_backend::is_valid_id(&self.namespace) {
            return bad("namespace must be 1 to 64 characters of [A-Za-z0-9_-]");
        }
        if let Some(id) = &self.server_id {
            if !fanout_backend::is_valid_id(id) {
                return bad("server_id must be 1 to 64 characters of [A-Za-z0-9_-]");
            }
        }
        if let Some(s) = &self.jwt_secret {
            crate::auth::check_secret(
                s,
                "jwt_secret (FANOUT_JWT_SECRET or the configuration file)",
            )
            .map_err(|e| ConfigError::Value(e.to_string()))?;
        }
        Ok(())
    }

    /// The address `fanout worker` serves `/healthz`, `/readyz` and
    /// `/metrics` on: `listen` if set, else [`WORKER_DEFAULT_LISTEN`].
    pub fn worker_listen(&self) -> SocketAddr {
        if self.listen_set {
            self.listen
        } else {
            SocketAddr::from(WORKER_DEFAULT_LISTEN)
        }
    }

    /// The database URL, with the embedded default filled in.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite:{}?mode=rwc",
                self.data_dir.join("fanout.db").display()
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's own signature
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "fanout.toml",
                "backend = \"memory\"\n[limits]\nmax_content_byte = 10\n",
            )?;
            let err = Config::load(None).expect_err("typo must fail");
            assert!(err.to_string().contains("max_content_byte"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_worker_batch_beyond_one_statement_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FANOUT_WORKER__BATCH_SIZE", "4097");
            let err = Config::load(None).expect_err("too large");
            assert!(err.to_string().contains("at most 4096"), "{err}");
            jail.set_env("FANOUT_WORKER__BATCH_SIZE", "4096");
            assert_eq!(Config::load(None).expect("valid").worker.batch_size, 4096);
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "fanout.toml",
                "listen = \"127.0.0.1:1\"\n[limits]\nmax_content_bytes = 10\n",
            )?;
            jail.set_env("FANOUT_LISTEN", "127.0.0.1:2");
            jail.set_env("FANOUT_LIMITS__MAX_CONTENT_BYTES", "20");
            jail.set_env("FANOUT_DATABASE_URL", "postgres://x/y");
            jail.set_env("FANOUT_TEST_REQUIRE_SERVICES", "1");
            let c = Config::load(None).expect("valid");
            assert_eq!(c.listen.port(), 2);
            assert_eq!(c.limits.max_content_bytes, 20);
            assert_eq!(c.database_url(), "postgres://x/y");
            Ok(())
        });
    }

    #[test]
    fn non_config_variables_are_ignored_and_listen_set_is_known() {
        figment::Jail::expect_with(|jail| {
            for name in [
                "FANOUT_TEST_WHATEVER",
                "FANOUT_E2E_BACKEND",
                "FANOUT_BENCH_POSTGRES_URL",
                "FANOUT_RABBITMQ_QUEUE_TYPE",
                "FANOUT_REDIS_TEST_NS",
                "FANOUT_BIN",
            ] {
                assert!(is_non_config_env(name), "{name}");
                jail.set_env(name, "x");
            }
            // Spelled in two parts: tests/ops.rs scans the sources for names.
            assert!(!is_non_config_env(&format!("FANOUT_{}", "BINARY")));
            let c = Config::load(None).expect("valid");
            assert!(!c.listen_set);
            assert_eq!(c.worker_listen().port(), 3100);
            jail.set_env("FANOUT_LISTEN", "127.0.0.1:0");
            let c = Config::load(None).expect("valid");
            assert!(c.listen_set);
            assert_eq!(c.worker_listen().port(), 0);
            Ok(())
        });
    }

    #[test]
    fn short_secrets_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FANOUT_JWT_SECRET", "0123456789abcdef0123456789abcde");
            let err = Config::load(None).expect_err("31 bytes");
            assert!(err.to_string().contains("openssl rand -hex 32"), "{err}");
            jail.set_env("FANOUT_JWT_SECRET", "0123456789abcdef0123456789abcdef");
            Config::load(None).expect("32 bytes");
            Ok(())
        });
    }

    #[test]
    fn out_of_range_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FANOUT_INCOMING__PARTITIONS", "0");
            assert!(Config::load(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn per_user_limits_default_to_twice_the_connection_limits() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FANOUT_LIMITS__MESSAGES_PER_SECOND", "7");
            let c = Config::load(None).expect("valid");
            assert_eq!((c.limits.user_rate(), c.limits.user_burst()), (14, 200));
            jail.set_env("FANOUT_LIMITS__USER_MESSAGES_PER_SECOND", "3");
            jail.set_env("FANOUT_LIMITS__USER_MESSAGE_BURST", "4");
            let c = Config::load(None).expect("valid");
            assert_eq!((c.limits.user_rate(), c.limits.user_burst()), (3, 4));
            Ok(())
        });
    }

    #[test]
    fn limits_out_of_range_are_refused() {
        for (key, value) in [
            ("FANOUT_LIMITS__USER_MESSAGES_PER_SECOND", "0"),
            ("FANOUT_LIMITS__MAX_CONNECTIONS_PER_USER", "0"),
            ("FANOUT_LIMITS__SEND_BUFFER", "15"),
            ("FANOUT_LIMITS__API_BURST", "0"),
            ("FANOUT_LIMITS__HANDSHAKES_PER_SECOND", "0"),
            ("FANOUT_LIMITS__MEMBERSHIP_BURST", "1000"),
            ("FANOUT_LIMITS__MAX_CONTENT_BYTES", "1048577"),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(key, value);
                jail.set_env("FANOUT_LIMITS__MAX_PAYLOAD_BYTES", "2000000");
                let err = Config::load(None).expect_err("out of range");
                assert!(err.to_string().contains("limits."), "{key}: {err}");
                Ok(())
            });
        }
    }
}
