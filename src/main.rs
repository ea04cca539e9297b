//! The `fanout` binary: parses the command line, loads the configuration
//! and hands over to `fanout::app`; `load`, `bench` and `bench-compare` it
//! hands to the `fanout-bench` binary beside it (the `bench/` crate).

use std::ffi::OsString;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fanout::config::{Config, ConfigArgs};

#[derive(Debug, Parser)]
#[command(
    name = "fanout",
    version,
    about = "Socket.IO chat fan-out across gateways through a pluggable broker"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
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
    #[command(disable_help_flag = true)]
    Load {
        /// Passed to `fanout-bench load`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<OsString>,
    },
    /// Runs the side-by-side benchmark: for each backend, real gateway and
    /// worker processes on loopback, every workload file, a raw-broker
    /// baseline; writes report.json, report.md and SVG charts. Exits
    /// non-zero if any run failed, lost, duplicated or misrouted a message.
    #[command(disable_help_flag = true)]
    Bench {
        /// Passed to `fanout-bench bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<OsString>,
    },
    /// Compares two benchmark reports (report.json): prints every in-run
    /// ratio that moved by more than --threshold.
    #[command(disable_help_flag = true)]
    BenchCompare {
        /// Passed to `fanout-bench bench-compare`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<OsString>,
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

/// The subcommands `fanout-bench` runs.
const BENCH_COMMANDS: [&str; 3] = ["load", "bench", "bench-compare"];

fn main() -> anyhow::Result<()> {
    if asks_help_for_bench(std::env::args_os().skip(1)) {
        // Only fanout-bench knows these commands' options.
        return Err(exec_bench());
    }
    let cli = Cli::parse();
    if let Command::Load { .. } | Command::Bench { .. } | Command::BenchCompare { .. } = cli.command
    {
        return Err(exec_bench());
    }
    let config = cli.config.load()?;
    fanout::app::init_logging(&config.log)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run(cli.command, config))
}

/// Whether the arguments are `help load|bench|bench-compare` (after any
/// `--config`).
fn asks_help_for_bench(mut args: impl Iterator<Item = OsString>) -> bool {
    let mut words = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            args.next();
        } else if !arg.to_string_lossy().starts_with("--config=") {
            words.push(arg);
            if words.len() == 2 {
                break;
            }
        }
    }
    matches!(&words[..], [help, command]
        if help == "help" && BENCH_COMMANDS.iter().any(|c| command == c))
}

/// Runs `fanout-bench` (beside this binary) in this process's place with
/// the same arguments, telling it which `fanout` its gateways and workers
/// run. The tools live in their own binary so that the server carries none
/// of their dependencies. Returns only on failure.
fn exec_bench() -> anyhow::Error {
    let fanout = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => return anyhow::Error::new(e).context("cannot find this binary's path"),
    };
    let bench = fanout.with_file_name(format!("fanout-bench{}", std::env::consts::EXE_SUFFIX));
    if !bench.is_file() {
        return anyhow::anyhow!(
            "`fanout load`, `fanout bench` and `fanout bench-compare` run the fanout-bench binary, \
             expected beside fanout at {}; build it with `cargo build --bin fanout-bench` \
             (or `cargo build --workspace`)",
            bench.display()
        );
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "fanout".into());
    let mut cmd = std::process::Command::new(&bench);
    cmd.arg("--fanout-bin").arg(&fanout).args(args);
    let error = exec(cmd, arg0);
    anyhow::Error::new(error).context(format!("cannot run {}", bench.display()))
}

#[cfg(unix)]
fn exec(mut cmd: std::process::Command, arg0: OsString) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    // argv[0] stays `fanout`, so clap's usage lines read as before.
    cmd.arg0(arg0).exec()
}

#[cfg(not(unix))]
fn exec(mut cmd: std::process::Command, _arg0: OsString) -> std::io::Error {
    match cmd.status() {
        Ok(status) => std::process::exit(status.code().unwrap_or(1)),
        Err(e) => e,
    }
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
        Command::Load { .. } | Command::Bench { .. } | Command::BenchCompare { .. } => {
            unreachable!("main execs fanout-bench for these")
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

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set FANOUT_LISTEN to another address)"))
}

#[cfg(test)]
mod tests {
    use super::asks_help_for_bench;

    fn asks(line: &str) -> bool {
        asks_help_for_bench(line.split_whitespace().map(Into::into))
    }

    #[test]
    fn help_for_a_bench_command_goes_to_fanout_bench() {
        assert!(asks("help bench"));
        assert!(asks("--config f.toml help load"));
        assert!(asks("--config=f.toml help bench-compare"));
        assert!(!asks("help serve"));
        assert!(!asks("help"));
        assert!(!asks("bench help"));
        assert!(!asks("token help"));
    }
}
