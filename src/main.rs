//! The `fanout` binary: parses the command line, loads the configuration
//! and hands over to `fanout::app`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fanout::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "fanout",
    version,
    about = "Socket.IO chat fan-out across gateways through a pluggable broker"
)]
struct Cli {
    /// TOML configuration file (default: ./fanout.toml if present).
    /// FANOUT_* environment variables override it.
    #[arg(long, global = true, env = "FANOUT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Gateway and worker in one process: the embedded default (memory
    /// backend, SQLite), no broker or database server needed.
    Serve,
    /// A gateway process (scale-out); needs FANOUT_JWT_SECRET.
    Gateway,
    /// A worker process (scale-out); needs FANOUT_JWT_SECRET and a broker backend.
    Worker,
    /// Prints up to LIMIT dead-lettered events of the configured broker, one
    /// JSON object a line, oldest first, without removing them.
    DeadLetters {
        /// How many to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Drives running gateways with the `personal` workload (paired users
    /// across gateways, open-loop) and prints the measurements as JSON.
    /// Tokens are signed with the configured secret.
    Load {
        /// Gateway base URLs, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:3000")]
        url: Vec<String>,
        /// Virtual users.
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Messages per second, all users together.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Seconds of sending, warm-up included.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Leading seconds not measured.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Message size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Deletes everything the configured backend keeps under FANOUT_NAMESPACE
    /// (queues, exchanges, keys, streams, pending events). Stop the
    /// namespace's gateways and workers first.
    PurgeNamespace {
        /// Confirms the deletion.
        #[arg(long)]
        yes: bool,
    },
    /// Prints a client token for a user, signed with the configured secret
    /// (or the embedded default's secret in the data directory).
    Token {
        /// The user id (1 to 64 characters of [A-Za-z0-9_-]).
        user_id: String,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .with_context(|| format!("invalid log filter {:?}", config.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run(cli.command, config))
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    use fanout::app;
    match command {
        Command::Token { user_id, ttl } => {
            anyhow::ensure!(
                fanout_backend::is_valid_id(&user_id),
                "user id must be 1 to 64 characters of [A-Za-z0-9_-]"
            );
            let tokens = app::tokens(&config, true)?;
            println!("{}", tokens.mint(&user_id, ttl)?);
        }
        Command::Serve => {
            let listener = bind(&config).await?;
            app::serve(config, listener, app::shutdown_signal()).await?;
        }
        Command::Gateway => {
            let listener = bind(&config).await?;
            app::gateway(config, listener, app::shutdown_signal()).await?;
        }
        Command::Worker => app::worker(config, app::shutdown_signal()).await?,
        Command::Load {
            url,
            users,
            rate,
            duration,
            warmup,
            size,
        } => {
            let tokens = app::tokens(&config, true)?;
            let spec = fanout::load::LoadSpec {
                urls: url,
                users,
                rate,
                duration: std::time::Duration::from_secs_f64(duration),
                warmup: std::time::Duration::from_secs_f64(warmup),
                size,
                drain: std::time::Duration::from_secs(10),
                user_prefix: format!("load{}-", std::process::id()),
            };
            let report = fanout::load::run_personal(&spec, &tokens).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::PurgeNamespace { yes } => {
            anyhow::ensure!(
                yes,
                "this deletes every queue, key and pending event of namespace {:?} on the {:?} backend; \
                 pass --yes to do it",
                config.namespace,
                config.backend
            );
            app::purge_namespace(&config).await?;
            eprintln!("namespace {:?} purged", config.namespace);
        }
        Command::DeadLetters { limit } => {
            for d in app::dead_letters(&config, limit).await? {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": d.event.id,
                        "orderingKey": d.event.ordering_key.as_str(),
                        "reason": d.reason,
                        "attempts": d.attempts,
                        "payload": String::from_utf8_lossy(&d.event.payload),
                    })
                );
            }
        }
    }
    Ok(())
}

async fn bind(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (set FANOUT_LISTEN to another address)",
                config.listen
            )
        })
}
