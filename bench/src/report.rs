//! The report: `report.json` (schema [`SCHEMA`]; fields are only ever
//! added), `report.md` (per workload the backends side by side, ratios
//! between them and a plain reading); plus the comparison of a report with
//! a committed baseline. The SVG charts are drawn from a report by
//! `charts.rs`, which reads this module, never the other way.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{BenchError, BenchOptions};
use crate::jitter::JitterReport;
use crate::load::{LoadReport, Pattern};
use crate::raw::RawResult;
use crate::workload::Workload;

/// The schema id; bump the number only for a change that breaks readers.
pub const SCHEMA: &str = "fanout-bench/1";

/// CPU and memory of a group of processes over one workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// CPU, percent of one core (200 = two cores busy).
    pub cpu_percent: f64,
    /// Resident memory at the end, MiB.
    pub rss_mb: f64,
    /// Processes counted.
    pub processes: usize,
    /// CPU seconds used over the window (user + system), exact where
    /// `cpu_percent` is rounded through the wall time; 0 in reports written
    /// before it was recorded (their `Resources::wall_secs` is 0 too).
    #[serde(default)]
    pub cpu_secs: f64,
}

/// Usage per group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Resources {
    /// Gateways (or the `serve` process).
    pub gateways: Option<Usage>,
    /// Workers.
    pub workers: Option<Usage>,
    /// The broker's processes.
    pub broker: Option<Usage>,
    /// PostgreSQL's processes (the whole server: other users of the
    /// machine's PostgreSQL are included).
    pub database: Option<Usage>,
    /// The benchmark process itself (virtual users, accounting).
    #[serde(default)]
    pub load_generator: Option<Usage>,
    /// Each node of a broker cluster the run started (their sum is
    /// `broker`): whether the load spreads over the nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub broker_nodes: Vec<NodeUsage>,
    /// Wall seconds the CPU was measured over: the whole fixed-rate run
    /// (connects, warm-up, sending, drain), not only its measured window.
    /// 0 in reports written before it was recorded.
    #[serde(default)]
    pub wall_secs: f64,
}

/// CPU microseconds per delivery of the fixed-rate run, per group and in
/// total: the CPU the groups used over the whole run divided by every
/// distinct delivery the run made (warm-up included, as the CPU window
/// includes it). The load generator is left out: it is the clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuPerDelivery {
    /// Deliveries divided by.
    pub deliveries: u64,
    /// Gateways (or the `serve` process).
    pub gateways: Option<f64>,
    /// Workers.
    pub workers: Option<f64>,
    /// The broker's processes.
    pub broker: Option<f64>,
    /// PostgreSQL (the whole server).
    pub database: Option<f64>,
    /// The groups above together.
    pub total: f64,
}

impl CpuPerDelivery {
    /// `None` without deliveries, or for resources measured before the
    /// CPU seconds were recorded (their CPU seconds are not known).
    pub fn of(res: &Resources, deliveries: u64) -> Option<Self> {
        if deliveries == 0 || res.wall_secs <= 0.0 {
            return None;
        }
        let per = |u: &Option<Usage>| u.as_ref().map(|u| u.cpu_secs * 1e6 / deliveries as f64);
        let (gateways, workers, broker, database) = (
            per(&res.gateways),
            per(&res.workers),
            per(&res.broker),
            per(&res.database),
        );
        let parts = [gateways, workers, broker, database];
        if parts.iter().all(Option::is_none) {
            return None;
        }
        Some(Self {
            deliveries,
            gateways,
            workers,
            broker,
            database,
            total: parts.iter().flatten().sum(),
        })
    }
}

/// Gateway memory while the fixed-rate run's sessions are connected
/// (sampled halfway through it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GatewayMemory {
    /// Live sessions, the sum of the gateways' `fanout_sessions` metric.
    pub sessions: u64,
    /// RSS of the gateway processes together, MiB.
    pub rss_mb: f64,
}

impl GatewayMemory {
    /// Gateway RSS per connected session, KiB: the whole process, its
    /// fixed cost included, so it falls as sessions grow.
    pub fn kib_per_session(&self) -> Option<f64> {
        (self.sessions > 0).then(|| self.rss_mb * 1024.0 / self.sessions as f64)
    }
}

/// One broker node's share.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeUsage {
    /// `redis:7101`.
    pub node: String,
    /// Its CPU and memory.
    pub usage: Usage,
}

/// One step of a ramp.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RampStep {
    /// Offered messages/s.
    pub rate: f64,
    /// Within the bound, nothing lost, nothing refused, rate kept.
    pub passed: bool,
    /// e2e p50, ms.
    pub p50_ms: f64,
    /// e2e p99, ms.
    pub p99_ms: f64,
    /// Acked messages/s.
    pub acked_per_sec: f64,
    /// Deliveries/s.
    pub delivered_per_sec: f64,
    /// Lost deliveries.
    pub lost: u64,
}

/// One backend on one workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackendResult {
    /// `memory`, `rabbitmq`, `redis`, `redis-cluster` or `rabbitmq-cluster`.
    pub backend: String,
    /// Why it has no (complete) result.
    pub error: Option<String>,
    /// The fixed-rate run.
    pub run: Option<LoadReport>,
    /// The ramp's steps, if the workload has one.
    pub ramp: Vec<RampStep>,
    /// Highest ramp rate that passed.
    pub sustained_rate: Option<f64>,
    /// The broker alone on this pattern.
    pub raw: Option<RawResult>,
    /// End-to-end messages/s (sustained rate, else the fixed run's acked/s)
    /// over the raw broker's.
    pub e2e_vs_raw: Option<f64>,
    /// CPU and memory.
    pub resources: Option<Resources>,
    /// What the broker reported mid-run (bindings, memory).
    pub broker: serde_json::Value,
    /// The `jitter` workload's run (instead of `run`).
    #[serde(default)]
    pub jitter: Option<JitterReport>,
    /// CPU per delivery of the fixed-rate run, from `resources`.
    #[serde(default)]
    pub cpu_us_per_delivery: Option<CpuPerDelivery>,
    /// Gateway RSS and sessions halfway through the fixed-rate run.
    #[serde(default)]
    pub gateway_memory: Option<GatewayMemory>,
}

impl BackendResult {
    pub(crate) fn new(backend: &str) -> Self {
        Self {
            backend: backend.to_owned(),
            ..Self::default()
        }
    }

    fn e2e_rate(&self) -> Option<f64> {
        self.sustained_rate
            .or_else(|| self.run.as_ref().map(|r| r.acked_per_sec))
    }

