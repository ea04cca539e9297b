//! The three-node RabbitMQ cluster of the tests: `fanout-localcluster`'s
//! [`RabbitCluster`], one per test binary (or the one `.ci/run` started for
//! all of them, `FANOUT_RABBITMQ_CLUSTER_URLS`), and how tests share it.
//!
//! - Starting takes about 30 s, so every test of a binary shares one
//!   cluster ([`cluster`]). Tests that kill nodes take [`exclusive`] first.
//! - Without `rabbitmq-server` (or without the rights to run it as the
//!   `rabbitmq` user) the tests skip loudly, or fail when
//!   `FANOUT_TEST_REQUIRE_SERVICES=1`.

use std::time::{Duration, Instant};

use fanout_backend::conformance::skip_or_fail;
pub use fanout_localcluster::rabbitmq::RabbitCluster as Cluster;
use fanout_localcluster::ClusterError;

static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shared cluster, started on first use; `None` when it cannot run
/// here (after a loud skip line, or a panic under CI or when it is broken).
pub async fn cluster() -> Option<&'static Cluster> {
    match Cluster::shared().await {
        Ok(c) => Some(c),
        Err(ClusterError::Missing(why)) => {
            skip_or_fail("RabbitMQ cluster", &why);
            None
        }
        Err(e) => panic!("the RabbitMQ cluster: {e}"),
    }
}

/// Serialises the tests that kill, stop or measure nodes: they would
/// disturb each other on a shared cluster.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

/// Polls `cond` until it holds; how long that took. Panics after `within`.
pub async fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < within,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}
