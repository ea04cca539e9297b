//! Composition: builds the backend, the store and the processes from a
//! [`Config`]. This is the one place that names concrete backends.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fanout_backend::{BackendError, DynBackend, ServerId};
use socketioxide::{ParserConfig, SocketIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{load_or_create_secret, AuthError, Tokens};
use crate::config::{BackendKind, Config, QueueKind};
use crate::gateway::{delivery, http, socket, Gateway};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Why a process could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The broker.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The token secret.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Sockets.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// A setting that this command cannot work with.
    #[error("{0}")]
    Config(String),
}

/// The backend the configuration names.
pub async fn connect_backend(config: &Config) -> Result<DynBackend, RunError> {
    match config.backend {
        BackendKind::Memory => Ok(Arc::new(fanout_memory::MemoryBackend::new(
            fanout_memory::MemoryConfig {
                partitions: config.incoming.partitions,
                ..fanout_memory::MemoryConfig::default()
            },
        ))),
        BackendKind::Rabbitmq => Ok(Arc::new(
            fanout_rabbitmq::RabbitMqBackend::connect(rabbitmq_config(config)).await?,
        )),
        BackendKind::Redis => Ok(Arc::new(
            fanout_redis::RedisBackend::connect(fanout_redis::RedisConfig {
                url: config.redis_url.clone(),
                cluster: config.redis.cluster,
                wait_replicas: config
                    .redis
                    .wait_replicas
                    .unwrap_or(u32::from(config.redis.cluster)),
                namespace: config.namespace.clone(),
                partitions: config.incoming.partitions,
                operation_timeout: Duration::from_millis(config.broker_timeout_ms),
                liveness_ttl: Duration::from_millis(config.redis.liveness_ttl_ms),
                lease_ttl: Duration::from_millis(config.redis.lease_ttl_ms),
                claim_idle: Duration::from_millis(config.redis.claim_idle_ms),
                max_stream_len: config.redis.max_stream_len,
            })
            .await?,
        )),
    }
}

fn rabbitmq_config(config: &Config) -> fanout_rabbitmq::RabbitMqConfig {
    fanout_rabbitmq::RabbitMqConfig {
        url: config.rabbitmq_url.clone(),
        namespace: config.namespace.clone(),
        partitions: config.incoming.partitions,
        queue_type: match config.rabbitmq.queue_type {
            QueueKind::Quorum => fanout_rabbitmq::QueueType::Quorum,
            QueueKind::Classic => fanout_rabbitmq::QueueType::Classic,
        },
        server_prefetch: config.rabbitmq.server_prefetch,
        operation_timeout: Duration::from_millis(config.broker_timeout_ms),
        queue_expiry: None,
    }
}

/// The database the configuration names, migrated.
pub async fn connect_store(config: &Config) -> Result<Store, RunError> {
    Ok(Store::connect(
        &config.database_url(),
        config.database.max_connections,
        Duration::from_secs(config.database.acquire_timeout_secs),
    )
    .await?)
}

/// The token secret: configured, or (for the embedded default only) the
/// one in the data directory.
pub fn tokens(config: &Config, allow_generated: bool) -> Result<Tokens, RunError> {
    match &config.jwt_secret {
        Some(s) => {
            crate::auth::check_secret(s, "jwt_secret (FANOUT_JWT_SECRET or the configuration file)")?;
            Ok(Tokens::new(s.as_bytes()))
        }
        None if allow_generated => Ok(Tokens::new(load_or_create_secret(&config.data_dir)?.as_bytes())),
        None => Err(RunError::Config(
            "no jwt_secret configured: set FANOUT_JWT_SECRET (at least 32 bytes, the same on every gateway; make one with `openssl rand -hex 32`)".into(),
        )),
    }
}

