//! The `fanout` binary: parses the command line, loads the configuration
//! and hands over to `fanout::app`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fanout::config::{BackendKind, Config};

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
enum DeadLetterCommand {
    /// Publishes the selected dead letters to the incoming side again (same
    /// id: a message stored before is stored once), oldest first, and
    /// removes them from the dead letters. Fix the cause first.
    Replay {
        #[command(flatten)]
        select: DeadLetterSelect,
    },
    /// Removes the selected dead letters for good.
    Drop {
        #[command(flatten)]
        select: DeadLetterSelect,
    },
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct DeadLetterSelect {
    /// Event ids to act on (repeat, or comma-separate).
    #[arg(long = "id", value_delimiter = ',')]
    ids: Vec<String>,
    /// Act on every dead letter (up to --limit).
    #[arg(long)]
    all: bool,
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
    /// JSON object a line, oldest first, without removing them; `replay`
    /// and `drop` act on them.
    DeadLetters {
        /// How many to print, replay or drop at the most (oldest first).
        #[arg(long, default_value_t = 100, global = true)]
        limit: usize,
        #[command(subcommand)]
        action: Option<DeadLetterCommand>,
    },
    /// Drives running gateways with one load pattern (open-loop, latency
    /// from the intended send time) and prints the measurements as JSON.
    /// Tokens are signed with the configured secret. `fanout bench` runs
    /// whole workload files against every backend instead.
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
        /// personal, group, offline or churn.
        #[arg(long, default_value = "personal")]
        pattern: String,
        /// group: members per channel.
        #[arg(long, default_value_t = 10)]
        members: usize,
        /// offline: share of recipients not connected.
        #[arg(long, default_value_t = 0.5)]
        offline_share: f64,
        /// churn: connections opened per second.
        #[arg(long, default_value_t = 20.0)]
        connects_per_sec: f64,
    },
    /// Runs the side-by-side benchmark: for each backend, real gateway and
    /// worker processes on loopback, every workload file, a raw-broker
    /// baseline; writes report.json, report.md and SVG charts. Exits
    /// non-zero if any run failed, lost, duplicated or misrouted a message.
    Bench {
        /// Workload profile: `full`, or `ci` (the same workloads, short).
        #[arg(long, default_value = "full")]
        profile: String,
        /// Backends, in run order.
        #[arg(long, value_delimiter = ',', default_value = "memory,rabbitmq,redis")]
        backends: Vec<String>,
        /// Workload names (default: every file in --workloads-dir).
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// Directory of workload TOML files.
        #[arg(long, default_value = "benches/workloads")]
        workloads_dir: PathBuf,
        /// Report directory.
        #[arg(long, default_value = "bench-report")]
        out: PathBuf,
        /// Gateway processes per broker backend.
        #[arg(long, default_value_t = 3)]
        gateways: usize,
        /// Worker processes per broker backend.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Server-level PostgreSQL URL; each backend gets a fresh database.
        #[arg(
            long,
            env = "FANOUT_BENCH_POSTGRES_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        postgres_url: String,
        /// A report.json to compare with: prints every in-run ratio that
        /// moved by more than --threshold.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Relative change that counts as moved (0.5 = 50 %).
        #[arg(long, default_value_t = 0.5)]
        threshold: f64,
        /// Skip the fault matrix (run by default in the full profile only;
        /// CI runs it as a test, tests/faults.rs).
        #[arg(long)]
        no_faults: bool,
    },
    /// Compares two benchmark reports (report.json): prints every in-run
    /// ratio that moved by more than --threshold.
    BenchCompare {
        /// The reference report.
        #[arg(long)]
        baseline: PathBuf,
        /// The new report.
        #[arg(long)]
        report: PathBuf,
        /// Relative change that counts as moved (0.5 = 50 %).
        #[arg(long, default_value_t = 0.5)]
        threshold: f64,
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
    let mut config = Config::load(cli.config.as_deref())?;
    if matches!(cli.command, Command::Bench { .. }) && std::env::var_os("FANOUT_LOG").is_none() {
        // The bench reports through its own progress lines; the raw
        // baseline stops consumers mid-stream on purpose, which backends
        // rightly log as warnings; dropping a run's database (`WITH
        // (FORCE)`) takes seconds, which sqlx reports as a slow statement.
        config.log = "warn,fanout_redis=error,fanout_rabbitmq=error,sqlx::query=error".to_owned();
    }
    let filter = log_filter(&config.log, std::env::var("RUST_LOG").ok());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .with_context(|| format!("invalid log filter {filter:?}"))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run(cli.command, config))
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
fn log_filter(configured: &str, rust_log: Option<String>) -> String {
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
            let listener = bind(config.listen).await?;
            app::serve(config, listener, app::shutdown_signal()).await?;
        }
        Command::Gateway => {
            let listener = bind(config.listen).await?;
            app::gateway(config, listener, app::shutdown_signal()).await?;
        }
        Command::Worker => {
            let listener = bind(config.worker_listen()).await?;
            app::worker(config, listener, app::shutdown_signal()).await?
        }
        Command::Load {
            url,
            users,
            rate,
            duration,
            warmup,
            size,
            pattern,
            members,
            offline_share,
            connects_per_sec,
        } => {
            use fanout::load::Pattern;
            let pattern = match pattern.as_str() {
                "personal" => Pattern::Personal,
                "group" => Pattern::Group { members },
                "offline" => Pattern::Offline { offline_share },
                "churn" => Pattern::Churn {
                    connects_per_sec,
                    hold_ms: 1000,
                },
                other => anyhow::bail!(
                    "unknown pattern {other:?}: use personal, group, offline or churn"
                ),
            };
            let tokens = app::tokens(&config, true)?;
            let spec = fanout::load::LoadSpec {
                urls: url,
                pattern,
                users,
                rate,
                duration: std::time::Duration::from_secs_f64(duration),
                warmup: std::time::Duration::from_secs_f64(warmup),
                size,
                drain: std::time::Duration::from_secs(10),
                user_prefix: format!("load{}-", std::process::id()),
                progress: Some("load".into()),
            };
            let report = fanout::load::run(&spec, &tokens).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Bench {
            profile,
            backends,
            workloads,
            workloads_dir,
            out,
            gateways,
            workers,
            postgres_url,
            baseline,
            threshold,
            no_faults,
        } => {
            let faults = profile == "full" && !no_faults;
            let backends = backends
                .iter()
                .map(|b| match b.as_str() {
                    "memory" => Ok(BackendKind::Memory),
                    "rabbitmq" => Ok(BackendKind::Rabbitmq),
                    "redis" => Ok(BackendKind::Redis),
                    other => Err(anyhow::anyhow!(
                        "unknown backend {other:?}: use memory, rabbitmq or redis"
                    )),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            anyhow::ensure!(
                (1..=16).contains(&gateways) && workers <= 16,
                "--gateways must be 1 to 16 and --workers at most 16"
            );
            let workloads =
                fanout::bench::workload::load_dir(&workloads_dir, &workloads, &profile)?;
            let opts = fanout::bench::BenchOptions {
                binary: std::env::current_exe().context("cannot find this binary's path")?,
                backends,
                workloads,
                profile,
                out: out.clone(),
                postgres_admin_url: postgres_url,
                gateways,
                workers: workers.max(1),
                base: config,
                faults,
            };
            let report = fanout::bench::run(&opts).await?;
            eprintln!(
                "[bench] report: {}, {}, {}",
                out.join("report.md").display(),
                out.join("report.json").display(),
                out.join("charts").display()
            );
            if let Some(baseline) = baseline {
                print_comparison(&read_report(&baseline)?, &report, threshold);
            }
            let problems = report.problems();
            anyhow::ensure!(
                problems.is_empty(),
                "the benchmark measured a broken system:\n  {}",
                problems.join("\n  ")
            );
        }
        Command::BenchCompare {
            baseline,
            report,
            threshold,
        } => print_comparison(&read_report(&baseline)?, &read_report(&report)?, threshold),
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
        Command::DeadLetters {
            limit,
            action: None,
        } => {
            for d in app::dead_letters(&config, limit).await? {
                print_dead_letter(&d);
            }
        }
        Command::DeadLetters {
            limit,
            action: Some(action),
        } => {
            let (select, action, verb) = match action {
                DeadLetterCommand::Replay { select } => {
                    (select, fanout_backend::DeadLetterAction::Replay, "replayed")
                }
                DeadLetterCommand::Drop { select } => {
                    (select, fanout_backend::DeadLetterAction::Drop, "dropped")
                }
            };
            let selection = fanout_backend::DeadLetterSelection {
                ids: (!select.all).then_some(select.ids.clone()),
                limit,
            };
            let done = app::resolve_dead_letters(&config, &selection, action).await?;
            for d in &done {
                print_dead_letter(d);
            }
            eprintln!("{verb} {} dead letters", done.len());
            if !select.all {
                let missing: Vec<&String> = select
                    .ids
                    .iter()
                    .filter(|id| !done.iter().any(|d| &d.event.id == *id))
                    .collect();
                anyhow::ensure!(
                    missing.is_empty(),
                    "no dead letter with id {missing:?} (list them with `fanout dead-letters`)"
                );
            }
        }
    }
    Ok(())
}

fn print_dead_letter(d: &fanout_backend::DeadLetter) {
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

fn read_report(path: &std::path::Path) -> anyhow::Result<fanout::bench::report::Report> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read benchmark report {}", path.display()))?;
    let report: fanout::bench::report::Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a fanout benchmark report", path.display()))?;
    anyhow::ensure!(
        report.schema == fanout::bench::report::SCHEMA,
        "{} has schema {:?}; this binary reads {:?}",
        path.display(),
        report.schema,
        fanout::bench::report::SCHEMA
    );
    Ok(report)
}

/// Prints the in-run ratios that moved; never fails, as a noisy machine
/// moves them without any change in the code.
fn print_comparison(
    baseline: &fanout::bench::report::Report,
    current: &fanout::bench::report::Report,
    threshold: f64,
) {
    let moved = fanout::bench::report::compare(baseline, current, threshold);
    println!(
        "Compared with the baseline of {} ({} profile): {} figure(s) moved more than {:.0} %",
        baseline.created,
        baseline.profile,
        moved.len(),
        threshold * 100.0
    );
    for m in moved {
        println!(
            "  {}: {:.3} -> {:.3} ({:+.0} %)",
            m.figure,
            m.baseline,
            m.current,
            (m.current / m.baseline - 1.0) * 100.0
        );
    }
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set FANOUT_LISTEN to another address)"))
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