    /// The figures derived from the measured ones.
    fn derive(&mut self) {
        self.e2e_vs_raw = match (self.e2e_rate(), &self.raw) {
            (Some(e2e), Some(raw)) if raw.msgs_per_sec > 0.0 => Some(e2e / raw.msgs_per_sec),
            _ => None,
        };
        let deliveries = self
            .run
            .as_ref()
            .map(|r| r.delivered)
            .or_else(|| self.jitter.as_ref().map(|j| j.tally.delivered));
        self.cpu_us_per_delivery = match (&self.resources, deliveries) {
            (Some(res), Some(n)) => CpuPerDelivery::of(res, n),
            _ => None,
        };
    }
}

/// One workload, every backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkloadReport {
    /// The workload as run.
    pub workload: Workload,
    /// One per backend, in run order.
    pub results: Vec<BackendResult>,
    /// `--against`: the other build's results, one per backend in the same
    /// order, each backend named `<backend>@old`. Kept apart from `results`
    /// so that nothing reading those (baselines, charts) mixes the builds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub against: Vec<BackendResult>,
    /// `--against`: new ÷ old per backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ab: Vec<AbRatios>,
}

impl WorkloadReport {
    pub(crate) fn new(workload: Workload, mut results: Vec<BackendResult>) -> Self {
        for r in &mut results {
            r.derive();
        }
        Self {
            workload,
            results,
            against: Vec::new(),
            ab: Vec::new(),
        }
    }

    /// Adds the `--against` build's results (same order as `results`),
    /// with whether the new build ran first on each backend.
    pub(crate) fn with_against(
        mut self,
        mut against: Vec<BackendResult>,
        new_first: &[bool],
    ) -> Self {
        for r in &mut against {
            r.derive();
        }
        self.ab = self
            .results
            .iter()
            .zip(&against)
            .enumerate()
            .map(|(i, (new, old))| {
                AbRatios::of(new, old, new_first.get(i).copied().unwrap_or(true))
            })
            .collect();
        self.against = against;
        self
    }
}

/// The backend name an `--against` result carries.
pub fn old_name(backend: &str) -> String {
    format!("{backend}@old")
}

/// One figure the A/B comparison divides: its label in report.md and how
/// to read it off a result.
type AbFigure = (&'static str, fn(&BackendResult) -> Option<f64>);

/// The figures compared between the builds, in the A/B table's order.
const AB_FIGURES: [AbFigure; 8] = [
    ("sustained msg/s (ramp)", |r| r.sustained_rate),
    ("deliveries/s", |r| {
        r.run.as_ref().map(|x| x.delivered_per_sec)
    }),
    ("e2e p50 ms", |r| r.run.as_ref().map(|x| x.e2e_ms.p50)),
    ("e2e p99 ms", |r| r.run.as_ref().map(|x| x.e2e_ms.p99)),
    ("CPU µs per delivery, total", |r| {
        r.cpu_us_per_delivery.as_ref().map(|c| c.total)
    }),
    ("CPU µs per delivery, gateways", |r| {
        r.cpu_us_per_delivery.as_ref().and_then(|c| c.gateways)
    }),
    ("CPU µs per delivery, workers", |r| {
        r.cpu_us_per_delivery.as_ref().and_then(|c| c.workers)
    }),
    ("gateway RSS KiB per session", |r| {
        r.gateway_memory
            .as_ref()
            .and_then(GatewayMemory::kib_per_session)
    }),
];

/// New ÷ old on one backend and workload (`--against`); a figure either
/// side lacks, or whose old value is 0, is `None`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AbRatios {
    /// The backend (the new build's name).
    pub backend: String,
    /// Whether the new build ran this workload first on this backend.
    pub new_first: bool,
    /// Highest sustained ramp rate (higher is better).
    pub sustained_rate: Option<f64>,
    /// Deliveries/s of the fixed-rate run (higher is better).
    pub deliveries_per_sec: Option<f64>,
    /// e2e p50 at the fixed rate (lower is better).
    pub p50_ms: Option<f64>,
    /// e2e p99 at the fixed rate (lower is better).
    pub p99_ms: Option<f64>,
    /// CPU µs per delivery, all groups (lower is better).
    pub cpu_us_per_delivery: Option<f64>,
    /// CPU µs per delivery, gateways only (lower is better): unlike the
    /// total, no other user of the machine's broker or PostgreSQL in it.
    pub gateway_cpu_us_per_delivery: Option<f64>,
    /// CPU µs per delivery, workers only (lower is better).
    #[serde(default)]
    pub worker_cpu_us_per_delivery: Option<f64>,
    /// Gateway RSS per connected session (lower is better).
    pub rss_kib_per_session: Option<f64>,
}

fn ratio(new: Option<f64>, old: Option<f64>) -> Option<f64> {
    match (new, old) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

impl AbRatios {
    /// The ratios of `new` over `old`.
    pub fn of(new: &BackendResult, old: &BackendResult, new_first: bool) -> Self {
        // In AB_FIGURES' order; the array's length is checked here.
        let [sustained_rate, deliveries_per_sec, p50_ms, p99_ms, cpu_us_per_delivery, gateway_cpu_us_per_delivery, worker_cpu_us_per_delivery, rss_kib_per_session] =
            AB_FIGURES.map(|(_, get)| ratio(get(new), get(old)));
        Self {
            backend: new.backend.clone(),
            new_first,
            sustained_rate,
            deliveries_per_sec,
            p50_ms,
            p99_ms,
            cpu_us_per_delivery,
            gateway_cpu_us_per_delivery,
            worker_cpu_us_per_delivery,
            rss_kib_per_session,
        }
    }
}

/// The `--against` run: which other build the `@old` results are from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Against {
    /// Its path, as given.
    pub binary: String,
    /// What it printed for `--version`.
    pub version: String,
}

/// The machine and set-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Setup {
    /// CPUs the OS reports.
    pub cpus: usize,
    /// `uname -r`-like kernel release, when readable.
    pub kernel: Option<String>,
    /// This binary's version.
    pub fanout_version: String,
    /// Gateways per broker backend.
    pub gateways: usize,
    /// Workers per broker backend.
    pub workers: usize,
    /// Where messages are stored.
    pub database: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: String,
    /// RFC 3339 time the run started.
    pub created: String,
    /// The profile (`full`, `ci`).
    pub profile: String,
    /// The machine and set-up.
    pub setup: Setup,
    /// Backends in run order.
    pub backends: Vec<String>,
    /// One entry per workload.
    pub workloads: Vec<WorkloadReport>,
    /// The fault matrix (`faults` workload): one object per backend and
    /// fault, as `bench::faults::FaultResult` serializes, or with an
    /// `error`. Empty when it was not run.
    #[serde(default)]
    pub faults: Vec<serde_json::Value>,
    /// `--against`: the other build; its results are each workload's
    /// `against`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub against: Option<Against>,
}

