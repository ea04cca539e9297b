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
}

/// One workload, every backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkloadReport {
    /// The workload as run.
    pub workload: Workload,
    /// One per backend, in run order.
    pub results: Vec<BackendResult>,
}

impl WorkloadReport {
    pub(crate) fn new(workload: Workload, mut results: Vec<BackendResult>) -> Self {
        for r in &mut results {
            r.e2e_vs_raw = match (r.e2e_rate(), &r.raw) {
                (Some(e2e), Some(raw)) if raw.msgs_per_sec > 0.0 => Some(e2e / raw.msgs_per_sec),
                _ => None,
            };
        }
        Self { workload, results }
    }
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
        }
    }

    /// Correctness problems: any error, loss, duplicate or misrouting. A
    /// benchmark with any of these measured a broken system.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in &self.workloads {
            for r in &w.results {
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
    for r in &w.results {
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
    for r in &w.results {
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
    let _ = writeln!(md, "\n**Reading.** {}\n", reading(w));
    for r in &w.results {
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
        let line = match (single.sustained_rate, cluster.sustained_rate) {
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
}