/// `fanout serve`: gateway and worker in one process on the configured
/// backend (the embedded default: memory and SQLite).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let backend = connect_backend(&config).await?;
    let store = connect_store(&config).await?;
    let tokens = tokens(&config, true)?;
    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();
    let worker = tokio::spawn(crate::worker::run(
        backend.clone(),
        store.clone(),
        metrics.clone(),
        config.worker.clone(),
        config.incoming.max_attempts,
        stop.clone(),
    ));
    let result = run_gateway(
        config,
        listener,
        backend.clone(),
        store.clone(),
        tokens,
        metrics,
        shutdown,
    )
    .await;
    wind_down(&stop, worker, &WORKER_LOG, &backend, &store).await;
    result
}

/// Separate gateway and worker processes must share a broker; the memory
/// backend lives inside one process, so either alone would accept messages
/// that nothing ever delivers.
fn require_shared_broker(config: &Config, command: &str) -> Result<(), RunError> {
    if config.backend == BackendKind::Memory {
        return Err(RunError::Config(format!(
            "`fanout {command}` needs a broker shared by processes, but backend is \"memory\" \
             (in-process only): run `fanout serve` for a single node, or set FANOUT_BACKEND"
        )));
    }
    Ok(())
}

/// `fanout gateway`: a gateway process; needs a configured secret.
pub async fn gateway(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let tokens = tokens(&config, false)?;
    require_shared_broker(&config, "gateway")?;
    let backend = connect_backend(&config).await?;
    let store = connect_store(&config).await?;
    let result = run_gateway(
        config,
        listener,
        backend.clone(),
        store.clone(),
        tokens,
        Arc::new(Metrics::new()),
        shutdown,
    )
    .await;
    close(&backend, &store).await;
    result
}

/// How the failure of a task a process runs beside its main part is
/// logged: at `level`, as `failed` for the task's own error and as
/// `task_failed` for a panic or abort.
struct SideTaskLog {
    level: tracing::Level,
    failed: &'static str,
    task_failed: &'static str,
}

/// The worker `serve` runs beside its gateway: without it nothing is
/// stored, hence an error.
const WORKER_LOG: SideTaskLog = SideTaskLog {
    level: tracing::Level::ERROR,
    failed: "worker failed",
    task_failed: "worker task failed",
};

/// The probe and metrics endpoint of a worker process.
const WORKER_HTTP_LOG: SideTaskLog = SideTaskLog {
    level: tracing::Level::WARN,
    failed: "worker HTTP endpoint failed",
    task_failed: "worker HTTP task failed",
};

/// The end of a process with a side task: stops and awaits the task, logs
/// how it failed (not returned: the result of the main part is the one to
/// report), and closes the broker and database connections.
async fn wind_down<E: std::fmt::Display>(
    stop: &CancellationToken,
    task: tokio::task::JoinHandle<Result<(), E>>,
    log: &SideTaskLog,
    backend: &DynBackend,
    store: &Store,
) {
    stop.cancel();
    let failure = match task.await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some((log.failed, e.to_string())),
        Err(e) => Some((log.task_failed, e.to_string())),
    };
    if let Some((what, error)) = failure {
        if log.level == tracing::Level::ERROR {
            tracing::error!(error = %error, "{what}");
        } else {
            tracing::warn!(error = %error, "{what}");
        }
    }
    close(backend, store).await;
}

/// Closes the broker and database connections of a process that is done.
async fn close(backend: &DynBackend, store: &Store) {
    let _ = backend.shutdown().await;
    store.close().await;
}