impl Report {
    pub(crate) fn new(opts: &BenchOptions) -> Self {
        Self {
            schema: SCHEMA.to_owned(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            profile: opts.profile.clone(),
            setup: Setup {
                cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .ok()
                    .map(|s| s.trim().to_owned()),
                fanout_version: env!("CARGO_PKG_VERSION").to_owned(),
                gateways: opts.gateways,
                workers: opts.workers,
                database: "postgresql".to_owned(),
            },
            backends: opts.backends.iter().map(|b| b.name().to_owned()).collect(),
            workloads: Vec::new(),
            faults: Vec::new(),
            against: None,
        }
    }

    /// Correctness problems: any error, loss, duplicate or misrouting. A
    /// benchmark with any of these measured a broken system.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in &self.workloads {
            for r in w.results.iter().chain(&w.against) {
                let at = format!("{} / {}", r.backend, w.workload.name);
                if let Some(e) = &r.error {
                    out.push(format!("{at}: {e}"));
                }
                if let Some(j) = &r.jitter {
                    out.extend(j.problems().into_iter().map(|p| format!("{at}: {p}")));
                }
                if let Some(run) = &r.run {
                    for (what, n) in [
                        ("lost", run.lost),
                        ("duplicated", run.duplicated),
                        ("misrouted", run.misrouted),
                    ] {
                        if n > 0 {
                            out.push(format!("{at}: {n} deliveries {what}"));
                        }
                    }
                }
            }
        }
        for f in &self.faults {
            let at = format!(
                "faults / {} / {}",
                f["backend"].as_str().unwrap_or("?"),
                f["fault"].as_str().unwrap_or("?")
            );
            if let Some(e) = f["error"].as_str() {
                out.push(format!("{at}: {e}"));
            }
            for key in ["acked_not_stored", "duplicates", "unknown_deliveries"] {
                if f[key].as_u64().is_some_and(|n| n > 0) {
                    out.push(format!("{at}: {key} = {}", f[key]));
                }
            }
        }
        out
    }
}

/// Writes `report.json` and `report.md` into `dir` (the run draws the
/// charts after).
pub fn write(report: &Report, dir: &Path) -> Result<(), BenchError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BenchError::Write { path, source }
    };
    let json_path = dir.join("report.json");
    let json = serde_json::to_string_pretty(report).map_err(|e| BenchError::Write {
        path: json_path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&json_path, json).map_err(io(&json_path))?;
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, markdown(report)).map_err(io(&md_path))?;
    Ok(())
}

fn f(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// How a row's figures print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A measurement; backends' ratios are shown.
    Figure,
    /// A whole count; no ratio.
    Count,
    /// A fraction shown as a percentage; no ratio.
    Share,
}

/// The backend others are divided by: RabbitMQ if present (the seed's
/// design), else the first.
fn reference(w: &WorkloadReport) -> usize {
    w.results
        .iter()
        .position(|r| r.backend == "rabbitmq")
        .unwrap_or(0)
}

/// Renders the Markdown report.
pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let s = &report.setup;
    let _ = writeln!(md, "# fanout benchmark ({} profile)\n", report.profile);
    let _ = writeln!(
        md,
        "{} · fanout {} · {} CPUs · kernel {} · {} gateways + {} workers per broker backend (memory: one `serve` process) · {} · broker and database on the same machine. \
         Every backend ran in this one run, one after the other, on the same workloads; compare the ratios, not absolute figures from other runs.\n",
        report.created,
        s.fanout_version,
        s.cpus,
        s.kernel.as_deref().unwrap_or("?"),
        s.gateways,
        s.workers,
        s.database
    );
    if let Some(a) = &report.against {
        let _ = writeln!(
            md,
            "**A/B run** (`--against`): on each backend every workload also ran with the old build `{}` ({}), its own processes, database and namespace, right before or after this build's run (the order alternates); its results are named `<backend>@old` and each workload has an \"A/B: new ÷ old\" table.\n",
            a.binary,
            a.version
        );
    }
    let problems = report.problems();
    if problems.is_empty() {
        let _ = writeln!(
            md,
            "**Correctness:** no errors, no lost, duplicated or misrouted deliveries in any run.\n"
        );
    } else {
        let _ = writeln!(md, "**Correctness problems:**\n");
        for p in &problems {
            let _ = writeln!(md, "- {p}");
        }
        md.push('\n');
    }
    for w in &report.workloads {
        if matches!(w.workload.pattern, Pattern::Jitter { .. }) {
            jitter_section(&mut md, w);
        } else {
            workload_section(&mut md, w);
        }
    }
    if !report.faults.is_empty() {
        faults_section(&mut md, &report.faults);
    }
    md
}

