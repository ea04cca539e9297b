//! The end-to-end suite in `tests/js/`: the stock JavaScript
//! `socket.io-client` against the real `fanout` binary, once on SQLite and
//! once on a fresh PostgreSQL database.
//!
//! Needs `node` (and `npm` when `tests/js/node_modules` is missing); without
//! them the tests skip loudly (or fail under `FANOUT_TEST_REQUIRE_SERVICES=1`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;

/// The two runs start many servers and time-sensitive checks; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("js")
}

/// Whether `program --version` runs.
fn runs(program: &str) -> Result<(), String> {
    match Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`{program} --version` exited with {s}")),
        Err(e) => Err(format!("cannot run `{program}`: {e}")),
    }
}

/// Checks node (and installs the client with npm if needed); `false` after
/// a skip.
fn prepare() -> bool {
    if let Err(why) = runs("node") {
        common::skip_or_fail("node", &why);
        return false;
    }
    let dir = js_dir();
    if !dir.join("node_modules").join("socket.io-client").exists() {
        if let Err(why) = runs("npm") {
            common::skip_or_fail("npm", &why);
            return false;
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("run npm ci");
        assert!(
            status.success(),
            "npm ci in {} failed: {status}",
            dir.display()
        );
    }
    true
}

/// The suite's files, sorted.
fn test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(js_dir())
        .expect("read tests/js")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".test.mjs"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no tests/js/*.test.mjs files");
    files
}

/// Runs the suite against `database_url` (None = SQLite).
fn run_suite(database_url: Option<&str>) -> ExitStatus {
    let mut cmd = Command::new("node");
    cmd.args(["--test", "--test-concurrency=1"])
        .args(test_files())
        .current_dir(js_dir())
        .env("FANOUT_BIN", env!("CARGO_BIN_EXE_fanout"))
        .env_remove("FANOUT_E2E_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if let Some(url) = database_url {
        cmd.env("FANOUT_E2E_DATABASE_URL", url);
    }
    cmd.status().expect("run node --test")
}

#[test]
fn node_client_sqlite() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !prepare() {
        return;
    }
    let status = run_suite(None);
    assert!(
        status.success(),
        "the node suite failed on SQLite: {status}"
    );
}

#[test]
fn node_client_postgres() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !prepare() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let Some(db) = runtime.block_on(common::TestDb::create()) else {
        return;
    };
    let status = run_suite(Some(&db.url));
    runtime.block_on(db.drop_db());
    assert!(
        status.success(),
        "the node suite failed on PostgreSQL: {status}"
    );
}
