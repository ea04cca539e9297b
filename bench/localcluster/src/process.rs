//! What every local cluster's nodes share: a base port no other process
//! uses (lock files), and a watchdog that ties each node to this process.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ClusterError;

/// What runs each node: the server (the watchdog's arguments) under a
/// `bash` watchdog whose stdin is a pipe whose only write end this process
/// holds (std opens it close-on-exec) until it ends, however it ends, or
/// until the cluster is stopped. EOF means the process is gone (a pid
/// check would be fooled by a zombie or a reused pid) or the cluster was
/// stopped: then kill -9 the node and remove its directory (and the
/// cluster's, when it is the last). A node killed on purpose just ends its
/// watchdog, its files kept for a restart.
const WATCHDOG: &str = r#"
"$@" </dev/null &
node=$!
while kill -0 "$node" 2>/dev/null; do
    read -r -t 0.5 _
    if [ $? -le 128 ]; then
        kill -9 "$node" 2>/dev/null
        wait "$node" 2>/dev/null
        rm -rf "$NODE_DIR"
        rmdir "$CLUSTER_DIR" 2>/dev/null
        exit 0
    fi
done
exit 0
"#;

/// How long stopped watchdogs get to kill their nodes before the nodes are
/// killed from here.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `Ok` when `program --version` runs, so a machine without the broker
/// skips instead of failing.
pub(crate) fn installed(program: &str, hint: &str) -> Result<(), ClusterError> {
    match Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(ClusterError::Missing(format!(
            "`{program} --version` exited with {s}"
        ))),
        Err(e) => Err(ClusterError::Missing(format!(
            "cannot run {program} ({e}): {hint}"
        ))),
    }
}

/// `{temp}/{name}-{base}.lock`: held (flock) by the process whose cluster
/// runs on `base`; scripts that manage clusters by hand check it too.
pub(crate) fn lock_path(name: &str, base: u16) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-{base}.lock"))
}

/// The first base among `bases` whose lock this process gets and whose
/// `ports` are all free; the lock stays held (the returned file) so no
/// other process takes the base while the cluster runs.
pub(crate) fn take_base(
    name: &str,
    bases: impl IntoIterator<Item = u16>,
    ports: impl Fn(u16) -> Vec<u16>,
) -> Option<(u16, File)> {
    for base in bases {
        let Ok(lock) = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path(name, base))
        else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        let free = ports(base)
            .into_iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return Some((base, lock));
        }
    }
    None
}

/// Starts `command` (program and arguments) in `node_dir` under a
/// watchdog, so the node cannot outlive this process; `name` is what `ps`
/// shows for the watchdog.
pub(crate) fn spawn_watched<I, S>(
    name: &str,
    command: I,
    node_dir: &Path,
    cluster_dir: &Path,
) -> Result<Child, ClusterError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new("bash")
        .arg("-c")
        .arg(WATCHDOG)
        .arg(name)
        .args(command)
        .env("NODE_DIR", node_dir)
        .env("CLUSTER_DIR", cluster_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            let why = format!("cannot start bash for {name} ({e})");
            if e.kind() == ErrorKind::NotFound {
                ClusterError::Missing(why)
            } else {
                ClusterError::Failed(why)
            }
        })
}

/// Watchdogs told to stop (their pipe closed), by port, until they have
/// killed their nodes and ended.
#[derive(Debug)]
pub(crate) struct Stopping {
    left: Vec<(u16, Child)>,
    since: Instant,
}

impl Stopping {
    /// Closes every watchdog's pipe: each kills its node.
    pub(crate) fn new(watchdogs: impl IntoIterator<Item = (u16, Child)>) -> Self {
        let left = watchdogs
            .into_iter()
            .map(|(port, mut child)| {
                drop(child.stdin.take());
                (port, child)
            })
            .collect();
        Self {
            left,
            since: Instant::now(),
        }
    }

    /// Reaps the watchdogs that ended; `true` once none is left. After
    /// [`STOP_GRACE`] the rest and their nodes (`pids`, by port) are killed
    /// from here, so a stopped cluster never keeps its ports.
    pub(crate) fn poll(&mut self, pids: &HashMap<u16, u32>) -> bool {
        self.left
            .retain_mut(|(_, child)| matches!(child.try_wait(), Ok(None)));
        if self.left.is_empty() {
            return true;
        }
        if self.since.elapsed() < STOP_GRACE {
            return false;
        }
        for (port, mut child) in self.left.drain(..) {
            if let Some(pid) = pids.get(&port) {
                let _ = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        true
    }
}