/// The fault matrix as a table (`docs/reliability.md` explains each column).
fn faults_section(md: &mut String, rows: &[serde_json::Value]) {
    const COLUMNS: [(&str, &str); 11] = [
        ("sent", "sent"),
        ("acked", "acked"),
        ("acked_not_stored", "acked, not stored"),
        ("stored_not_acked", "stored, not acked"),
        ("duplicates", "duplicates"),
        ("delivered", "delivered"),
        ("delivered_late", "late (> 1 s)"),
        ("not_delivered_online", "not delivered, online"),
        ("not_delivered_offline", "not delivered, offline"),
        ("fault_ms", "fault ms"),
        ("recovery_ms", "recovery ms"),
    ];
    let _ = writeln!(
        md,
        "## faults\n\nSteady 1:1 and group traffic with client message ids on 3 gateways and 2 workers; the fault is injected mid-stream, unacked sends are retried with the same id, then every message is accounted for (see docs/reliability.md).\n"
    );
    let _ = write!(md, "| backend | fault |");
    for (_, title) in COLUMNS {
        let _ = write!(md, " {title} |");
    }
    md.push_str("\n|---|---|");
    for _ in COLUMNS {
        md.push_str("---:|");
    }
    md.push('\n');
    for r in rows {
        let text = |k: &str| r[k].as_str().unwrap_or("?").to_owned();
        let _ = write!(md, "| {} | {} |", text("backend"), text("fault"));
        if let Some(e) = r["error"].as_str() {
            let _ = writeln!(md, " could not run: {e} |");
            continue;
        }
        for (key, _) in COLUMNS {
            let cell = r[key]
                .as_u64()
                .map_or_else(|| "–".to_owned(), |v| v.to_string());
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md.push('\n');
}

/// The jitter workload: one row per backend (docs/benchmarks.md explains
/// each column).
fn jitter_section(md: &mut String, w: &WorkloadReport) {
    let wl = &w.workload;
    let _ = writeln!(md, "## {}\n\n{}.\n", wl.name, wl.description);
    if let Pattern::Jitter {
        members,
        close_after_ms,
        offline_ms,
    } = &wl.pattern
    {
        let _ = writeln!(
            md,
            "{} users, half in 1:1 pairs, half in channels of {members}; {} sends/s offered for {} s, {} B content. \
             Every connection is reset (TCP RST) after {}–{} s, stays offline {}–{} s and resumes on a random gateway from its positions; \
             then no more resets, and a drain before counting. Delivered, lost and duplicates are per (client, message id), the sender included.\n",
            wl.users,
            f(wl.rate),
            wl.duration_secs,
            wl.size,
            close_after_ms[0] as f64 / 1000.0,
            close_after_ms[1] as f64 / 1000.0,
            offline_ms[0] as f64 / 1000.0,
            offline_ms[1] as f64 / 1000.0,
        );
    }
    let _ = writeln!(
        md,
        "| backend | acked / sent | resets | reconnects (failed) | delivered % | lost | duplicates | position violations | unpositioned | incomplete jumps | RESUMED complete:false | RESUMED missing | replay p50 ms | replay p99 ms | replay max ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in w.results.iter().chain(&w.against) {
        let Some(j) = &r.jitter else {
            let _ = writeln!(
                md,
                "| {} | {} |",
                r.backend,
                r.error.as_deref().unwrap_or("no result")
            );
            continue;
        };
        let t = &j.tally;
        // No replay was timed: a dash, not 0 ms.
        let ms = |v: f64| {
            if t.replay_ms.count == 0 {
                "–".to_owned()
            } else {
                f(v)
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} / {} | {} | {} ({}) | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.backend,
            j.acked,
            j.sent,
            j.resets,
            j.reconnects,
            j.reconnect_errors,
            t.delivered_pct,
            t.lost,
            t.duplicates,
            t.position_violations,
            t.unpositioned,
            t.incomplete_jumps,
            t.resumed_incomplete,
            t.resumed_missing,
            ms(t.replay_ms.p50),
            ms(t.replay_ms.p99),
            ms(t.replay_ms.max)
        );
    }
    md.push('\n');
    for r in w.results.iter().chain(&w.against) {
        if let Some(e) = r
            .jitter
            .as_ref()
            .and_then(|j| j.first_reconnect_error.as_ref())
        {
            let _ = writeln!(md, "- {}: first failed reconnect: {e}", r.backend);
        }
    }
    md.push('\n');
}

fn workload_section(md: &mut String, w: &WorkloadReport) {
    let wl = &w.workload;
    let _ = writeln!(md, "## {}\n\n{}.\n", wl.name, wl.description);
    let _ = writeln!(
        md,
        "Offered {} msg/s from {} users, {} B content, {} s ({} s warm-up not measured).\n",
        f(wl.rate),
        wl.users,
        wl.size,
        wl.duration_secs,
        wl.warmup_secs
    );
    let refi = reference(w);
    let ref_name = w.results.get(refi).map_or("", |r| r.backend.as_str());
    let others: Vec<usize> = (0..w.results.len()).filter(|i| *i != refi).collect();
    let _ = write!(md, "| |");
    for r in &w.results {
        let _ = write!(md, " {} |", r.backend);
    }
    for i in &others {
        let _ = write!(md, " {} ÷ {ref_name} |", w.results[*i].backend);
    }
    md.push_str("\n|---|");
    for _ in 0..w.results.len() + others.len() {
        md.push_str("---:|");
    }
    md.push('\n');

    let rows: Vec<(&str, Get, Kind)> = vec![
        ("acked msg/s", Get::Run(|x| x.acked_per_sec), Kind::Figure),
        (
            "deliveries/s",
            Get::Run(|x| x.delivered_per_sec),
            Kind::Figure,
        ),
        (
            "CPU µs per delivery, total",
            Get::Other(|r| r.cpu_us_per_delivery.as_ref().map(|c| c.total)),
            Kind::Figure,
        ),
        (
            "CPU µs per delivery, gateways",
            Get::Other(|r| r.cpu_us_per_delivery.as_ref().and_then(|c| c.gateways)),
            Kind::Figure,
        ),
        (
            "CPU µs per delivery, workers",
            Get::Other(|r| r.cpu_us_per_delivery.as_ref().and_then(|c| c.workers)),
            Kind::Figure,
        ),
        (
            "CPU µs per delivery, broker",
            Get::Other(|r| r.cpu_us_per_delivery.as_ref().and_then(|c| c.broker)),
            Kind::Figure,
        ),
        (
            "CPU µs per delivery, PostgreSQL",
            Get::Other(|r| r.cpu_us_per_delivery.as_ref().and_then(|c| c.database)),
            Kind::Figure,
        ),
        ("e2e p50 ms", Get::Run(|x| x.e2e_ms.p50), Kind::Figure),
        ("e2e p90 ms", Get::Run(|x| x.e2e_ms.p90), Kind::Figure),
        ("e2e p99 ms", Get::Run(|x| x.e2e_ms.p99), Kind::Figure),
        ("e2e p99.9 ms", Get::Run(|x| x.e2e_ms.p999), Kind::Figure),
        ("e2e max ms", Get::Run(|x| x.e2e_ms.max), Kind::Figure),
        ("ack p50 ms", Get::Run(|x| x.ack_ms.p50), Kind::Figure),
        ("ack p99 ms", Get::Run(|x| x.ack_ms.p99), Kind::Figure),
        ("lost", Get::Run(|x| x.lost as f64), Kind::Count),
        ("duplicated", Get::Run(|x| x.duplicated as f64), Kind::Count),
        ("reordered", Get::Run(|x| x.reordered as f64), Kind::Count),
        (
            "send errors",
            Get::Run(|x| x.send_errors as f64),
            Kind::Count,
        ),
        (
            "set-up connects/s",
            Get::Run(|x| x.connects_per_sec),
            Kind::Figure,
        ),
        (
            "sustained msg/s (ramp)",
            Get::Other(|r| r.sustained_rate),
            Kind::Figure,
        ),
        (
            "raw broker msg/s",
            Get::Other(|r| r.raw.as_ref().map(|x| x.msgs_per_sec)),
            Kind::Figure,
        ),
        (
            "end-to-end ÷ raw broker",
            Get::Other(|r| r.e2e_vs_raw),
            Kind::Share,
        ),
        (
            "CPU % gateways",
            Get::Usage(|x| x.gateways.as_ref(), |u| u.cpu_percent),
            Kind::Figure,
        ),
        (
            "CPU % workers",
            Get::Usage(|x| x.workers.as_ref(), |u| u.cpu_percent),
            Kind::Figure,
        ),
        (
            "CPU % broker",
            Get::Usage(|x| x.broker.as_ref(), |u| u.cpu_percent),
            Kind::Figure,
        ),
        (
            "CPU % PostgreSQL",
            Get::Usage(|x| x.database.as_ref(), |u| u.cpu_percent),
            Kind::Figure,
        ),
        (
            "CPU % load generator",
            Get::Usage(|x| x.load_generator.as_ref(), |u| u.cpu_percent),
            Kind::Figure,
        ),
        (
            "RSS MiB gateways",
            Get::Usage(|x| x.gateways.as_ref(), |u| u.rss_mb),
            Kind::Figure,
        ),
        (
            "RSS MiB workers",
            Get::Usage(|x| x.workers.as_ref(), |u| u.rss_mb),
            Kind::Figure,
        ),
        (
            "RSS MiB broker",
            Get::Usage(|x| x.broker.as_ref(), |u| u.rss_mb),
            Kind::Figure,
        ),
        (
            "gateway RSS KiB per session",
            Get::Other(|r| {
                r.gateway_memory
                    .as_ref()
                    .and_then(GatewayMemory::kib_per_session)
            }),
            Kind::Figure,
        ),
    ];
    let churn = matches!(wl.pattern, Pattern::Churn { .. });
    let mut rows = rows;
    if churn {
        rows.push((
            "churn connects done",
            Get::Run(|x| x.churned as f64),
            Kind::Count,
        ));
        rows.push((
            "churn connect p50 ms",
            Get::Run(|x| x.connect_ms.p50),
            Kind::Figure,
        ));
        rows.push((
            "churn connect p99 ms",
            Get::Run(|x| x.connect_ms.p99),
            Kind::Figure,
        ));
        rows.push((
            "churn connect errors",
            Get::Run(|x| x.connect_errors as f64),
            Kind::Count,
        ));
    }
    for (label, get, kind) in rows {
        if w.results.iter().all(|r| get.of(r).is_none()) {
            continue;
        }
        let _ = write!(md, "| {label} |");
        for r in &w.results {
            let cell = match (kind, get.of(r)) {
                (_, None) => "–".to_owned(),
                (Kind::Count, Some(v)) => format!("{v:.0}"),
                (Kind::Share, Some(v)) => format!("{:.1} %", v * 100.0),
                (Kind::Figure, Some(v)) => f(v),
            };
            let _ = write!(md, " {cell} |");
        }
        for i in &others {
            let cell = match (
                get.of(&w.results[*i]),
                w.results.get(refi).and_then(|r| get.of(r)),
            ) {
                (Some(a), Some(b)) if kind == Kind::Figure && b > 0.0 => format!("{:.2}×", a / b),
                _ => String::new(),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    for r in &w.results {
        if !r.broker.is_null() {
            let _ = writeln!(md, "\nBroker facts mid-run, {}: `{}`", r.backend, r.broker);
        }
    }
    for r in &w.results {
        let Some(res) = r
            .resources
            .as_ref()
            .filter(|res| !res.broker_nodes.is_empty())
        else {
            continue;
        };
        let nodes: Vec<String> = res
            .broker_nodes
            .iter()
            .map(|n| format!("{} {:.0} %", n.node, n.usage.cpu_percent))
            .collect();
        let _ = writeln!(
            md,
            "\nBroker CPU per node, {}: {}",
            r.backend,
            nodes.join(", ")
        );
    }
    for line in growth(w) {
        let _ = writeln!(md, "\n{line}");
    }
    if w.results.iter().any(|r| !r.ramp.is_empty()) {
        if let Some(ramp) = &wl.ramp {
            let _ = writeln!(
                md,
                "\nRamp (each step {} s; passes at p99 ≤ {} ms with nothing lost or refused):\n",
                ramp.step_secs, ramp.p99_bound_ms
            );
            let _ = writeln!(md, "| backend | rate | p50 ms | p99 ms | acked/s | result |\n|---|---:|---:|---:|---:|---|");
            for r in &w.results {
                for s in &r.ramp {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} |",
                        r.backend,
                        f(s.rate),
                        f(s.p50_ms),
                        f(s.p99_ms),
                        f(s.acked_per_sec),
                        if s.passed {
                            "sustained"
                        } else {
                            "not sustained"
                        }
                    );
                }
            }
        }
    }
    ab_section(md, w);
    let _ = writeln!(md, "\n**Reading.** {}\n", reading(w));
    for r in w.results.iter().chain(&w.against) {
        if let Some(e) = &r.error {
            let _ = writeln!(md, "- {} failed: {e}", r.backend);
        }
    }
    let n = &wl.name;
    let _ = writeln!(
        md,
        "![latency CDF](charts/{n}-latency-cdf.svg)\n![deliveries per second](charts/{n}-throughput.svg)\n![p99 per second](charts/{n}-p99.svg)\n"
    );
}

/// `--against`: one line per workload and backend with every new ÷ old
/// ratio measured, for the progress output.
pub fn ab_lines(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for w in &report.workloads {
        for ((ab, new), old) in w.ab.iter().zip(&w.results).zip(&w.against) {
            let figures: Vec<String> = AB_FIGURES
                .iter()
                .filter_map(|(label, get)| {
                    Some(format!("{label} {:.2}×", ratio(get(new), get(old))?))
                })
                .collect();
            out.push(format!(
                "A/B {} / {} ({} first), new ÷ old: {}",
                ab.backend,
                w.workload.name,
                if ab.new_first { "new" } else { "old" },
                if figures.is_empty() {
                    "nothing measured on both sides".to_owned()
                } else {
                    figures.join(", ")
                }
            ));
        }
    }
    out
}

/// `--against`: per backend the new build's figure, the old one's and new
/// ÷ old, for the figures of [`AB_FIGURES`].
fn ab_section(md: &mut String, w: &WorkloadReport) {
    if w.ab.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\nA/B: new ÷ old (this build against `--against`, measured side by side in this run; below 1 is better for latency, CPU and memory, above 1 for rates):\n"
    );
    let _ = write!(md, "| |");
    for ab in &w.ab {
        let _ = write!(md, " {b} new | {b} old | {b} new ÷ old |", b = ab.backend);
    }
    md.push_str("\n|---|");
    for _ in &w.ab {
        md.push_str("---:|---:|---:|");
    }
    md.push('\n');
    for (label, get) in AB_FIGURES {
        let pairs: Vec<(Option<f64>, Option<f64>)> = w
            .results
            .iter()
            .zip(&w.against)
            .map(|(new, old)| (get(new), get(old)))
            .collect();
        if pairs.iter().all(|(a, b)| a.is_none() && b.is_none()) {
            continue;
        }
        let _ = write!(md, "| {label} |");
        for (a, b) in pairs {
            let cell = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), f);
            let r = ratio(a, b).map_or_else(String::new, |r| format!("{r:.2}×"));
            let _ = write!(md, " {} | {} | {r} |", cell(a), cell(b));
        }
        md.push('\n');
    }
    let order: Vec<String> =
        w.ab.iter()
            .map(|ab| {
                format!(
                    "{}: {} first",
                    ab.backend,
                    if ab.new_first { "new" } else { "old" }
                )
            })
            .collect();
    let _ = writeln!(md, "\nRun order: {}.", order.join(", "));
}

