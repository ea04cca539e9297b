//! Broker clusters on loopback for the tests, the benchmark and the fault
//! matrix: a Redis Cluster of 3 primaries with a replica each
//! ([`redis::RedisCluster`]) and a RabbitMQ cluster of 3 nodes
//! ([`rabbitmq::RabbitCluster`]).
//!
//! Each broker has its own module. What they share is the error type here,
//! so a caller tells "not installed: skip" from "broken: fail" the same way
//! for every broker. Redis nodes take any free base port and a watchdog
//! each (the private `process` module); RabbitMQ's node names and ports are
//! fixed by `scripts/rabbitmq-cluster`, so one cluster runs per machine,
//! behind a lock file, with one reaper process for all three nodes.

mod process;
pub mod rabbitmq;
pub mod redis;

/// Why a cluster could not be started or an operation on it failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The broker's server (or `bash`) is not installed: callers skip
    /// (tests, or fail when services are required).
    #[error("{0}")]
    Missing(String),
    /// It is installed but the cluster did not form, or a command failed: a
    /// broken setup, not a missing one.
    #[error("{0}")]
    Failed(String),
    /// The cluster did not reach the awaited state in time (for example no
    /// failover): a result the fault matrix records, not a broken harness.
    #[error("{0}")]
    Timeout(String),
}
