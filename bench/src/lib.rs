//! fanout's tools, apart from the server so that it carries none of their
//! dependencies: a Socket.IO [`client`], the load generator ([`load`],
//! `fanout load`), the side-by-side benchmark (this module, `fanout
//! bench`) and the fault matrix ([`faults`]). The `fanout-bench` binary
//! runs them; `fanout load|bench|bench-compare` execs it.
//!
//! `fanout bench`: every selected backend, one after the other in one run,
//! as real gateway and worker processes on loopback, driven by the same
//! workload files, measured end to end, and written up as one report.
//!
//! Per backend: the raw-broker baseline of each workload ([`raw`]), then a
//! fresh PostgreSQL database and namespace, a [`procs::Fleet`] (3 gateways
//! and 2 workers by default; `memory` is one `serve` process), each
//! workload at its fixed rate and, when it has one, its ramp; CPU and RSS
//! of every process from `/proc`; then everything is stopped and removed
//! before the next backend starts, so backends never share the machine.

pub mod charts;
pub mod client;
pub mod faults;
pub mod jitter;
pub mod load;
pub mod pg;
pub mod procs;
pub mod raw;
pub mod report;
pub mod topology;
pub mod workload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::load::{LoadReport, LoadSpec};
use fanout::auth::Tokens;
use fanout::config::{BackendKind, Config};
use procs::{Fleet, FleetSpec, Role};
use raw::{RawResult, RawSpec};
use report::{BackendResult, NodeUsage, RampStep, Report, Resources, Usage, WorkloadReport};
use topology::{Running, Target};
use workload::Workload;

/// Whether `s` is a plain name usable in file names and ids.
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `fanout` binary the gateways and workers run.
    pub binary: PathBuf,
    /// Backends with their topology, in run order.
    pub backends: Vec<Target>,
    /// Workloads, profile applied.
    pub workloads: Vec<Workload>,
    /// Profile name, for the report.
    pub profile: String,
    /// Report directory.
    pub out: PathBuf,
    /// Server-level PostgreSQL URL; each backend gets a database of its own.
    pub postgres_admin_url: String,
    /// Gateway processes per broker backend.
    pub gateways: usize,
    /// Worker processes per broker backend.
    pub workers: usize,
    /// Broker URLs and settings the processes inherit.
    pub base: Config,
    /// Also run the fault matrix (`faults.rs`) on each broker backend.
    pub faults: bool,
    /// `--against`: another `fanout` binary (checked by the caller), run
    /// beside `binary` on every backend and workload, and what it printed
    /// for `--version`.
    pub against: Option<(PathBuf, String)>,
}

/// Why the benchmark could not run at all (a backend that fails is recorded
/// in the report instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// Writing the report failed.
    #[error("writing the report to {path}: {source}")]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A bad option.
    #[error("{0}")]
    Options(String),
}

const SECRET: &str = "fanout-bench-secret-0123456789abcdef";

/// Runs the whole benchmark and writes the report; returns it.
pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    if opts.backends.is_empty() || opts.workloads.is_empty() {
        return Err(BenchError::Options(
            "select at least one backend and one workload".into(),
        ));
    }
    std::fs::create_dir_all(&opts.out).map_err(|source| BenchError::Write {
        path: opts.out.clone(),
        source,
    })?;
    let mut report = Report::new(opts);
    let run_id = format!(
        "bench{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    report.against = opts
        .against
        .as_ref()
        .map(|(path, version)| report::Against {
            binary: path.display().to_string(),
            version: version.clone(),
        });
    let n = opts.workloads.len();
    let mut results: Vec<Vec<BackendResult>> = vec![Vec::new(); n];
    let mut against: Vec<Vec<BackendResult>> = vec![Vec::new(); n];
    let mut new_first: Vec<Vec<bool>> = vec![Vec::new(); n];
    for (b, &target) in opts.backends.iter().enumerate() {
        progress(&format!(
            "== backend {target} ({}/{})",
            b + 1,
            opts.backends.len()
        ));
        let namespace = format!("{run_id}{b}");
        let per_backend = run_backend(opts, target, &namespace, b).await;
        for (w, sides) in per_backend.into_iter().enumerate() {
            let mut sides = sides.into_iter();
            if let Some(r) = sides.next() {
                results[w].push(r);
            }
            if let Some(r) = sides.next() {
                against[w].push(r);
                new_first[w].push(new_runs_first(b, w));
            }
        }
    }
    if opts.faults {
        report.faults = run_faults(opts).await;
    }
    report.workloads = opts
        .workloads
        .iter()
        .cloned()
        .zip(results)
        .zip(against.into_iter().zip(new_first))
        .map(|((workload, results), (against, new_first))| {
            let w = WorkloadReport::new(workload, results);
            if against.is_empty() {
                w
            } else {
                w.with_against(against, &new_first)
            }
        })
        .collect();
    for line in report::ab_lines(&report) {
        progress(&line);
    }
    report::write(&report, &opts.out)?;
    // Charts after the report: they read its figures, and the report never
    // depends on them.
    charts::draw_all(&report, &opts.out.join("charts"))?;
    Ok(report)
}