/// Where a row of the comparison table takes its figure from.
#[derive(Clone, Copy)]
enum Get {
    /// A figure of the load run.
    Run(fn(&LoadReport) -> f64),
    /// One part's resource usage, and which figure of it.
    Usage(fn(&Resources) -> Option<&Usage>, fn(&Usage) -> f64),
    /// Anything else of the result.
    Other(fn(&BackendResult) -> Option<f64>),
}

impl Get {
    fn of(self, r: &BackendResult) -> Option<f64> {
        match self {
            Get::Run(figure) => r.run.as_ref().map(figure),
            Get::Usage(part, figure) => usage(r, part).map(|u| figure(&u)),
            Get::Other(figure) => figure(r),
        }
    }
}

fn usage(r: &BackendResult, pick: fn(&Resources) -> Option<&Usage>) -> Option<Usage> {
    r.resources.as_ref().and_then(pick).cloned()
}

/// A few plain sentences from the numbers.
/// For each broker run both on one node and on its cluster: whether
/// throughput grew from 1 node to 3. A ramp's highest sustained rate says
/// it; a fixed-rate run only says whether the cluster kept the offered
/// rate, at what latency and broker CPU.
fn growth(w: &WorkloadReport) -> Vec<String> {
    let mut out = Vec::new();
    for single in &w.results {
        let cluster_name = format!("{}-cluster", single.backend);
        let Some(cluster) = w.results.iter().find(|r| r.backend == cluster_name) else {
            continue;
        };
        let (Some(a), Some(b)) = (&single.run, &cluster.run) else {
            continue;
        };
        let cpu = |r: &BackendResult| {
            r.resources
                .as_ref()
                .and_then(|x| x.broker.as_ref())
                .map(|u| u.cpu_percent)
        };
        let cpu = match (cpu(single), cpu(cluster)) {
            (Some(x), Some(y)) if x > 0.0 => format!(", broker CPU {:.2}×", y / x),
            _ => String::new(),
        };
        let ramped = !single.ramp.is_empty() && !cluster.ramp.is_empty();
        let rate = |r: &BackendResult| {
            r.sustained_rate.map_or_else(
                || "none (not even the first step)".to_owned(),
                |x| format!("{} msg/s", f(x)),
            )
        };
        let line = match (single.sustained_rate, cluster.sustained_rate) {
            (x, y) if ramped && (x.is_none() || y.is_none()) => format!(
                "1 node → 3 nodes, {}: highest sustained rate {} → {}; at the fixed {} msg/s, p50 {:.2}×, p99 {:.2}×{cpu}.",
                single.backend,
                rate(single),
                rate(cluster),
                f(w.workload.rate),
                b.e2e_ms.p50 / a.e2e_ms.p50.max(1e-9),
                b.e2e_ms.p99 / a.e2e_ms.p99.max(1e-9),
            ),
            (Some(x), Some(y)) if x > 0.0 => format!(
                "1 node → 3 nodes, {}: highest sustained rate {} → {} msg/s ({:.2}×: throughput {}); p99 {:.2}×{cpu}.",
                single.backend,
                f(x),
                f(y),
                y / x,
                if y > x * 1.1 { "grew" } else if y < x * 0.9 { "fell" } else { "about the same" },
                b.e2e_ms.p99 / a.e2e_ms.p99.max(1e-9),
            ),
            _ => format!(
                "1 node → 3 nodes, {}: at a fixed {} msg/s offered, acked {} → {} msg/s, p50 {:.2}×, p99 {:.2}×{cpu} (a fixed rate does not show capacity: the ramp of the full profile does).",
                single.backend,
                f(w.workload.rate),
                f(a.acked_per_sec),
                f(b.acked_per_sec),
                b.e2e_ms.p50 / a.e2e_ms.p50.max(1e-9),
                b.e2e_ms.p99 / a.e2e_ms.p99.max(1e-9),
            ),
        };
        out.push(line);
    }
    out
}

