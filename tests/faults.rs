//! The fault matrix (issue 6): 3 gateways and 2 workers as real processes
//! under steady 1:1 and group traffic, each fault injected in the middle,
//! every message accounted for afterwards. One test per broker; they never
//! run at the same time (the RabbitMQ restart would disturb the other).
//!
//! `FANOUT_TEST_FAULTS=worker_kill,database_outage` runs a subset.
//! `docs/reliability.md` explains the table these print.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fanout::config::BackendKind;
use fanout_bench::faults::{run_fault, FaultKind, FaultResult, FaultSpec};

/// One matrix at a time in this process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The faults to run on a single node (`cluster` false) or a cluster.
fn selected(cluster: bool) -> Vec<FaultKind> {
    let all = FaultKind::ALL.into_iter().filter(|f| f.applies(cluster));
    match std::env::var("FANOUT_TEST_FAULTS") {
        Ok(list) if !list.trim().is_empty() => all
            .filter(|f| list.split(',').any(|s| s.trim() == f.as_str()))
            .collect(),
        _ => all.filter(|f| f.by_default()).collect(),
    }
}

fn port_open(port: u16) -> Result<(), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn tool_runs(program: &str, args: &[&str]) -> Result<(), String> {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("{program}: {e}"))
        .and_then(|s| {
            s.success()
                .then_some(())
                .ok_or_else(|| format!("{program} {} failed", args.join(" ")))
        })
}

/// Whether everything the matrix for `backend` needs is here; skips loudly
/// (or fails under CI) when not.
fn services_present(backend: BackendKind) -> bool {
    let pg = common::postgres_admin_url();
    let pg_port = pg
        .rsplit_once('@')
        .map_or(pg.as_str(), |(_, h)| h)
        .split('/')
        .next()
        .and_then(|hp| hp.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(5432);
    let checks: Vec<(&str, Result<(), String>)> = match backend {
        BackendKind::Rabbitmq => vec![
            ("PostgreSQL", port_open(pg_port)),
            ("RabbitMQ", port_open(5672)),
            ("rabbitmqctl", tool_runs("rabbitmqctl", &["-q", "status"])),
        ],
        _ => vec![
            ("PostgreSQL", port_open(pg_port)),
            ("redis-server", tool_runs("redis-server", &["--version"])),
        ],
    };
    for (what, check) in checks {
        if let Err(why) = check {
            common::skip_or_fail(what, &why);
            return false;
        }
    }
    true
}

async fn matrix(backend: BackendKind) {
    run_matrix(backend, false).await;
}

/// The matrix on a cluster the run starts (losing a node).
async fn cluster_matrix(backend: BackendKind) {
    run_matrix(backend, true).await;
}

async fn run_matrix(backend: BackendKind, cluster: bool) {
    if !services_present(backend) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut spec = FaultSpec::new(backend, PathBuf::from(env!("CARGO_BIN_EXE_fanout")));
    spec.cluster = cluster;
    spec.postgres_admin_url = common::postgres_admin_url();
    spec.log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults");
    if let Ok(url) = std::env::var("FANOUT_RABBITMQ_URL") {
        spec.rabbitmq_url = url;
    }
    let started = Instant::now();
    let mut results: Vec<FaultResult> = Vec::new();
    for fault in selected(cluster) {
        eprintln!("[faults] {backend:?} / {fault}: running");
        let r = run_fault(&spec, fault)
            .await
            .unwrap_or_else(|e| panic!("{backend:?} / {fault}: the run failed: {e}"));
        eprintln!(
            "[faults] {backend:?} / {fault}: {} ms\n{}",
            r.run_ms,
            serde_json::to_string(&r).unwrap_or_default()
        );
        results.push(r);
    }
    eprintln!(
        "\n[faults] {backend:?}: {} faults in {:.1} s (logs under {})\n{}",
        results.len(),
        started.elapsed().as_secs_f64(),
        spec.log_dir.display(),
        FaultResult::table_header()
    );
    for r in &results {
        eprintln!("{}", r.table_row());
    }
    for r in &results {
        eprintln!("- {}: {}", r.fault, r.note);
    }
    let broken: Vec<String> = results
        .iter()
        .flat_map(|r| {
            r.violations()
                .into_iter()
                .map(move |v| format!("{backend:?} / {}: {v}", r.fault))
        })
        .collect();
    assert!(
        broken.is_empty(),
        "guarantees broken:\n{}",
        broken.join("\n")
    );
}

common::backend_tests!(matrix {
    fault_matrix_rabbitmq: Rabbitmq,
    fault_matrix_redis: Redis,
});

common::backend_tests!(cluster_matrix {
    fault_matrix_redis_cluster: Redis,
    fault_matrix_rabbitmq_cluster: Rabbitmq,
});