/// The fault matrix on every selected broker backend, as report rows.
async fn run_faults(opts: &BenchOptions) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    let brokers = opts
        .backends
        .iter()
        .filter(|t| t.kind != BackendKind::Memory);
    for &target in brokers {
        let kind = target.kind;
        for fault in faults::FaultKind::ALL
            .into_iter()
            .filter(|f| f.applies(target.cluster))
        {
            let name = target.name();
            progress(&format!("faults / {name}: {fault} under steady traffic"));
            let mut spec = faults::FaultSpec::new(kind, opts.binary.clone());
            spec.cluster = target.cluster;
            spec.postgres_admin_url = opts.postgres_admin_url.clone();
            spec.rabbitmq_url = opts.base.rabbitmq_url.clone();
            spec.log_dir = opts.out.join("logs").join("faults");
            let row = match faults::run_fault(&spec, fault).await {
                Ok(r) => {
                    progress(&format!(
                        "faults / {name}: {fault}: acked {} of {}, acked-not-stored {}, duplicates {}, not delivered online {}, recovery {} ms",
                        r.acked,
                        r.sent,
                        r.acked_not_stored,
                        r.duplicates,
                        r.not_delivered_online,
                        r.recovery_ms.map_or_else(|| "?".to_owned(), |m| m.to_string())
                    ));
                    serde_json::to_value(&r).unwrap_or_default()
                }
                Err(e) => {
                    progress(&format!("faults / {name}: {fault}: could not run: {e}"));
                    serde_json::json!({ "backend": name, "fault": fault.as_str(), "error": e.to_string() })
                }
            };
            rows.push(row);
        }
    }
    rows
}

/// One line of progress on stderr (CI logs keep it; a terminal shows it).
pub fn progress(line: &str) {
    eprintln!("[bench] {line}");
}

/// `--against`: whether this build runs workload `w` on backend `b` before
/// the other build. The order alternates from one workload to the next and
/// from one backend to the next, so that drift over the run (the machine
/// warming up, the database growing, a neighbour's load) favours neither
/// build.
pub fn new_runs_first(b: usize, w: usize) -> bool {
    (b + w).is_multiple_of(2)
}

/// What one backend's runs share: its target, the configuration the
/// processes inherit (pointed at the run's cluster, if any), and the
/// broker's nodes, for their CPU.
struct Deployment {
    target: Target,
    base: Config,
    nodes: Vec<(String, u32)>,
}

/// Every workload on one backend; failures become results with an error.
/// Per workload, this build's result, then with `--against` the other's.
/// A cluster target starts its cluster first and stops it at the end.
async fn run_backend(
    opts: &BenchOptions,
    target: Target,
    namespace: &str,
    index: usize,
) -> Vec<Vec<BackendResult>> {
    let name = target.name();
    let cluster = match Running::start(target).await {
        Ok(c) => c,
        Err(why) => {
            progress(&format!("{name}: {why}"));
            return opts
                .workloads
                .iter()
                .map(|_| {
                    sides(opts, name)
                        .into_iter()
                        .map(|(label, _)| BackendResult {
                            error: Some(why.clone()),
                            ..BackendResult::new(&label)
                        })
                        .collect()
                })
                .collect();
        }
    };
    let nodes = cluster.as_ref().map(Running::nodes).unwrap_or_default();
    if cluster.is_some() {
        progress(&format!(
            "{name}: started a local cluster of {} nodes",
            nodes.len()
        ));
    }
    let deployment = Deployment {
        target,
        base: match &cluster {
            Some(c) => c.configure(opts.base.clone()),
            None => opts.base.clone(),
        },
        nodes,
    };
    let out = run_deployment(opts, &deployment, namespace, index).await;
    if let Some(c) = cluster {
        c.stop().await;
    }
    out
}