fn reading(w: &WorkloadReport) -> String {
    let done: Vec<&BackendResult> = w.results.iter().filter(|r| r.run.is_some()).collect();
    if done.is_empty() {
        return "No backend completed this workload.".to_owned();
    }
    let mut out = Vec::new();
    let p99 = |r: &BackendResult| r.run.as_ref().map_or(f64::INFINITY, |x| x.e2e_ms.p99);
    let best = done
        .iter()
        .min_by(|a, b| p99(a).total_cmp(&p99(b)))
        .copied();
    let worst = done
        .iter()
        .max_by(|a, b| p99(a).total_cmp(&p99(b)))
        .copied();
    if let (Some(b), Some(wr)) = (best, worst) {
        if b.backend != wr.backend && p99(b) > 0.0 {
            out.push(format!(
                "At the same offered load, {} had the lowest p99 ({} ms) and {} the highest ({} ms, {:.1}× as long).",
                b.backend,
                f(p99(b)),
                wr.backend,
                f(p99(wr)),
                p99(wr) / p99(b)
            ));
        } else {
            out.push(format!("p99 was {} ms.", f(p99(b))));
        }
    }
    let kept: Vec<&str> = done
        .iter()
        .filter(|r| {
            r.run
                .as_ref()
                .is_some_and(|x| x.acked_per_sec >= 0.95 * w.workload.rate)
        })
        .map(|r| r.backend.as_str())
        .collect();
    if kept.len() == done.len() {
        out.push("Every backend kept up with the offered rate.".to_owned());
    } else {
        out.push(format!(
            "Only {} kept up with the offered rate.",
            if kept.is_empty() {
                "none".to_owned()
            } else {
                kept.join(" and ")
            }
        ));
    }
    let sustained: Vec<String> = done
        .iter()
        .filter_map(|r| Some(format!("{} {} msg/s", r.backend, f(r.sustained_rate?))))
        .collect();
    if !sustained.is_empty() {
        out.push(format!(
            "The ramp's highest sustained rates: {}.",
            sustained.join(", ")
        ));
    }
    let ceil: Vec<String> = done
        .iter()
        .filter_map(|r| Some(format!("{} {:.0} %", r.backend, r.e2e_vs_raw? * 100.0)))
        .collect();
    if !ceil.is_empty() {
        out.push(format!(
            "End to end, as a share of what the broker alone carried: {}.",
            ceil.join(", ")
        ));
    }
    if matches!(w.workload.pattern, Pattern::Offline { .. }) {
        out.push(
            "Messages to offline users cost a store and a routing attempt each, and no delivery."
                .to_owned(),
        );
    }
    out.join(" ")
}

/// A figure that moved between a baseline and a new report.
#[derive(Debug, Clone, PartialEq)]
pub struct Moved {
    /// What (`personal: redis ÷ rabbitmq e2e p99`).
    pub figure: String,
    /// In the baseline.
    pub baseline: f64,
    /// Now.
    pub current: f64,
}

