//! Operations, black box: the `fanout` binary as an operator runs it.
//!
//! - weak secrets (empty or short, from a file or the environment) refuse
//!   to start, and the generated secret file is private and agreed on by
//!   processes starting at once;
//! - `serve` starts with every non-configuration `FANOUT_*` variable the
//!   project uses set (they are excluded from the configuration in one
//!   place, `config::NON_CONFIG_ENV`);
//! - on each broker: a worker's `/metrics` shows `messages_stored` rising
//!   under load; a second gateway with a live server id refuses to start
//!   while the first stays ready; on Redis, a gateway whose id is taken
//!   after all (its subscriber cut while it was paused) leaves readiness;
//! - on RabbitMQ: a gateway whose queue cannot be declared again keeps
//!   trying (past the ten tries it used to give up after), `/readyz` 503
//!   meanwhile, and delivers again once it can.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fanout::auth::Tokens;
use fanout::config::{is_non_config_env, BackendKind, Config};
use fanout_bench::client::Client;
use fanout_bench::procs::{Fleet, FleetSpec, Role};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const SECRET: &str = "ops-test-secret-0123456789abcdef0123";
const WAIT: Duration = Duration::from_secs(30);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fanout"))
}

/// `fanout ARGS` with none of this shell's `FANOUT_*` variables.
fn fanout(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FANOUT_") {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs to completion: exit code and stdout plus stderr.
async fn run(mut cmd: Command) -> (Option<i32>, String) {
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the process ends in time")
        .expect("the process runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test]
async fn weak_secrets_refuse_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path");
    let short = "0123456789abcdef0123456789abcde"; // 31 bytes
    let mut cases: Vec<(&str, Command)> = Vec::new();
    for (what, command, secret) in [
        ("empty FANOUT_JWT_SECRET, gateway", "gateway", ""),
        ("short FANOUT_JWT_SECRET, gateway", "gateway", short),
        ("short FANOUT_JWT_SECRET, worker", "worker", short),
        ("short FANOUT_JWT_SECRET, serve", "serve", short),
    ] {
        let mut cmd = fanout(&[command]);
        cmd.env("FANOUT_JWT_SECRET", secret)
            .env("FANOUT_BACKEND", "redis")
            .env("FANOUT_LISTEN", "127.0.0.1:0")
            .env("FANOUT_DATA_DIR", data);
        cases.push((what, cmd));
    }
    let mut token = fanout(&["token", "alice"]);
    token.env("FANOUT_JWT_SECRET", short);
    cases.push(("short FANOUT_JWT_SECRET, token", token));
    for (what, cmd) in cases {
        let (code, out) = run(cmd).await;
        assert_ne!(code, Some(0), "{what}: started anyway:\n{out}");
        assert!(
            out.contains("at least 32") && out.contains("openssl rand -hex 32"),
            "{what}: the error must say how to make a secret:\n{out}"
        );
    }
    // Files: empty (a crash between create and write in older versions)
    // and short. Never used, never replaced behind the operator's back.
    for content in ["", "\n", "tooshort\n"] {
        let file = dir.path().join("jwt-secret");
        std::fs::write(&file, content).expect("write");
        for args in [&["serve"][..], &["token", "alice"][..]] {
            let mut cmd = fanout(args);
            cmd.env("FANOUT_LISTEN", "127.0.0.1:0")
                .env("FANOUT_DATA_DIR", data);
            let (code, out) = run(cmd).await;
            assert_ne!(code, Some(0), "{args:?} with {content:?}: started:\n{out}");
            assert!(
                out.contains("openssl rand -hex 32") && out.contains("jwt-secret"),
                "{args:?} with {content:?}: the error must name the file and the fix:\n{out}"
            );
        }
        assert_eq!(std::fs::read_to_string(&file).expect("read"), content);
    }
}

#[tokio::test]
async fn generated_secret_is_private_and_agreed_on_by_concurrent_starts() {
    for round in 0..3 {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let runs = (0..8).map(|i| {
            let mut cmd = fanout(&["token", &format!("user{i}")]);
            cmd.env("FANOUT_DATA_DIR", &data);
            run(cmd)
        });
        let outputs = futures::future::join_all(runs).await;
        let file = data.join("jwt-secret");
        let secret = std::fs::read_to_string(&file).expect("secret file");
        assert!(secret.trim().len() >= 32, "{} bytes", secret.trim().len());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        }
        let tokens = Tokens::new(secret.trim().as_bytes());
        for (i, (code, out)) in outputs.iter().enumerate() {
            assert_eq!(*code, Some(0), "round {round}, process {i}:\n{out}");
            let token = out.lines().next().unwrap_or_default().trim();
            assert_eq!(
                tokens.verify(token).ok().as_deref(),
                Some(format!("user{i}").as_str()),
                "round {round}: process {i} signed with another secret than the file's"
            );
        }
        let names: Vec<String> = std::fs::read_dir(&data)
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("jwt-secret") && n != "jwt-secret")
            .collect();
        assert!(names.is_empty(), "temporary files left: {names:?}");
    }
}