/// The builds a run compares: this one, and with `--against` the other,
/// as (result name, binary).
fn sides(opts: &BenchOptions, name: &str) -> Vec<(String, PathBuf)> {
    let mut out = vec![(name.to_owned(), opts.binary.clone())];
    if let Some((other, _)) = &opts.against {
        out.push((report::old_name(name), other.clone()));
    }
    out
}

/// One build's processes on a deployment, with the namespace and database
/// of their own.
struct Side {
    name: String,
    namespace: String,
    db: Option<pg::TempDatabase>,
    fleet: Option<Fleet>,
}

async fn run_deployment(
    opts: &BenchOptions,
    deployment: &Deployment,
    namespace: &str,
    backend_index: usize,
) -> Vec<Vec<BackendResult>> {
    let kind = deployment.target.kind;
    let name = deployment.target.name();
    let builds = sides(opts, name);
    let mut out: Vec<Vec<BackendResult>> = opts
        .workloads
        .iter()
        .map(|_| {
            builds
                .iter()
                .map(|(label, _)| BackendResult::new(label))
                .collect()
        })
        .collect();

    // The raw baseline measures the broker alone: the same for both builds.
    for (w, workload) in opts.workloads.iter().enumerate() {
        if !workload.raw_baseline {
            continue;
        }
        if deployment.target.cluster {
            // The raw baseline drives one broker node; a cluster's would
            // need its own client side.
            progress(&format!(
                "{name} / {}: raw-broker baseline not measured on a cluster",
                workload.name
            ));
            continue;
        }
        progress(&format!("{name} / {}: raw-broker baseline", workload.name));
        match raw_baseline(opts, kind, &format!("{namespace}r{w}"), workload).await {
            Ok(r) => {
                progress(&format!(
                    "{name} / {}: broker alone carries {:.0} msg/s ({:.0} deliveries/s)",
                    workload.name, r.msgs_per_sec, r.deliveries_per_sec
                ));
                for side in out[w].iter_mut() {
                    side.raw = Some(r.clone());
                }
            }
            Err(e) => progress(&format!(
                "{name} / {}: raw baseline failed: {e}",
                workload.name
            )),
        }
    }

    let (gateways, workers) = match kind {
        BackendKind::Memory => (1, 0),
        _ => (opts.gateways, opts.workers),
    };
    // Both builds' processes stay up for the whole backend, so that each
    // workload can run on one right after the other; whatever the idle one
    // costs the shared broker and database, it costs both builds' runs.
    let mut running: Vec<Side> = Vec::new();
    for (s, (label, binary)) in builds.iter().enumerate() {
        let namespace = if s == 0 {
            namespace.to_owned()
        } else {
            format!("{namespace}o")
        };
        let mut side = Side {
            name: label.clone(),
            namespace,
            db: None,
            fleet: None,
        };
        let started = start_side(opts, deployment, &side, binary, gateways, workers).await;
        match started {
            Ok((db, fleet)) => {
                side.db = Some(db);
                side.fleet = Some(fleet);
            }
            Err(why) => {
                progress(&format!("{label}: {why}"));
                for per_workload in out.iter_mut() {
                    per_workload[s].error.get_or_insert_with(|| why.clone());
                }
            }
        }
        running.push(side);
    }

    let tokens = Tokens::new(SECRET.as_bytes());
    for (w, workload) in opts.workloads.iter().enumerate() {
        let mut order: Vec<usize> = (0..running.len()).collect();
        if !new_runs_first(backend_index, w) {
            order.reverse();
        }
        for s in order {
            let side = &mut running[s];
            let Some(fleet) = side.fleet.as_mut() else {
                continue;
            };
            if let Err(e) = fleet.check_alive() {
                out[w][s].error = Some(e.to_string());
                continue;
            }
            run_workload(
                deployment,
                fleet,
                &tokens,
                workload,
                (&side.name, &side.namespace),
                w,
                &mut out[w][s],
            )
            .await;
        }
    }

    for side in running {
        if let Some(mut fleet) = side.fleet {
            fleet.stop().await;
        }
        let mut config = deployment.base.clone();
        config.backend = kind;
        config.namespace = side.namespace.clone();
        if let Err(e) = fanout::app::purge_namespace(&config).await {
            progress(&format!(
                "{}: cannot purge namespace {}: {e}",
                side.name, side.namespace
            ));
        }
        if let Some(db) = side.db {
            db.drop_db().await;
        }
    }
    out
}

