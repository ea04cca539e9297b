//! The services a fault run acts on: a Redis server of its own, the shared
//! RabbitMQ through `rabbitmqctl`, and the few HTTP and RESP calls the run
//! makes. No client crate for either: one request each, a few lines of
//! framing, and the binary stays free of an HTTP client.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::FaultError;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A free loopback port (bound, read, released: another process could
/// take it in between, which a start then reports).
pub fn free_port() -> Result<u16, FaultError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| FaultError::Io {
            what: "finding a free port".into(),
            source,
        })
}

/// `redis-server` on a port and directory of its own, with an append-only
/// file: the Redis backend's incoming streams survive a restart only with
/// one (`docs/backends/redis.md`), and restarting the machine's shared
/// Redis would disturb everyone else.
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    binary: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts it in `dir` (created) and waits until it answers `PING`.
    pub async fn start(binary: &Path, dir: &Path) -> Result<RedisServer, FaultError> {
        std::fs::create_dir_all(dir).map_err(|source| FaultError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut server = RedisServer {
            port: free_port()?,
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> Result<(), FaultError> {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| FaultError::Io {
                what: format!("starting {}", self.binary.display()),
                source,
            })?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(reply) = resp_call(self.port, &[&["PING"]]).await {
                if reply.starts_with("+PONG") {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(FaultError::Service(format!(
                    "redis-server on port {} did not answer PING within 20 s; see {}",
                    self.port,
                    self.dir.join("redis.log").display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A clean stop (SIGTERM: Redis flushes its append-only file and
    /// exits), waiting for the process to end.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Stops it and deletes its data files (its log stays, with the
    /// processes' logs).
    pub async fn discard(mut self) {
        self.stop().await;
        for name in ["appendonlydir", "dump.rdb"] {
            let path = self.dir.join(name);
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }

    /// Stops it cleanly, waits `down`, and starts it again on the same port
    /// and files.
    pub async fn restart(&mut self, down: Duration) -> Result<(), FaultError> {
        self.stop().await;
        tokio::time::sleep(down).await;
        self.spawn().await
    }

    /// `CLIENT KILL ADDR 127.0.0.1:{port}` for each of `ports` (the client
    /// side's ports); how many were killed.
    pub async fn kill_addrs(&self, ports: &[u16]) -> Result<u64, FaultError> {
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let commands: Vec<[&str; 4]> = addrs
            .iter()
            .map(|a| ["CLIENT", "KILL", "ADDR", a.as_str()])
            .collect();
        let refs: Vec<&[&str]> = commands.iter().map(|c| &c[..]).collect();
        let reply = resp_call(self.port, &refs).await?;
        Ok(reply
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum())
    }

    /// `CLIENT KILL` of every client connection but the caller's: command
    /// connections and Pub/Sub subscribers alike. Only the fleet uses this
    /// server, so that is every broker connection of the deployment.
    /// Returns how many were killed.
    pub async fn kill_clients(&self) -> Result<u64, FaultError> {
        let reply = resp_call(
            self.port,
            &[
                &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
                &["CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "yes"],
            ],
        )
        .await?;
        // Two integer replies, ":n\r\n" each.
        Ok(reply
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum())
    }
}

/// Sends `commands` as RESP arrays on one connection and returns the raw
/// replies once one line per command arrived (enough for the simple,
/// integer and error replies used here).
async fn resp_call(port: u16, commands: &[&[&str]]) -> Result<String, FaultError> {
    let io = |what: &str| {
        let what = format!("{what} redis on port {port}");
        move |source| FaultError::Io { what, source }
    };
    let call = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(io("connecting to"))?;
        let mut out = String::new();
        for args in commands {
            out.push_str(&format!("*{}\r\n", args.len()));
            for a in *args {
                out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
        }
        tcp.write_all(out.as_bytes())
            .await
            .map_err(io("writing to"))?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 1024];
        while reply.iter().filter(|b| **b == b'\n').count() < commands.len() {
            let n = tcp.read(&mut buf).await.map_err(io("reading from"))?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| FaultError::Service(format!("redis on port {port} did not answer")))?
}

/// Runs `rabbitmqctl` with `args`, bounded by `timeout`; its stdout.
pub async fn rabbitmqctl(
    binary: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<String, FaultError> {
    let out = tokio::time::timeout(
        timeout,
        Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        FaultError::Service(format!(
            "rabbitmqctl {} did not finish within {timeout:?}",
            args.join(" ")
        ))
    })?
    .map_err(|source| FaultError::Io {
        what: format!("running {}", binary.display()),
        source,
    })?;
    if !out.status.success() {
        return Err(FaultError::Service(format!(
            "rabbitmqctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The broker's pids of the connections of `namespace` (the backend names
/// them `fanout {namespace} {instance} pub|sub`).
pub async fn rabbitmq_connections(
    binary: &Path,
    namespace: &str,
) -> Result<Vec<String>, FaultError> {
    let listing = rabbitmqctl(
        binary,
        &["list_connections", "-q", "pid", "client_properties"],
        Duration::from_secs(30),
    )
    .await?;
    let marker = format!("\"fanout {namespace} ");
    Ok(listing
        .lines()
        .filter(|l| l.contains(&marker))
        .filter_map(|l| l.split('\t').next())
        // `<rabbit@host.1.2.3>`: nothing that could break out of the
        // Erlang string in `rabbitmq_close`.
        .filter(|p| {
            p.starts_with('<')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"<>@._-".contains(&b))
        })
        .map(str::to_owned)
        .collect())
}

/// Closes the connections `pids` from the broker's side. The issue asks
/// for `close_all_connections`; on a broker shared with other work that
/// would cut everyone, so the fault is the same for the deployment but
/// scoped to it. One `eval` for all of them, so they go at the same
/// instant (each `rabbitmqctl close_connection` starts an Erlang VM:
/// closing ten one after the other spreads the fault over seconds).
pub async fn rabbitmq_close(binary: &Path, pids: &[String]) -> Result<(), FaultError> {
    let list: Vec<String> = pids.iter().map(|p| format!("\"{p}\"")).collect();
    let expr = format!(
        "[rabbit_networking:close_connection(rabbit_misc:string_to_pid(P), \"fanout fault run: connection killed\") || P <- [{}]].",
        list.join(",")
    );
    rabbitmqctl(binary, &["eval", &expr], Duration::from_secs(30)).await?;
    Ok(())
}

/// Makes sure the shared RabbitMQ application is started again, whatever
/// happens to the run that stopped it (error, panic): the rest of the
/// machine depends on it.
#[derive(Debug)]
pub struct RabbitStopped {
    binary: PathBuf,
    started: bool,
}

impl RabbitStopped {
    /// `rabbitmqctl stop_app`; the returned guard starts it again.
    pub async fn stop(binary: &Path) -> Result<RabbitStopped, FaultError> {
        let guard = RabbitStopped {
            binary: binary.to_owned(),
            started: false,
        };
        rabbitmqctl(binary, &["stop_app"], Duration::from_secs(60)).await?;
        Ok(guard)
    }

    /// `rabbitmqctl start_app`, then waits until the broker accepts AMQP
    /// connections again.
    pub async fn start(mut self) -> Result<(), FaultError> {
        rabbitmqctl(&self.binary, &["start_app"], Duration::from_secs(120)).await?;
        self.started = true;
        rabbitmqctl(
            &self.binary,
            &["await_startup", "--timeout", "120"],
            Duration::from_secs(125),
        )
        .await?;
        Ok(())
    }
}

impl Drop for RabbitStopped {
    fn drop(&mut self) {
        if !self.started {
            // Blocking on purpose: this runs on an error path or a panic,
            // and the broker must be back before anyone goes on.
            tracing::warn!("starting the RabbitMQ application again after a failed fault run");
            let _ = std::process::Command::new(&self.binary)
                .arg("start_app")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One HTTP request to a gateway; status and body.
pub async fn http(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String), FaultError> {
    let failed = |why: String| FaultError::Service(format!("{method} {base}{path}: {why}"));
    let method =
        reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| failed(e.to_string()))?;
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .timeout(CALL_TIMEOUT);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|e| failed(e.to_string()))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| failed(e.to_string()))?;
    Ok((status, text))
}

/// The sum of the samples of metric `name` (without labels or with) in a
/// Prometheus text exposition; 0 when it has none.
pub fn metric_sum(exposition: &str, name: &str) -> f64 {
    metric_total(exposition, name).unwrap_or(0.0)
}

/// [`metric_sum`], but `None` when the exposition has no sample of `name`
/// (a build that does not export it).
pub fn metric_total(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name || metric.ends_with(&format!("_{name}")))
                .then(|| value.parse::<f64>().ok())?
        })
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_metric_samples() {
        let text = "# HELP x\nfanout_duplicates_dropped_total 3\nduplicates_dropped_total{a=\"b\"} 2\nother_total 9\n";
        assert_eq!(metric_sum(text, "duplicates_dropped_total"), 5.0);
        assert_eq!(metric_sum(text, "missing_total"), 0.0);
    }

    #[test]
    fn reads_an_unlabelled_metric() {
        let text = "# HELP fanout_sessions Live Socket.IO sessions on this gateway\n\
                    # TYPE fanout_sessions gauge\n\
                    fanout_sessions_total 9\n\
                    fanout_sessions 100\n";
        assert_eq!(metric_total(text, "fanout_sessions"), Some(100.0));
        assert_eq!(metric_total(text, "fanout_bound_keys"), None);
    }
}
