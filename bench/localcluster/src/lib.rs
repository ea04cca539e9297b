//! Broker clusters on loopback for the tests, the benchmark and the fault
//! matrix: a Redis Cluster of 3 primaries with a replica each
//! ([`redis::RedisCluster`]).
//!
//! Each broker has its own module; what they share is here and in the
//! private `process` module: the error type (so a caller tells "not
//! installed: skip" from "broken: fail" the same way for every broker),
//! the lock-file choice of a base port, and the watchdog that ties every
//! node to this process.

mod process;
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