/// `fanout worker`: a worker process until `shutdown` resolves, serving
/// `/healthz`, `/readyz` and `/metrics` on `listener`.
pub async fn worker(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // Deployed beside gateways, which need the secret: a deployment
    // without one is a mistake best caught on the first process started.
    tokens(&config, false)?;
    require_shared_broker(&config, "worker")?;
    let backend = connect_backend(&config).await?;
    let store = connect_store(&config).await?;
    let metrics = Arc::new(Metrics::new());
    metrics.attach_backend(backend.clone());
    let stop = CancellationToken::new();
    let addr = listener.local_addr()?;
    let http = crate::worker_http::router(crate::worker_http::WorkerHttp::new(
        backend.clone(),
        store.clone(),
        metrics.clone(),
    ));
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, http)
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
    });
    // Scripts and tests read this line to learn the port when 0 was asked
    // (unlike a gateway's, it names no server id: workers have none).
    println!("fanout: worker listening on http://{addr}");
    tracing::info!(%addr, backend = %backend.capabilities(), "worker started");
    let run = crate::worker::run(
        backend.clone(),
        store.clone(),
        metrics,
        config.worker.clone(),
        config.incoming.max_attempts,
        stop.clone(),
    );
    tokio::pin!(run);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut run => r,
        () = &mut shutdown => {
            stop.cancel();
            run.await
        }
    };
    wind_down(&stop, http, &WORKER_HTTP_LOG, &backend, &store).await;
    Ok(result?)
}