/// Every `FANOUT_[A-Z0-9_]+` name in the project's sources, tests, docs,
/// CI and compose files.
fn project_variables() -> std::collections::BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = std::collections::BTreeSet::new();
    let mut stack: Vec<PathBuf> = [
        "src",
        "tests",
        "backends",
        "benches",
        "docs",
        ".ci",
        "compose",
        "README.md",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            let skip = path
                .file_name()
                .is_some_and(|n| n == "node_modules" || n == "target");
            if !skip {
                if let Ok(entries) = std::fs::read_dir(&path) {
                    stack.extend(entries.filter_map(Result::ok).map(|e| e.path()));
                }
            }
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut rest = text.as_str();
        while let Some(at) = rest.find("FANOUT_") {
            let tail = &rest[at..];
            let len = tail
                .bytes()
                .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
                .count();
            found.insert(tail[..len].to_owned());
            rest = &tail[len..];
        }
    }
    found
}

/// The environment name of every configuration key.
fn config_variables() -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let Value::Object(top) = serde_json::to_value(Config::default()).expect("serialize") else {
        panic!("the configuration serializes to a map");
    };
    for (key, value) in top {
        names.insert(format!("FANOUT_{}", key.to_ascii_uppercase()));
        if let Value::Object(section) = value {
            for sub in section.keys() {
                names.insert(format!(
                    "FANOUT_{}__{}",
                    key.to_ascii_uppercase(),
                    sub.to_ascii_uppercase()
                ));
            }
        }
    }
    names
}