/// A fresh database and one build's fleet on it.
async fn start_side(
    opts: &BenchOptions,
    deployment: &Deployment,
    side: &Side,
    binary: &std::path::Path,
    gateways: usize,
    workers: usize,
) -> Result<(pg::TempDatabase, Fleet), String> {
    let db = pg::TempDatabase::create(
        &opts.postgres_admin_url,
        &format!("fanout_{}", side.namespace),
    )
    .await
    .map_err(|e| e.to_string())?;
    let spec = FleetSpec {
        binary: binary.to_owned(),
        backend: deployment.target.kind,
        namespace: side.namespace.clone(),
        database_url: db.url.clone(),
        jwt_secret: SECRET.to_owned(),
        env: fleet_env(&deployment.base),
        log_dir: opts.out.join("logs").join(&side.name),
    };
    progress(&format!(
        "{}: starting {gateways} gateway(s) and {workers} worker(s) from {}",
        side.name,
        binary.display()
    ));
    match Fleet::start(spec, gateways, workers).await {
        Ok(fleet) => Ok((db, fleet)),
        Err(e) => {
            db.drop_db().await;
            Err(format!("cannot start the fleet: {e}"))
        }
    }
}

/// Settings every benchmarked process gets: the broker URLs of this
/// process's configuration, and client limits raised so the offered load
/// is measured rather than refused.
fn fleet_env(base: &Config) -> Vec<(String, String)> {
    let v = |k: &str, v: String| (k.to_owned(), v);
    vec![
        v("FANOUT_RABBITMQ_URL", base.rabbitmq_url.clone()),
        v("FANOUT_REDIS_URL", base.redis_url.clone()),
        v("FANOUT_REDIS__CLUSTER", base.redis.cluster.to_string()),
        v("FANOUT_LOG", "warn".into()),
        v("FANOUT_LIMITS__MESSAGES_PER_SECOND", "100000".into()),
        v("FANOUT_LIMITS__MESSAGE_BURST", "100000".into()),
        v("FANOUT_LIMITS__SEND_QUEUE", "100000".into()),
        v(
            "FANOUT_INCOMING__PARTITIONS",
            base.incoming.partitions.to_string(),
        ),
    ]
}

async fn raw_baseline(
    opts: &BenchOptions,
    kind: BackendKind,
    namespace: &str,
    workload: &Workload,
) -> Result<RawResult, String> {
    let mut config = opts.base.clone();
    config.backend = kind;
    config.namespace = namespace.to_owned();
    let backend = fanout::app::connect_backend(&config)
        .await
        .map_err(|e| e.to_string())?;
    let spec = RawSpec {
        pattern: workload.pattern.clone(),
        users: workload.users,
        size: workload.size,
        duration: workload
            .duration()
            .saturating_sub(workload.warmup())
            .min(Duration::from_secs(5)),
        servers: opts.gateways.max(1),
        consumers: opts.workers.max(1) * config.worker.consumers as usize,
        server_prefix: format!("{namespace}-raw"),
    };
    let result = raw::run(backend.clone(), &spec)
        .await
        .map_err(|e| e.to_string());
    let _ = backend.shutdown().await;
    if let Err(e) = fanout::app::purge_namespace(&config).await {
        progress(&format!("cannot purge namespace {namespace}: {e}"));
    }
    result
}