/// Runs a gateway on `listener` until `shutdown` resolves, then closes its
/// sessions and removes its routes.
pub async fn run_gateway(
    config: Config,
    listener: TcpListener,
    backend: DynBackend,
    store: Store,
    tokens: Tokens,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let server_id = match &config.server_id {
        Some(id) => ServerId::new(id.clone())?,
        None => ServerId::new(format!("gw-{}", uuid::Uuid::new_v4().simple()))?,
    };
    metrics.attach_backend(backend.clone());
    let stream = match backend.register_server(&server_id).await {
        Ok(s) => s,
        Err(BackendError::Conflict(_)) => {
            return Err(RunError::Config(format!(
                "server id {server_id} is held by another live gateway on this broker and \
                 namespace: give each gateway its own FANOUT_SERVER_ID (or leave it unset \
                 for a random one). If its holder died with its machine, the broker frees \
                 the id once it notices (Redis: redis.liveness_ttl_ms; RabbitMQ: the \
                 connection heartbeat)"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    // max_payload bounds polling bodies only; WebSocket messages, and the
    // binary attachments the parser buffers until their event is complete,
    // have their own limits (64 MiB, 10 MB by default), set to the same
    // bound here: the protocol carries no binary data.
    let max = usize::try_from(config.limits.max_payload_bytes).unwrap_or(usize::MAX);
    let (layer, io) = SocketIo::builder()
        .max_payload(config.limits.max_payload_bytes)
        .ws_max_message_size(max)
        .ws_max_frame_size(max)
        .with_parser(ParserConfig::common().max_incoming_binary_buf_size(max))
        .max_buffer_size(config.limits.send_buffer)
        .build_layer();
    let grace = Duration::from_secs(config.gateway.shutdown_grace_secs);
    let gw = Gateway::new(
        server_id.clone(),
        backend.clone(),
        store,
        tokens,
        config,
        metrics,
    );
    socket::attach(&io, gw.clone());
    let app = http::router(gw.clone(), layer);
    let deliveries = delivery::spawn(gw.clone(), stream);
    let sweeper = gw.spawn_sweeper();

    let addr: SocketAddr = listener.local_addr()?;
    // Scripts and tests read this line to learn the port when 0 was asked.
    println!("fanout: listening on http://{addr} as {server_id}");
    tracing::info!(%addr, server = %server_id, backend = %backend.capabilities(), "gateway ready");

    let gw_stop = gw.clone();
    // Chat frames are small and latency-bound: Nagle's algorithm plus the
    // peer's delayed ACK would hold each one back by up to 40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: closing sessions");
            gw_stop.begin_shutdown();
            if tokio::time::timeout(grace, io.close()).await.is_err() {
                tracing::warn!("sessions did not close within {grace:?}");
            }
        })
        .await;
    sweeper.abort();
    if let Err(e) = backend.deregister_server(&server_id).await {
        tracing::warn!(error = %e, "could not remove this gateway's routes; the backend's own cleanup will");
    }
    deliveries.abort();
    Ok(result?)
}

/// The configured broker's dead letters (see `FanoutBackend::dead_letters`).
pub async fn dead_letters(
    config: &Config,
    limit: usize,
) -> Result<Vec<fanout_backend::DeadLetter>, RunError> {
    let backend = dead_letter_backend(config).await?;
    let letters = backend.dead_letters(limit).await;
    let _ = backend.shutdown().await;
    Ok(letters?)
}

/// Replays or drops the configured broker's dead letters (see
/// `FanoutBackend::resolve_dead_letters`).
pub async fn resolve_dead_letters(
    config: &Config,
    selection: &fanout_backend::DeadLetterSelection,
    action: fanout_backend::DeadLetterAction,
) -> Result<Vec<fanout_backend::DeadLetter>, RunError> {
    let backend = dead_letter_backend(config).await?;
    let done = backend.resolve_dead_letters(selection, action).await;
    let _ = backend.shutdown().await;
    Ok(done?)
}

async fn dead_letter_backend(config: &Config) -> Result<DynBackend, RunError> {
    if config.backend == BackendKind::Memory {
        return Err(RunError::Config(
            "the memory backend keeps its dead letters inside the `fanout serve` process; \
             there is nothing to reach from outside it"
                .into(),
        ));
    }
    connect_backend(config).await
}

/// Deletes everything the configured backend keeps under its namespace
/// (queues, exchanges, keys, streams): for decommissioning a namespace and
/// for test runs, which must not leave state on a shared broker.
pub async fn purge_namespace(config: &Config) -> Result<(), RunError> {
    let timeout = Duration::from_millis(config.broker_timeout_ms);
    match config.backend {
        BackendKind::Memory => Ok(()),
        BackendKind::Redis => {
            fanout_redis::RedisBackend::purge(&config.redis_url, &config.namespace, timeout)
                .await?;
            Ok(())
        }
        BackendKind::Rabbitmq => {
            fanout_rabbitmq::RabbitMqBackend::purge(&rabbitmq_config(config)).await?;
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// A log filter that tracing cannot parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}")]
pub struct LogFilterError {
    filter: String,
    #[source]
    source: tracing_subscriber::filter::ParseError,
}

/// Installs the process's logger (stderr) with [`log_filter`] of the
/// configured filter and `RUST_LOG`; both binaries (`fanout`,
/// `fanout-bench`) log the same way.
pub fn init_logging(configured: &str) -> Result<(), LogFilterError> {
    let filter = log_filter(configured, std::env::var("RUST_LOG").ok());
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|source| LogFilterError { filter, source })?;
    tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// Library events that are expected in normal operation and logged once
/// per message: lapin warns for every message the broker returns as
/// unroutable, which on the outgoing side means only that the recipient is
/// offline (counted as `fanout_unroutable_total` and
/// `fanout_backend_unroutable_total`). Quieted to the given level unless the
/// filter names the crate.
const QUIET_TARGETS: [(&str, &str); 1] = [("lapin::returned_messages", "error")];

/// The log filter: `RUST_LOG` when set (taken as it is, the operator's
/// word), else the configured `log` with [`QUIET_TARGETS`] added.
pub fn log_filter(configured: &str, rust_log: Option<String>) -> String {
    if let Some(f) = rust_log.filter(|f| !f.trim().is_empty()) {
        return f;
    }
    let mut filter = configured.to_owned();
    for (target, level) in QUIET_TARGETS {
        let krate = target.split("::").next().unwrap_or(target);
        if !filter.contains(krate) {
            filter.push_str(&format!(",{target}={level}"));
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn expected_library_noise_is_quieted_unless_asked_for() {
        assert_eq!(
            log_filter("info", None),
            "info,lapin::returned_messages=error"
        );
        assert_eq!(log_filter("info,lapin=debug", None), "info,lapin=debug");
        assert_eq!(log_filter("info", Some("lapin=warn".into())), "lapin=warn");
        assert_eq!(
            log_filter("warn", Some(" ".into())),
            "warn,lapin::returned_messages=error"
        );
    }
}
