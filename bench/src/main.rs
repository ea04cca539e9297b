//! The `fanout-bench` binary: `load`, `bench` and `bench-compare`. `fanout
//! load|bench|bench-compare` execs it (found beside `fanout`), so the
//! server binary carries none of the tools' dependencies; run directly, it
//! starts the `fanout` found beside itself.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fanout::config::{Config, ConfigArgs};
use fanout_bench::report::{self, Report};

#[derive(Debug, Parser)]
#[command(
    name = "fanout-bench",
    version,
    about = "fanout's load generator and side-by-side benchmark"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// The `fanout` binary the benchmark's gateways and workers run; `fanout`
    /// passes itself (default: the `fanout` beside this binary).
    #[arg(long, hide = true)]
    fanout_bin: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// `--pattern`; its parameters are options of their own.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum PatternName {
    Personal,
    Group,
    Offline,
    Churn,
}

#[derive(Debug, Subcommand)]
enum Command {
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
        #[arg(long, value_enum, default_value = "personal")]
        pattern: PatternName,
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
        /// Backends with their topology, in run order: `memory`,
        /// `rabbitmq`, `redis` (the configured brokers), `redis-cluster` (a
        /// 6-node Redis Cluster on loopback the run starts and stops),
        /// `rabbitmq-cluster` (a 3-node RabbitMQ cluster on loopback, the
        /// same way; last, as its idle nodes would load the others' runs).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "memory,rabbitmq,redis,redis-cluster,rabbitmq-cluster"
        )]
        backends: Vec<fanout_bench::topology::Target>,
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
        /// Another `fanout` binary (an older build) to run every workload
        /// with too, interleaved with this build's runs on each backend;
        /// the report adds new ÷ old per workload. Its results are named
        /// `<backend>@old`.
        #[arg(long, value_name = "FANOUT_BINARY")]
        against: Option<PathBuf>,
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = cli.config.load()?;
    if matches!(cli.command, Command::Bench { .. }) && std::env::var_os("FANOUT_LOG").is_none() {
        // The bench reports through its own progress lines; the raw
        // baseline stops consumers mid-stream on purpose, which backends
        // rightly log as warnings; dropping a run's database (`WITH
        // (FORCE)`) takes seconds, which sqlx reports as a slow statement.
        config.log = "warn,fanout_redis=error,fanout_rabbitmq=error,sqlx::query=error".to_owned();
    }
    fanout::app::init_logging(&config.log)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run(cli.command, cli.fanout_bin, config))
}

async fn run(command: Command, fanout_bin: Option<PathBuf>, config: Config) -> anyhow::Result<()> {
    match command {
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
            use fanout_bench::load::Pattern;
            let pattern = match pattern {
                PatternName::Personal => Pattern::Personal,
                PatternName::Group => Pattern::Group { members },
                PatternName::Offline => Pattern::Offline { offline_share },
                PatternName::Churn => Pattern::Churn {
                    connects_per_sec,
                    hold_ms: 1000,
                },
            };
            let tokens = fanout::app::tokens(&config, true)?;
            let spec = fanout_bench::load::LoadSpec {
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
            let report = fanout_bench::load::run(&spec, &tokens).await?;
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
            against,
        } => {
            let faults = profile == "full" && !no_faults;
            let against = match against {
                Some(path) => Some(check_against(&path).await?),
                None => None,
            };
            anyhow::ensure!(
                (1..=16).contains(&gateways) && workers <= 16,
                "--gateways must be 1 to 16 and --workers at most 16"
            );
            let workloads = fanout_bench::workload::load_dir(&workloads_dir, &workloads, &profile)?;
            let opts = fanout_bench::BenchOptions {
                binary: fanout_binary(fanout_bin)?,
                backends,
                workloads,
                profile,
                out: out.clone(),
                postgres_admin_url: postgres_url,
                gateways,
                workers: workers.max(1),
                base: config,
                faults,
                against,
            };
            let report = fanout_bench::run(&opts).await?;
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
    }
    Ok(())
}

/// The `fanout` binary the benchmark's processes run: the one that execed
/// this binary, else the one beside it.
fn fanout_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let me = std::env::current_exe().context("cannot find this binary's path")?;
    let fanout = me.with_file_name(format!("fanout{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        fanout.is_file(),
        "the benchmark runs its gateways and workers with the fanout binary, expected at {}; \
         build it with `cargo build --bin fanout` (or `cargo build --workspace`)",
        fanout.display()
    );
    Ok(fanout)
}

/// `--against` checked before anything starts: an executable file that
/// answers `--version` as `fanout` does; returns it with that answer.
async fn check_against(path: &std::path::Path) -> anyhow::Result<(PathBuf, String)> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .with_context(|| format!("--against {shown}: cannot read that file"))?;
    anyhow::ensure!(
        meta.is_file(),
        "--against {shown}: not a file; give the path of another build's `fanout` binary"
    );
    anyhow::ensure!(
        meta.permissions().mode() & 0o111 != 0,
        "--against {shown}: not executable"
    );
    // The fleet starts it with the run's working directory; a relative path
    // would still resolve, but the report should say which file it was.
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("--against {shown}: cannot resolve the path"))?;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::process::Command::new(&path)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("--against {shown}: `--version` did not answer within 10 s"))?
    .with_context(|| format!("--against {shown}: cannot run it"))?;
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    anyhow::ensure!(
        out.status.success() && version.split_whitespace().next() == Some("fanout"),
        "--against {shown}: `--version` answered {:?} ({}), not a fanout binary's version",
        version,
        out.status
    );
    Ok((path, version))
}

fn read_report(path: &std::path::Path) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read benchmark report {}", path.display()))?;
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a fanout benchmark report", path.display()))?;
    anyhow::ensure!(
        report.schema == report::SCHEMA,
        "{} has schema {:?}; this binary reads {:?}",
        path.display(),
        report.schema,
        report::SCHEMA
    );
    Ok(report)
}

/// Prints the in-run ratios that moved; never fails, as a noisy machine
/// moves them without any change in the code.
fn print_comparison(baseline: &Report, current: &Report, threshold: f64) {
    let moved = report::compare(baseline, current, threshold);
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