async fn run_workload(
    deployment: &Deployment,
    fleet: &mut Fleet,
    tokens: &Tokens,
    workload: &Workload,
    (name, namespace): (&str, &str),
    index: usize,
    out: &mut BackendResult,
) {
    let label = format!("{name} / {}", workload.name);
    if let crate::load::Pattern::Jitter {
        members,
        close_after_ms,
        offline_ms,
    } = workload.pattern
    {
        let spec = crate::jitter::JitterSpec {
            urls: fleet.urls(),
            users: workload.users,
            members,
            rate: workload.rate,
            duration: workload.duration(),
            size: workload.size,
            close_after_ms,
            offline_ms,
            drain: Duration::from_secs(5),
            user_prefix: format!("{namespace}w{index}j"),
            progress: Some(format!("{label} @ {:.0}/s", workload.rate)),
        };
        let before = Snapshot::take(fleet, deployment);
        let result = crate::jitter::run(&spec, tokens).await;
        out.resources = Some(before.usage(fleet, deployment));
        match result {
            Ok(r) => {
                progress(&format!("{label}: {}", jitter_summary(&r)));
                out.jitter = Some(r);
            }
            Err(e) => {
                progress(&format!("{label}: failed: {e}"));
                out.error = Some(e.to_string());
            }
        }
        return;
    }
    let spec = |rate: f64, duration: Duration, step: usize| LoadSpec {
        urls: fleet.urls(),
        pattern: workload.pattern.clone(),
        users: workload.users,
        rate,
        duration,
        warmup: workload.warmup(),
        size: workload.size,
        drain: Duration::from_secs(10),
        user_prefix: format!("{namespace}w{index}s{step}u"),
        progress: Some(format!("{label} @ {rate:.0}/s")),
    };

    let before = Snapshot::take(fleet, deployment);
    let facts = tokio::spawn(broker_facts_later(
        deployment.target,
        deployment.base.clone(),
        namespace.to_owned(),
        workload.duration() / 2,
    ));
    let memory = tokio::spawn(gateway_memory_later(
        fleet.urls(),
        [fleet.pids(Role::Gateway), fleet.pids(Role::Serve)].concat(),
        workload.duration() / 2,
    ));
    let result = crate::load::run(&spec(workload.rate, workload.duration(), 0), tokens).await;
    out.resources = Some(before.usage(fleet, deployment));
    out.broker = facts.await.unwrap_or_default();
    out.gateway_memory = memory.await.ok().flatten();
    match result {
        Ok(r) => {
            progress(&format!("{label}: {}", summary(&r)));
            out.run = Some(r);
        }
        Err(e) => {
            progress(&format!("{label}: failed: {e}"));
            out.error = Some(e.to_string());
            return;
        }
    }

    let Some(ramp) = &workload.ramp else {
        return;
    };
    let mut failed_in_a_row = 0;
    for (step, rate) in workload.ramp_rates().into_iter().enumerate() {
        let r = match crate::load::run(
            &spec(rate, Duration::from_secs_f64(ramp.step_secs), step + 1),
            tokens,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                progress(&format!("{label}: ramp step {rate:.0}/s failed: {e}"));
                break;
            }
        };
        let passed = r.e2e_ms.p99 <= ramp.p99_bound_ms
            && r.lost == 0
            && r.send_errors == 0
            && r.acked_per_sec >= 0.95 * rate;
        progress(&format!(
            "{label}: ramp {rate:.0}/s -> p99 {:.1} ms, {:.0} acked/s: {}",
            r.e2e_ms.p99,
            r.acked_per_sec,
            if passed { "sustained" } else { "not sustained" }
        ));
        out.ramp.push(RampStep {
            rate,
            passed,
            p50_ms: r.e2e_ms.p50,
            p99_ms: r.e2e_ms.p99,
            acked_per_sec: r.acked_per_sec,
            delivered_per_sec: r.delivered_per_sec,
            lost: r.lost,
        });
        if passed {
            out.sustained_rate = Some(rate);
            failed_in_a_row = 0;
        } else {
            failed_in_a_row += 1;
        }
        // One failed step may be the shared machine's noise; two in a row,
        // or a rate the system no longer keeps up with, end the ramp.
        if failed_in_a_row >= 2 || r.acked_per_sec < 0.95 * rate {
            break;
        }
    }
}