/// Ratios measured inside each report (so machine speed cancels out),
/// compared between `baseline` and `current`; those that changed by more
/// than `threshold` (0.25 = 25 %) either way.
pub fn compare(baseline: &Report, current: &Report, threshold: f64) -> Vec<Moved> {
    let mut moved = Vec::new();
    let old = ratios(baseline);
    for (figure, now) in ratios(current) {
        let Some((_, before)) = old.iter().find(|(f, _)| *f == figure) else {
            continue;
        };
        let change = if *before > 0.0 {
            (now / before - 1.0).abs()
        } else {
            0.0
        };
        if change > threshold {
            moved.push(Moved {
                figure,
                baseline: *before,
                current: now,
            });
        }
    }
    moved
}

fn ratios(r: &Report) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for w in &r.workloads {
        let refi = reference(w);
        let Some(reference) = w.results.get(refi) else {
            continue;
        };
        let Some(rr) = &reference.run else { continue };
        for (i, res) in w.results.iter().enumerate() {
            if let Some(x) = res.e2e_vs_raw {
                out.push((
                    format!(
                        "{}: {} end-to-end ÷ raw broker",
                        w.workload.name, res.backend
                    ),
                    x,
                ));
            }
            let Some(run) = &res.run else { continue };
            if i == refi {
                continue;
            }
            let pairs = [
                ("e2e p50", run.e2e_ms.p50, rr.e2e_ms.p50),
                ("e2e p99", run.e2e_ms.p99, rr.e2e_ms.p99),
                ("ack p99", run.ack_ms.p99, rr.ack_ms.p99),
                ("deliveries/s", run.delivered_per_sec, rr.delivered_per_sec),
            ];
            for (what, a, b) in pairs {
                if b > 0.0 {
                    out.push((
                        format!(
                            "{}: {} ÷ {} {what}",
                            w.workload.name, res.backend, reference.backend
                        ),
                        a / b,
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jitter::{JitterReport, Tally};

    fn jitter_report(lost: u64, violations: u64) -> Report {
        let workload = Workload {
            name: "jitter".into(),
            description: "resets".into(),
            pattern: Pattern::Jitter {
                members: 10,
                close_after_ms: [10_000, 20_000],
                offline_ms: [1_500, 2_500],
            },
            users: 60,
            rate: 40.0,
            size: 100,
            duration_secs: 20.0,
            warmup_secs: 0.0,
            raw_baseline: false,
            ramp: None,
        };
        let mut result = BackendResult::new("redis");
        result.jitter = Some(JitterReport {
            sent: 10,
            acked: 10,
            tally: Tally {
                expected: 20,
                delivered: 20 - lost,
                delivered_pct: (20 - lost) as f64 * 5.0,
                lost,
                position_violations: violations,
                ..Tally::default()
            },
            ..JitterReport::default()
        });
        Report {
            schema: SCHEMA.into(),
            created: "now".into(),
            profile: "ci".into(),
            setup: Setup::default(),
            backends: vec!["redis".into()],
            workloads: vec![WorkloadReport::new(workload, vec![result])],
            faults: Vec::new(),
            against: None,
        }
    }

    fn personal(users: usize, rate: f64) -> Workload {
        Workload {
            name: "personal".into(),
            description: "1:1".into(),
            pattern: Pattern::Personal,
            users,
            rate,
            size: 100,
            duration_secs: 5.0,
            warmup_secs: 1.0,
            raw_baseline: false,
            ramp: None,
        }
    }

    fn ran(backend: &str, acked: f64, p50: f64, p99: f64, sustained: Option<f64>) -> BackendResult {
        let mut r = BackendResult::new(backend);
        let mut run = LoadReport {
            acked_per_sec: acked,
            ..LoadReport::default()
        };
        run.e2e_ms.p50 = p50;
        run.e2e_ms.p99 = p99;
        r.run = Some(run);
        r.sustained_rate = sustained;
        r
    }

    #[test]
    fn one_node_against_three_is_read_from_the_ramp_or_said_to_be_unknown() {
        let w = WorkloadReport::new(
            personal(60, 1000.0),
            vec![
                ran("rabbitmq", 1000.0, 10.0, 40.0, None),
                ran("redis", 1000.0, 5.0, 20.0, None),
                ran("rabbitmq-cluster", 990.0, 20.0, 40.0, None),
            ],
        );
        let lines = growth(&w);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("1 node → 3 nodes, rabbitmq: at a fixed 1000 msg/s"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("p50 2.00×"), "{}", lines[0]);
        assert!(lines[0].contains("does not show capacity"), "{}", lines[0]);

        let w = WorkloadReport::new(
            personal(60, 1000.0),
            vec![
                ran("redis", 1000.0, 5.0, 20.0, Some(4000.0)),
                ran("redis-cluster", 1000.0, 5.0, 20.0, Some(6000.0)),
            ],
        );
        let lines = growth(&w);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("4000 → 6000 msg/s (1.50×: throughput grew)"),
            "{}",
            lines[0]
        );

        let step = RampStep::default();
        let mut single = ran("rabbitmq", 1000.0, 10.0, 40.0, None);
        let mut cluster = ran("rabbitmq-cluster", 1000.0, 20.0, 40.0, Some(1000.0));
        single.ramp = vec![step.clone()];
        cluster.ramp = vec![step];
        let w = WorkloadReport::new(personal(60, 1000.0), vec![single, cluster]);
        let lines = growth(&w);
        assert!(
            lines[0].contains("none (not even the first step) → 1000 msg/s"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn jitter_losses_and_violations_are_problems_and_get_their_table() {
        assert!(jitter_report(0, 0).problems().is_empty());
        let bad = jitter_report(2, 3);
        assert_eq!(
            bad.problems(),
            vec![
                "redis / jitter: 2 deliveries lost",
                "redis / jitter: 3 position violations"
            ]
        );
        let md = markdown(&bad);
        assert!(
            md.contains("| redis | 10 / 10 | 0 | 0 (0) | 90.000 | 2 | 0 | 3 |"),
            "{md}"
        );
        assert!(!md.contains("latency-cdf"), "no charts for jitter");
        // Reports written before the jitter workload still read.
        let mut old = serde_json::to_value(&bad).expect("json");
        old["workloads"][0]["results"][0]
            .as_object_mut()
            .expect("object")
            .remove("jitter");
        let back: Report = serde_json::from_value(old).expect("reads");
        assert!(back.workloads[0].results[0].jitter.is_none());
    }

    fn usage(cpu_secs: f64, wall: f64) -> Usage {
        Usage {
            cpu_percent: cpu_secs / wall * 100.0,
            rss_mb: 10.0,
            processes: 1,
            cpu_secs,
        }
    }

    #[test]
    fn cpu_per_delivery_divides_each_groups_cpu_seconds_by_the_deliveries() {
        let res = Resources {
            gateways: Some(usage(2.0, 10.0)),
            workers: Some(usage(1.0, 10.0)),
            broker: None,
            database: Some(usage(0.5, 10.0)),
            load_generator: Some(usage(4.0, 10.0)),
            broker_nodes: Vec::new(),
            wall_secs: 10.0,
        };
        let c = CpuPerDelivery::of(&res, 1000).expect("measured");
        assert_eq!(c.deliveries, 1000);
        assert_eq!(c.gateways, Some(2000.0));
        assert_eq!(c.workers, Some(1000.0));
        assert_eq!(c.broker, None);
        assert_eq!(c.database, Some(500.0));
        // The load generator is the clients, not the system under test.
        assert_eq!(c.total, 3500.0);
        assert_eq!(CpuPerDelivery::of(&res, 0), None);
        // Resources of a report written before the CPU seconds were kept.
        let old = Resources {
            wall_secs: 0.0,
            ..res.clone()
        };
        assert_eq!(CpuPerDelivery::of(&old, 1000), None);

        // Derived for every result from its run's deliveries, and shown.
        let mut r = ran("memory", 400.0, 2.0, 8.0, None);
        if let Some(run) = r.run.as_mut() {
            run.delivered = 4000;
        }
        r.resources = Some(res);
        let w = WorkloadReport::new(personal(100, 400.0), vec![r]);
        let c = w.results[0].cpu_us_per_delivery.as_ref().expect("derived");
        assert_eq!(c.total, 875.0);
        let mut report = jitter_report(0, 0);
        report.workloads = vec![w];
        let md = markdown(&report);
        assert!(md.contains("| CPU µs per delivery, total | 875 |"), "{md}");
        assert!(
            md.contains("| CPU µs per delivery, gateways | 500 |"),
            "{md}"
        );
        assert!(!md.contains("CPU µs per delivery, broker"), "{md}");
    }

    #[test]
    fn gateway_rss_per_session_needs_sessions() {
        let m = GatewayMemory {
            sessions: 200,
            rss_mb: 50.0,
        };
        assert_eq!(m.kib_per_session(), Some(256.0));
        assert_eq!(
            GatewayMemory {
                sessions: 0,
                rss_mb: 50.0
            }
            .kib_per_session(),
            None
        );
    }

    #[test]
    fn ab_ratios_divide_new_by_old_and_get_their_table() {
        let measured = |backend: &str, p99: f64, cpu: f64, rss_mb: f64, sustained| {
            let mut r = ran(backend, 400.0, 2.0, p99, sustained);
            if let Some(run) = r.run.as_mut() {
                run.delivered = 1000;
                run.delivered_per_sec = 400.0;
            }
            r.resources = Some(Resources {
                gateways: Some(usage(cpu, 10.0)),
                workers: Some(usage(0.5, 10.0)),
                wall_secs: 10.0,
                ..Resources::default()
            });
            r.gateway_memory = Some(GatewayMemory {
                sessions: 100,
                rss_mb,
            });
            r
        };
        let new = measured("redis", 8.0, 1.0, 25.0, Some(3000.0));
        let old = measured(&old_name("redis"), 16.0, 2.0, 50.0, Some(2000.0));
        let w =
            WorkloadReport::new(personal(100, 400.0), vec![new]).with_against(vec![old], &[false]);
        let ab = &w.ab[0];
        assert_eq!(ab.backend, "redis");
        assert!(!ab.new_first);
        assert_eq!(ab.p99_ms, Some(0.5));
        assert_eq!(ab.p50_ms, Some(1.0));
        assert_eq!(ab.deliveries_per_sec, Some(1.0));
        // (1.0 + 0.5) / (2.0 + 0.5) CPU seconds over the same deliveries.
        assert_eq!(ab.cpu_us_per_delivery, Some(0.6));
        assert_eq!(ab.gateway_cpu_us_per_delivery, Some(0.5));
        assert_eq!(ab.worker_cpu_us_per_delivery, Some(1.0));
        assert_eq!(ab.rss_kib_per_session, Some(0.5));
        assert_eq!(ab.sustained_rate, Some(1.5));

        let mut report = jitter_report(0, 0);
        report.against = Some(Against {
            binary: "/tmp/old/target/release/fanout".into(),
            version: "fanout 0.1.0".into(),
        });
        report.workloads = vec![w];
        let md = markdown(&report);
        assert!(md.contains("A/B: new ÷ old"), "{md}");
        assert!(
            md.contains("| | redis new | redis old | redis new ÷ old |"),
            "{md}"
        );
        assert!(md.contains("| e2e p99 ms | 8.00 | 16.0 | 0.50× |"), "{md}");
        assert!(
            md.contains("| sustained msg/s (ramp) | 3000 | 2000 | 1.50× |"),
            "{md}"
        );
        assert!(
            md.contains("| gateway RSS KiB per session | 256 | 512 | 0.50× |"),
            "{md}"
        );
        assert!(md.contains("Run order: redis: old first."), "{md}");
        assert_eq!(
            ab_lines(&report),
            vec![
                "A/B redis / personal (old first), new ÷ old: sustained msg/s (ramp) 1.50×, \
                 deliveries/s 1.00×, e2e p50 ms 1.00×, e2e p99 ms 0.50×, \
                 CPU µs per delivery, total 0.60×, CPU µs per delivery, gateways 0.50×, \
                 CPU µs per delivery, workers 1.00×, gateway RSS KiB per session 0.50×"
            ]
        );
        // The old build's results stay out of the backends' own table.
        assert!(!md.contains("| redis@old |"), "{md}");

        // Its losses are problems too, named as its.
        if let Some(run) = report.workloads[0].against[0].run.as_mut() {
            run.lost = 3;
        }
        assert_eq!(
            report.problems(),
            vec!["redis@old / personal: 3 deliveries lost"]
        );
        // And the A/B fields survive the JSON.
        let back: Report =
            serde_json::from_str(&serde_json::to_string(&report).expect("json")).expect("reads");
        assert_eq!(back, report);
    }

    #[test]
    fn the_committed_baseline_still_reads() {
        let old: Report =
            serde_json::from_str(include_str!("../../benches/baseline/ci.json")).expect("reads");
        assert_eq!(old.schema, SCHEMA);
        assert!(old.against.is_none());
        for w in &old.workloads {
            assert!(w.against.is_empty() && w.ab.is_empty());
            for r in &w.results {
                assert!(r.cpu_us_per_delivery.is_none() && r.gateway_memory.is_none());
            }
        }
        // Its resources predate the CPU seconds: no per-delivery figure.
        let md = markdown(&old);
        assert!(!md.contains("CPU µs per delivery"));
    }
}
