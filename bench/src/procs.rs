//! Real gateway and worker processes of this project on loopback, for the
//! benchmark and the fault matrix: started from the `fanout` binary with a
//! configuration in the environment, watched for readiness, stopped
//! gracefully or killed with SIGKILL, and measured from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use fanout::config::BackendKind;

/// Why a process could not be started or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// Spawning or waiting failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A process exited or did not become ready; its log tells why.
    #[error("{0}")]
    NotReady(String),
}

/// What a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `fanout gateway`.
    Gateway,
    /// `fanout worker`.
    Worker,
    /// `fanout serve` (memory backend: gateway and worker in one).
    Serve,
}

impl Role {
    fn command(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Worker => "worker",
            Role::Serve => "serve",
        }
    }
}

/// How to start the processes of one deployment.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// The `fanout` binary.
    pub binary: PathBuf,
    /// The backend every process uses.
    pub backend: BackendKind,
    /// A namespace of its own on the broker.
    pub namespace: String,
    /// `FANOUT_DATABASE_URL`.
    pub database_url: String,
    /// `FANOUT_JWT_SECRET`.
    pub jwt_secret: String,
    /// Further `FANOUT_*` settings, applied to every process.
    pub env: Vec<(String, String)>,
    /// Where each process's stdout and stderr go.
    pub log_dir: PathBuf,
}

/// One running (or killed) process.
#[derive(Debug)]
pub struct Node {
    /// What it is.
    pub role: Role,
    /// Its name in logs and reports (`gateway-0`).
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Base URL: a gateway's, or a worker's health and metrics endpoint.
    pub url: Option<String>,
    child: Child,
    alive: bool,
}

/// The processes of one deployment.
#[derive(Debug)]
pub struct Fleet {
    spec: FleetSpec,
    /// Settings for the processes of one role only, applied after
    /// `spec.env`.
    role_env: Vec<(Role, String, String)>,
    /// Every process started, in order, killed ones included.
    pub nodes: Vec<Node>,
}

impl Fleet {
    /// Starts `gateways` gateways and `workers` workers (for the memory
    /// backend, one `serve` process whatever the counts) and waits until
    /// every gateway answers `/readyz`.
    pub async fn start(
        spec: FleetSpec,
        gateways: usize,
        workers: usize,
    ) -> Result<Fleet, ProcError> {
        Self::start_with_role_env(spec, gateways, workers, Vec::new()).await
    }

    /// As [`Fleet::start`], with further `FANOUT_*` settings `(role, key,
    /// value)` for the processes of one role only (the fault matrix gives
    /// workers a database address of their own).
    pub async fn start_with_role_env(
        spec: FleetSpec,
        gateways: usize,
        workers: usize,
        role_env: Vec<(Role, String, String)>,
    ) -> Result<Fleet, ProcError> {
        std::fs::create_dir_all(&spec.log_dir).map_err(|source| ProcError::Io {
            what: format!("creating {}", spec.log_dir.display()),
            source,
        })?;
        let mut fleet = Fleet {
            spec,
            role_env,
            nodes: Vec::new(),
        };
        let started = async {
            if fleet.spec.backend == BackendKind::Memory {
                fleet.spawn(Role::Serve).await?;
            } else {
                // Workers first: they create the incoming topology the
                // gateways publish to.
                for _ in 0..workers {
                    fleet.spawn(Role::Worker).await?;
                }
                for _ in 0..gateways {
                    fleet.spawn(Role::Gateway).await?;
                }
            }
            Ok::<(), ProcError>(())
        }
        .await;
        if let Err(e) = started {
            fleet.stop().await;
            return Err(e);
        }
        Ok(fleet)
    }

    /// Starts one more process of `role`; returns its index in `nodes`.
    pub async fn spawn(&mut self, role: Role) -> Result<usize, ProcError> {
        let n = self.nodes.iter().filter(|n| n.role == role).count();
        let name = format!("{}-{n}", role.command());
        let log = self.spec.log_dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).map_err(|source| ProcError::Io {
            what: format!("creating {}", log.display()),
            source,
        })?;
        let mut cmd = Command::new(&self.spec.binary);
        cmd.arg(role.command())
            .env("FANOUT_BACKEND", backend_name(self.spec.backend))
            .env("FANOUT_NAMESPACE", &self.spec.namespace)
            .env("FANOUT_DATABASE_URL", &self.spec.database_url)
            .env("FANOUT_JWT_SECRET", &self.spec.jwt_secret)
            .env("FANOUT_LISTEN", "127.0.0.1:0")
            .env(
                "FANOUT_DATA_DIR",
                self.spec.log_dir.join(format!("{name}.data")),
            )
            .env(
                "FANOUT_SERVER_ID",
                format!("{}-{name}", self.spec.namespace),
            )
            .env_remove("FANOUT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        for (_, k, v) in self.role_env.iter().filter(|(r, _, _)| *r == role) {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|source| ProcError::Io {
            what: format!("starting {} {}", self.spec.binary.display(), role.command()),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        // Each process, workers included, listens on a port of its own
        // (FANOUT_LISTEN=127.0.0.1:0 above) and says which once connected
        // to the broker and the database. Gateways are then waited for
        // until ready; a worker's readiness is its own business (a fault
        // scenario may start one while the database is failing).
        let url = read_url(&mut child, &name, &log).await?;
        if role != Role::Worker {
            wait_ready(&url, &name, &log).await?;
        }
        let url = Some(url);
        self.nodes.push(Node {
            role,
            name,
            pid,
            url,
            child,
            alive: true,
        });
        Ok(self.nodes.len() - 1)
    }