fn summary(r: &LoadReport) -> String {
    format!(
        "{:.0} acked/s, {:.0} delivered/s, e2e p50 {:.1} ms p99 {:.1} ms, lost {}, duplicated {}, reordered {}, send errors {}",
        r.acked_per_sec,
        r.delivered_per_sec,
        r.e2e_ms.p50,
        r.e2e_ms.p99,
        r.lost,
        r.duplicated,
        r.reordered,
        r.send_errors
    )
}

fn jitter_summary(r: &crate::jitter::JitterReport) -> String {
    let t = &r.tally;
    format!(
        "{} resets, {} reconnects ({} failed), acked {} of {} sends, delivered {:.3} % ({} of {}), lost {}, duplicates {}, position violations {} (+{} unpositioned), incomplete resumes {}, RESUMED missing {}, replay p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        r.resets,
        r.reconnects,
        r.reconnect_errors,
        r.acked,
        r.sent,
        t.delivered_pct,
        t.delivered,
        t.expected,
        t.lost,
        t.duplicates,
        t.position_violations,
        t.unpositioned,
        t.resumed_incomplete,
        t.resumed_missing,
        t.replay_ms.p50,
        t.replay_ms.p99,
        t.replay_ms.max
    )
}

/// CPU seconds per process at one instant, by group.
struct Snapshot {
    at: std::time::Instant,
    cpu: HashMap<u32, f64>,
}

/// A group of processes whose CPU and memory the report shows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Group {
    Gateways,
    Workers,
    Database,
    Load,
    /// The whole broker.
    Broker,
    /// One node of a broker cluster.
    BrokerNode(String),
}

/// The processes of each group: ours from the fleet, the broker's and the
/// database's found by their command lines (a run's own cluster: its
/// nodes, each a group of its own too).
fn groups(fleet: &Fleet, deployment: &Deployment) -> Vec<(Group, Vec<u32>)> {
    let mut g = vec![
        (
            Group::Gateways,
            [fleet.pids(Role::Gateway), fleet.pids(Role::Serve)].concat(),
        ),
        (Group::Workers, fleet.pids(Role::Worker)),
        (Group::Database, procs::find_pids(&["postgres"])),
        // This process: the virtual users share the machine too.
        (Group::Load, vec![std::process::id()]),
    ];
    if !deployment.nodes.is_empty() {
        g.push((
            Group::Broker,
            deployment.nodes.iter().map(|(_, pid)| *pid).collect(),
        ));
        for (node, pid) in &deployment.nodes {
            g.push((Group::BrokerNode(node.clone()), vec![*pid]));
        }
        return g;
    }
    let base = &deployment.base;
    match deployment.target.kind {
        // Not the nodes of a local cluster (their home is its directory),
        // which may be up beside the machine's broker (`.ci/run` starts it
        // before the tests and the benchmark).
        BackendKind::Rabbitmq => g.push((
            Group::Broker,
            procs::find_pids_except(&["beam.smp", "rabbit"], &["fanout-rmq-cluster"]),
        )),
        BackendKind::Redis => {
            let port = base
                .redis_url
                .rsplit(':')
                .next()
                .unwrap_or("6379")
                .trim_end_matches('/');
            let pids = procs::find_pids(&["redis-server", &format!(":{port}")]);
            g.push((Group::Broker, pids));
        }
        BackendKind::Memory => {}
    }
    g
}

impl Snapshot {
    fn take(fleet: &Fleet, deployment: &Deployment) -> Snapshot {
        let cpu = groups(fleet, deployment)
            .into_iter()
            .flat_map(|(_, pids)| pids)
            .filter_map(|pid| Some((pid, procs::sample(pid)?.cpu_secs)))
            .collect();
        Snapshot {
            at: std::time::Instant::now(),
            cpu,
        }
    }

