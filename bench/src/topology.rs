//! What a benchmark run targets: a backend and, for a broker, its topology
//! (one node, or a cluster of its own that the run starts on loopback), so
//! that one run compares `rabbitmq`, `rabbitmq-cluster`, `redis` and
//! `redis-cluster` on the same workloads.

use std::fmt;
use std::str::FromStr;

use fanout::config::{BackendKind, Config};
use fanout_localcluster::rabbitmq::{amqp_port, RabbitCluster};
use fanout_localcluster::redis::RedisCluster;

/// A backend and its topology, named `memory`, `rabbitmq`,
/// `rabbitmq-cluster`, `redis` or `redis-cluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The backend.
    pub kind: BackendKind,
    /// A cluster the run starts (on loopback), instead of the configured
    /// single broker.
    pub cluster: bool,
}

impl Target {
    /// Every target, in the default run order.
    pub const ALL: [Target; 5] = [
        Target::single(BackendKind::Memory),
        Target::single(BackendKind::Rabbitmq),
        Target::single(BackendKind::Redis),
        Target {
            kind: BackendKind::Redis,
            cluster: true,
        },
        Target {
            kind: BackendKind::Rabbitmq,
            cluster: true,
        },
    ];

    /// The backend on one broker node (the configured one).
    pub const fn single(kind: BackendKind) -> Target {
        Target {
            kind,
            cluster: false,
        }
    }

    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match (self.kind, self.cluster) {
            (BackendKind::Memory, _) => "memory",
            (BackendKind::Rabbitmq, false) => "rabbitmq",
            (BackendKind::Rabbitmq, true) => "rabbitmq-cluster",
            (BackendKind::Redis, false) => "redis",
            (BackendKind::Redis, true) => "redis-cluster",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Target, String> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "unknown backend {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// A broker cluster a run started, and stops when it is done.
#[derive(Debug)]
pub enum Running {
    /// A 6-node Redis Cluster (3 primaries with a replica each).
    Redis(RedisCluster),
    /// A 3-node RabbitMQ cluster (`scripts/rabbitmq-cluster`).
    Rabbitmq(RabbitCluster),
}

impl Running {
    /// Starts the cluster `target` asks for; `None` for a single node.
    pub async fn start(target: Target) -> Result<Option<Running>, String> {
        match (target.kind, target.cluster) {
            (BackendKind::Redis, true) => RedisCluster::start()
                .await
                .map(|c| Some(Running::Redis(c)))
                .map_err(|e| format!("cannot start a local Redis Cluster: {e}")),
            (BackendKind::Rabbitmq, true) => RabbitCluster::start()
                .await
                .map(|c| Some(Running::Rabbitmq(c)))
                .map_err(|e| format!("cannot start a local RabbitMQ cluster: {e}")),
            (BackendKind::Memory, true) => Err(format!("{target}: memory has no cluster")),
            (_, false) => Ok(None),
        }
    }

    /// `base` pointed at this cluster.
    pub fn configure(&self, mut base: Config) -> Config {
        match self {
            Running::Redis(c) => {
                base.redis_url = c.seeds.clone();
                base.redis.cluster = true;
            }
            Running::Rabbitmq(c) => base.rabbitmq_url = c.url_list(),
        }
        base
    }

    /// The broker's nodes, named by port, with their processes: the
    /// report shows each node's CPU.
    pub fn nodes(&self) -> Vec<(String, u32)> {
        match self {
            Running::Redis(c) => c
                .node_pids()
                .into_iter()
                .map(|(port, pid)| (format!("redis:{port}"), pid))
                .collect(),
            // Blocks for a moment per node (the script asks `ss`); once per
            // run.
            Running::Rabbitmq(c) => c
                .node_pids()
                .into_iter()
                .map(|(n, pid)| (format!("rabbitmq:{}", amqp_port(n)), pid))
                .collect(),
        }
    }

    /// Stops every node.
    pub async fn stop(self) {
        match self {
            Running::Redis(c) => c.stop().await,
            Running::Rabbitmq(c) => c.stop().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in Target::ALL {
            assert_eq!(t.name().parse::<Target>(), Ok(t));
        }
        assert!("kafka".parse::<Target>().is_err());
    }
}