    /// Base URLs of the live gateways (or the `serve` process).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.alive && n.role != Role::Worker)
            .filter_map(|n| n.url.clone())
            .collect()
    }

    /// Base URLs of the live workers' health and metrics endpoints.
    pub fn worker_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.alive && n.role == Role::Worker)
            .filter_map(|n| n.url.clone())
            .collect()
    }

    /// Pids of the live processes of `role`.
    pub fn pids(&self, role: Role) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| n.alive && n.role == role)
            .map(|n| n.pid)
            .collect()
    }

    /// Index of the `i`-th live process of `role`.
    pub fn live(&self, role: Role, i: usize) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive && n.role == role)
            .nth(i)
            .map(|(idx, _)| idx)
    }

    /// `kill -9`: no shutdown, no cleanup, as a crash.
    pub async fn kill9(&mut self, idx: usize) {
        if let Some(node) = self.nodes.get_mut(idx) {
            let _ = node.child.start_kill();
            let _ = node.child.wait().await;
            node.alive = false;
        }
    }

    /// SIGTERM to every live process (gateways first, so their sessions
    /// close before the workers go), then SIGKILL after `grace`.
    pub async fn stop(&mut self) {
        for role in [Role::Gateway, Role::Serve, Role::Worker] {
            let grace = Duration::from_secs(15);
            for node in self.nodes.iter_mut().filter(|n| n.alive && n.role == role) {
                if let Ok(pid) = i32::try_from(node.pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
            for node in self.nodes.iter_mut().filter(|n| n.alive && n.role == role) {
                if tokio::time::timeout(grace, node.child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(process = %node.name, "did not stop within {grace:?}; killing it");
                    let _ = node.child.start_kill();
                    let _ = node.child.wait().await;
                }
                node.alive = false;
            }
        }
    }

    /// Whether every process still runs (none crashed on its own).
    pub fn check_alive(&mut self) -> Result<(), ProcError> {
        for node in self.nodes.iter_mut().filter(|n| n.alive) {
            if let Ok(Some(status)) = node.child.try_wait() {
                node.alive = false;
                return Err(ProcError::NotReady(format!(
                    "{} exited with {status}; see {}",
                    node.name,
                    self.spec
                        .log_dir
                        .join(format!("{}.log", node.name))
                        .display()
                )));
            }
        }
        Ok(())
    }
}

/// The configuration value of a backend kind.
pub fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Memory => "memory",
        BackendKind::Rabbitmq => "rabbitmq",
        BackendKind::Redis => "redis",
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A gateway prints `fanout: listening on http://ADDR as ID` once bound, a
/// worker `fanout: worker listening on http://ADDR`.
async fn read_url(child: &mut Child, name: &str, log: &Path) -> Result<String, ProcError> {
    let not_ready = |why: &str| ProcError::NotReady(format!("{name} {why}; see {}", log.display()));
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| not_ready("has no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| not_ready("did not start listening within 60 s"))?
        .map_err(|source| ProcError::Io {
            what: format!("reading {name}'s output"),
            source,
        })?
        .ok_or_else(|| not_ready("exited before listening"))?;
    let url = line
        .strip_prefix("fanout: listening on ")
        .or_else(|| line.strip_prefix("fanout: worker listening on "))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| not_ready(&format!("printed {line:?} instead of its address")))?
        .to_owned();
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(url)
}

async fn wait_ready(url: &str, name: &str, log: &Path) -> Result<(), ProcError> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if http_status(url, "/readyz").await == Some(200) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ProcError::NotReady(format!(
                "{name} at {url} was not ready within 60 s; see {}",
                log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn http_status(base: &str, path: &str) -> Option<u16> {
    let resp = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some(resp.status().as_u16())
}

/// CPU time and resident memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// User plus system CPU, in seconds.
    pub cpu_secs: f64,
    /// Resident set, in bytes.
    pub rss_bytes: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`; `None` once it is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_secs: ticks as f64 / clock_ticks(),
        rss_bytes: rss_kb * 1024,
    })
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map_or(100.0, |t| t as f64)
}

/// Pids of processes whose command line contains every one of `needles`
/// (the broker's and the database's, which this harness did not start).
pub fn find_pids(needles: &[&str]) -> Vec<u32> {
    find_pids_except(needles, &[])
}

/// [`find_pids`], without the processes whose command line contains any
/// of `except`.
pub fn find_pids_except(needles: &[&str], except: &[&str]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    needles.iter().all(|n| c.contains(n)) && !except.iter().any(|n| c.contains(n))
                })
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_secs >= 0.0);
        assert!(!find_pids(&["fanout"]).is_empty() || !find_pids(&[""]).is_empty());
    }
}