    /// CPU used since the snapshot (a process started since counts from
    /// its start) and RSS now, per group.
    fn usage(&self, fleet: &Fleet, deployment: &Deployment) -> Resources {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let mut res = Resources {
            wall_secs: wall,
            ..Resources::default()
        };
        for (group, pids) in groups(fleet, deployment) {
            let mut u = Usage::default();
            for pid in pids {
                if let Some(s) = procs::sample(pid) {
                    let before = self.cpu.get(&pid).copied().unwrap_or(0.0);
                    let used = (s.cpu_secs - before).max(0.0);
                    u.cpu_secs += used;
                    u.cpu_percent += used / wall * 100.0;
                    u.rss_mb += s.rss_bytes as f64 / 1_048_576.0;
                    u.processes += 1;
                }
            }
            match group {
                Group::Gateways => res.gateways = Some(u),
                Group::Workers => res.workers = Some(u).filter(|u| u.processes > 0),
                Group::Database => res.database = Some(u).filter(|u| u.processes > 0),
                Group::Load => res.load_generator = Some(u),
                Group::Broker => res.broker = Some(u).filter(|u| u.processes > 0),
                Group::BrokerNode(node) => res.broker_nodes.push(NodeUsage { node, usage: u }),
            }
        }
        res
    }
}

/// Gateway RSS and live sessions `after` into a workload, while its users
/// are online. `None` if a gateway does not answer its metrics (an old
/// build without `fanout_sessions`, say): a per-session figure from some
/// of the gateways would be wrong.
async fn gateway_memory_later(
    urls: Vec<String>,
    pids: Vec<u32>,
    after: Duration,
) -> Option<report::GatewayMemory> {
    tokio::time::sleep(after).await;
    let mut sessions = 0.0;
    for url in &urls {
        let Ok((200, text)) = faults::services::http(url, "GET", "/metrics", None, None).await
        else {
            return None;
        };
        sessions += faults::services::metric_total(&text, "fanout_sessions")?;
    }
    let rss: u64 = pids
        .iter()
        .filter_map(|pid| procs::sample(*pid))
        .map(|s| s.rss_bytes)
        .sum();
    Some(report::GatewayMemory {
        sessions: sessions.max(0.0).round() as u64,
        rss_mb: rss as f64 / 1_048_576.0,
    })
}

/// Broker facts taken `after` into a workload, while its users are online.
async fn broker_facts_later(
    target: Target,
    base: Config,
    namespace: String,
    after: Duration,
) -> serde_json::Value {
    tokio::time::sleep(after).await;
    if target.cluster {
        // The CLI reads one node; the per-node CPU says more here.
        return serde_json::Value::Null;
    }
    broker_facts(target.kind, &base, &namespace).await
}

/// What the broker says about this namespace, through its own CLI (cheap,
/// and independent of the backend code under test). `null` fields when
/// the tool is missing.
pub async fn broker_facts(kind: BackendKind, base: &Config, namespace: &str) -> serde_json::Value {
    match kind {
        BackendKind::Rabbitmq => {
            let out = cli(
                "rabbitmqctl",
                &["list_bindings", "-q", "--no-table-headers", "source_name"],
            )
            .await;
            let exchange = format!("{namespace}.outgoing");
            let bindings = out.map(|o| o.lines().filter(|l| l.trim() == exchange).count());
            serde_json::json!({ "outgoing_bindings": bindings })
        }
        BackendKind::Redis => {
            let url = base.redis_url.as_str();
            let memory = cli("redis-cli", &["-u", url, "info", "memory"])
                .await
                .and_then(|o| {
                    o.lines()
                        .find_map(|l| l.strip_prefix("used_memory:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                });
            let pattern = format!("{namespace}:route:*");
            let routes = cli("redis-cli", &["-u", url, "--scan", "--pattern", &pattern])
                .await
                .map(|o| o.lines().count());
            serde_json::json!({ "used_memory_bytes": memory, "route_keys": routes })
        }
        BackendKind::Memory => serde_json::Value::Null,
    }
}

async fn cli(program: &str, args: &[&str]) -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::process::Command::new(program).args(args).output(),
    )
    .await
    .ok()?
    .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ab_order_alternates_by_workload_and_backend() {
        assert!(new_runs_first(0, 0));
        assert!(!new_runs_first(0, 1));
        assert!(new_runs_first(0, 2));
        assert!(!new_runs_first(1, 0));
        assert!(new_runs_first(1, 1));
    }
}