#[tokio::test]
async fn serve_starts_with_every_non_config_variable_set() {
    // How docs/configuration.md spells the mapping, not variables.
    const PLACEHOLDERS: [&str; 2] = ["FANOUT_KEY", "FANOUT_SECTION__KEY"];
    let keys = config_variables();
    let others: Vec<String> = project_variables()
        .into_iter()
        // `FANOUT_` alone is prose (`FANOUT_*`).
        .filter(|n| n != "FANOUT_" && !keys.contains(n) && !PLACEHOLDERS.contains(&n.as_str()))
        .collect();
    let unlisted: Vec<&String> = others.iter().filter(|n| !is_non_config_env(n)).collect();
    assert!(
        unlisted.is_empty(),
        "used by the project, neither a configuration key nor in config::NON_CONFIG_ENV \
         (a server inheriting them would refuse to start): {unlisted:?}"
    );
    assert!(others.len() >= 10, "the scan found too little: {others:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let config_file = dir.path().join("empty.toml");
    std::fs::write(&config_file, "").expect("write");
    let mut cmd = fanout(&["serve"]);
    for name in &others {
        if name == "FANOUT_CONFIG" {
            cmd.env(name, &config_file);
        } else {
            cmd.env(name, "1");
        }
    }
    cmd.env("FANOUT_LISTEN", "127.0.0.1:0")
        .env("FANOUT_DATA_DIR", dir.path().join("data"))
        .env("FANOUT_JWT_SECRET", SECRET);
    let mut child = cmd.spawn().expect("spawn");
    let url = listening_url(&mut child).await;
    wait_status(&url, "/readyz", 200).await;
    println!(
        "serve started and ready with {} variables set: {others:?}",
        others.len()
    );
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// The URL in the first stdout line of a starting process; panics with its
/// stderr if it exits first.
async fn listening_url(child: &mut tokio::process::Child) -> String {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await;
    let line = match line {
        Ok(Ok(Some(l))) => l,
        other => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
            }
            panic!("no listening line ({other:?}); stderr:\n{err}");
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned()
}

async fn get(url: &str, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::Client::new()
        .get(format!("{url}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.unwrap_or_default()))
}

/// Waits until `path` answers `status`; returns the body.
async fn wait_status(url: &str, path: &str, status: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = get(url, path).await;
        if let Some((s, body)) = &got {
            if *s == status {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url}{path} did not answer {status} within {WAIT:?} (last: {got:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A counter or gauge from a `/metrics` page (0 when absent).
async fn metric(url: &str, name: &str) -> f64 {
    let (_, text) = get(url, "/metrics").await.expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn broker_up(kind: BackendKind) -> bool {
    let (name, port) = match kind {
        BackendKind::Rabbitmq => ("RabbitMQ", 5672),
        _ => ("Redis", 6379),
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(_) => true,
        Err(e) => {
            common::skip_or_fail(name, &e.to_string());
            false
        }
    }
}

/// One worker and one gateway on `kind`, every gateway with server id
/// `{namespace}-gw` (so a second one started collides), in a namespace
/// the CI's leftover sweep knows (`t` and 12 hex digits).
async fn fleet(
    kind: BackendKind,
    db: &common::TestDb,
    log_dir: &Path,
    env: &[(&str, &str)],
) -> (Fleet, String) {
    let namespace = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut all = vec![("FANOUT_SERVER_ID".to_owned(), format!("{namespace}-gw"))];
    all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let fleet = Fleet::start(
        FleetSpec {
            binary: bin(),
            backend: kind,
            namespace: namespace.clone(),
            database_url: db.url.clone(),
            jwt_secret: SECRET.to_owned(),
            env: all,
            log_dir: log_dir.to_owned(),
        },
        1,
        1,
    )
    .await
    .expect("fleet starts");
    (fleet, namespace)
}

async fn purge(kind: BackendKind, namespace: &str) {
    let mut cmd = fanout(&["purge-namespace", "--yes"]);
    cmd.env("FANOUT_BACKEND", fanout_bench::procs::backend_name(kind))
        .env("FANOUT_NAMESPACE", namespace);
    let _ = run(cmd).await;
}

fn token(user: &str) -> String {
    Tokens::new(SECRET.as_bytes())
        .mint(user, 600)
        .expect("mint")
}

async fn connect(url: &str, user: &str) -> Client {
    Client::connect(url, json!({ "token": token(user) }))
        .await
        .expect("connect")
}

async fn send(c: &Client, to: &str, content: &str) {
    let ack = c
        .call(
            "sendMessage",
            &json!({ "to": to, "content": content }),
            WAIT,
        )
        .await
        .expect("ack");
    assert_eq!(ack["ok"], json!(true), "send refused: {ack}");
}

/// The next MESSAGE_RECEIVE's content on `c`.
async fn received(c: &Client) -> String {
    loop {
        let e = c.next_event(WAIT).await.expect("an event in time");
        if e.name == "MESSAGE_RECEIVE" {
            return e.data["content"].as_str().unwrap_or_default().to_owned();
        }
    }
}

fn log_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Worker metrics under load, then a second gateway with the same id.
async fn worker_metrics_and_duplicate_id(kind: BackendKind) {
    if !broker_up(kind) {
        return;
    }
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    let logs = tempfile::tempdir().expect("tempdir");
    // A short liveness TTL on Redis: the takeover below needs no more.
    let (mut fleet, namespace) = fleet(
        kind,
        &db,
        logs.path(),
        &[
            ("FANOUT_REDIS__LIVENESS_TTL_MS", "2000"),
            ("FANOUT_LIMITS__MESSAGES_PER_SECOND", "10000"),
            ("FANOUT_LIMITS__MESSAGE_BURST", "10000"),
        ],
    )
    .await;
    let gateway = fleet.urls()[0].clone();
    let worker = fleet.worker_urls()[0].clone();
    assert_ne!(gateway, worker, "the worker listens on a port of its own");
    wait_status(&worker, "/healthz", 200).await;
    let ready = wait_status(&worker, "/readyz", 200).await;
    assert!(ready.contains("\"databaseReady\":true"), "{ready}");

    // messages_stored rises with the load, as the worker reports it.
    let alice = connect(&gateway, "alice").await;
    let bob = connect(&gateway, "bob").await;
    let mut seen = vec![metric(&worker, "fanout_messages_stored_total").await];
    for round in 1..=4 {
        for i in 0..50 {
            send(&alice, "bob", &format!("r{round} m{i}")).await;
        }
        let expected = seen[0] + f64::from(round * 50);
        let deadline = Instant::now() + WAIT;
        let mut now = metric(&worker, "fanout_messages_stored_total").await;
        while now < expected {
            assert!(
                Instant::now() < deadline,
                "worker's messages_stored stuck at {now} (expected {expected})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            now = metric(&worker, "fanout_messages_stored_total").await;
        }
        seen.push(now);
    }
    for _ in 0..200 {
        received(&bob).await;
    }
    println!("{kind:?}: worker fanout_messages_stored_total after each 50 sends: {seen:?}");
    assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
    let page = get(&worker, "/metrics").await.expect("metrics").1;
    for name in ["fanout_worker_retries_total", "fanout_dead_lettered_total"] {
        assert!(page.contains(name), "worker /metrics lacks {name}");
    }
    let gw_page = get(&gateway, "/metrics").await.expect("metrics").1;
    assert!(
        gw_page.contains("fanout_backend_"),
        "the backend's own counters are exported:\n{gw_page}"
    );

    // A second gateway with the live id refuses to start; the first stays
    // ready and keeps delivering.
    let started = Instant::now();
    let second = fleet.spawn(Role::Gateway).await;
    assert!(second.is_err(), "a second gateway with a live id started");
    let log = log_of(logs.path(), "gateway-1");
    assert!(
        log.contains("held by another live gateway") && log.contains("FANOUT_SERVER_ID"),
        "the refusal must say why and what to do:\n{log}"
    );
    println!(
        "{kind:?}: second gateway with the same id refused in {:?}",
        started.elapsed()
    );
    wait_status(&gateway, "/readyz", 200).await;
    send(&alice, "bob", "after the refusal").await;
    assert_eq!(received(&bob).await, "after the refusal");

    if kind == BackendKind::Redis {
        takeover_leaves_readiness(&mut fleet, logs.path(), &gateway, &namespace).await;
    }
    alice.close().await;
    bob.close().await;
    fleet.stop().await;
    purge(kind, &namespace).await;
    db.drop_db().await;
}

/// Redis: gateway A paused and its subscriber connection cut (a network
/// blip at the wrong moment): a new process takes the id, and A, once it
/// runs again, finds the id taken, logs an error and leaves readiness.
async fn takeover_leaves_readiness(fleet: &mut Fleet, logs: &Path, a_url: &str, ns: &str) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let a_pid = fleet.pids(Role::Gateway)[0];
    let pid = Pid::from_raw(i32::try_from(a_pid).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let killed = kill_redis_subscribers(ns);
    let b = fleet.spawn(Role::Gateway).await;
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    assert!(killed > 0, "no subscriber connection found to cut");
    let b = b.expect("with the first gateway's subscriber gone, the id is free");
    let b_url = fleet.nodes[b].url.clone().expect("url");
    let body = wait_status(a_url, "/readyz", 503).await;
    assert!(body.contains("another process"), "{body}");
    let log = log_of(logs, "gateway-0");
    assert!(
        log.contains("ERROR") && log.contains("registered by another process"),
        "the first gateway must say so at error level:\n{log}"
    );
    wait_status(&b_url, "/readyz", 200).await;
    println!("Redis: taken-over gateway left readiness: {body}");
}

/// Kills the Redis subscriber connections of namespace `ns`'s gateways
/// (named `{ns}:sub:{server}`).
fn kill_redis_subscribers(ns: &str) -> usize {
    let list = std::process::Command::new("redis-cli")
        .args(["CLIENT", "LIST"])
        .output()
        .expect("redis-cli");
    let mut killed = 0;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .map(str::to_owned)
        };
        let (Some(id), Some(name)) = (field("id="), field("name=")) else {
            continue;
        };
        if name.starts_with(&format!("{ns}:sub:")) {
            let _ = std::process::Command::new("redis-cli")
                .args(["CLIENT", "KILL", "ID", &id])
                .output();
            killed += 1;
        }
    }
    killed
}

common::backend_tests!(worker_metrics_and_duplicate_id {
    redis_worker_metrics_and_duplicate_server_id: Redis,
    rabbitmq_worker_metrics_and_duplicate_server_id: Rabbitmq,
});

/// Runs `rabbitmqctl ARGS`; panics on failure.
fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Denies `guest` the right to declare one queue name while it lives;
/// every other name keeps its rights, so other tests on this broker are
/// untouched.
struct DenyDeclare;

impl DenyDeclare {
    fn new(queue: &str) -> Self {
        let escaped = queue.replace('.', "\\.");
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            "guest",
            &format!("^(?!{escaped}$).*"),
            ".*",
            ".*",
        ]);
        DenyDeclare
    }
}

impl Drop for DenyDeclare {
    fn drop(&mut self) {
        rabbitmqctl(&["set_permissions", "-p", "/", "guest", ".*", ".*", ".*"]);
    }
}

/// A gateway whose queue was deleted and cannot be declared again for 40 s
/// (longer than the ten tries, about 31 s, it used to give up after): it
/// answers `/readyz` 503 the whole time, and once the queue can be
/// declared it is ready again and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_reattach_never_gives_up() {
    if !broker_up(BackendKind::Rabbitmq) {
        return;
    }
    if let Err(e) = std::process::Command::new("rabbitmqctl")
        .arg("list_permissions")
        .output()
        .map_err(|e| e.to_string())
        .and_then(|o| {
            o.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
        })
    {
        common::skip_or_fail("rabbitmqctl", &e);
        return;
    }
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let (mut fleet, namespace) = fleet(BackendKind::Rabbitmq, &db, logs.path(), &[]).await;
    let gateway = fleet.urls()[0].clone();
    let queue = format!("{namespace}.gw.{namespace}-gw");
    let alice = connect(&gateway, "alice").await;
    let bob = connect(&gateway, "bob").await;
    send(&alice, "bob", "before").await;
    assert_eq!(received(&bob).await, "before");

    let deny = DenyDeclare::new(&queue);
    rabbitmqctl(&["delete_queue", &queue]);
    let lost = Instant::now();
    let body = wait_status(&gateway, "/readyz", 503).await;
    assert!(body.contains("was lost"), "{body}");
    let mut samples = 0;
    while lost.elapsed() < Duration::from_secs(40) {
        let (status, body) = get(&gateway, "/readyz").await.expect("readyz");
        assert_eq!(status, 503, "ready while its queue is gone: {body}");
        samples += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(deny);
    let restored = Instant::now();
    wait_status(&gateway, "/readyz", 200).await;
    let back = restored.elapsed();
    send(&alice, "bob", "after").await;
    assert_eq!(received(&bob).await, "after");
    let log = log_of(logs.path(), "gateway-0");
    assert!(
        log.contains("declared it again"),
        "the gateway says it recovered:\n{log}"
    );
    println!(
        "RabbitMQ: /readyz 503 in all {samples} samples over 40 s without its queue; \
         ready again {back:?} after the queue could be declared"
    );
    alice.close().await;
    bob.close().await;
    fleet.stop().await;
    purge(BackendKind::Rabbitmq, &namespace).await;
    db.drop_db().await;
}

/// `rabbitmqctl -q --no-table-headers ARGS` output lines, split on tabs.
fn rabbitmqctl_rows(args: &[&str]) -> Vec<Vec<String>> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "--no-table-headers"])
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// Closes, on the broker, the connection that owns exclusive queue
/// `queue`; returns whether it found one.
fn close_queue_owner(queue: &str) -> bool {
    let owner = rabbitmqctl_rows(&["list_queues", "name", "owner_pid"])
        .into_iter()
        .find(|r| r.first().is_some_and(|n| n == queue))
        .and_then(|r| r.get(1).cloned());
    let Some(owner) = owner else { return false };
    rabbitmqctl(&["close_connection", &owner, "ops test: take-over"]);
    true
}

/// RabbitMQ: gateway A paused while the broker closes its connection (its
/// exclusive queue goes with it); B registers the id; A, resumed, finds
/// the queue held by B when it re-declares it, logs an error and leaves
/// readiness for good while B stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_taken_over_gateway_leaves_readiness() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if !broker_up(BackendKind::Rabbitmq) {
        return;
    }
    let Some(db) = common::TestDb::create().await else {
        return;
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let (mut fleet, namespace) = fleet(BackendKind::Rabbitmq, &db, logs.path(), &[]).await;
    let a_url = fleet.urls()[0].clone();
    let queue = format!("{namespace}.gw.{namespace}-gw");
    let pid = Pid::from_raw(i32::try_from(fleet.pids(Role::Gateway)[0]).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let closed = close_queue_owner(&queue);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rabbitmqctl_rows(&["list_queues", "name"])
        .iter()
        .any(|r| r.first() == Some(&queue))
    {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = fleet.spawn(Role::Gateway).await;
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    assert!(closed, "no connection owned {queue}");
    let b = b.expect("with the first gateway's queue gone, the id is free");
    let b_url = fleet.nodes[b].url.clone().expect("url");
    // First 503 for the reconnect, then for good for the lost id.
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let body = wait_status(&a_url, "/readyz", 503).await;
        if body.contains("another process") {
            break body;
        }
        assert!(Instant::now() < deadline, "still not the take-over: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = log_of(logs.path(), "gateway-0");
    assert!(
        log.contains("ERROR") && log.contains("registered by another process"),
        "the first gateway must say so at error level:\n{log}"
    );
    wait_status(&b_url, "/readyz", 200).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = get(&a_url, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "a taken-over gateway stays out of readiness");
    println!("RabbitMQ: taken-over gateway left readiness: {body}");
    fleet.stop().await;
    purge(BackendKind::Rabbitmq, &namespace).await;
    db.drop_db().await;
}
