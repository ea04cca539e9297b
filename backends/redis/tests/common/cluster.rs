//! The private Redis Cluster of this test process (3 primaries, one
//! replica each, on loopback), from `fanout-localcluster`: how it starts,
//! and its admin operations, are documented there.

#![allow(dead_code)] // each test file uses a different part

pub use fanout_localcluster::redis::{ClusterError, RedisCluster};

/// The cluster of this test process, started by the first caller (the
/// others wait); `None` when `redis-server` is not installed, after a loud
/// skip line, and a panic instead under `FANOUT_TEST_REQUIRE_SERVICES=1`
/// (like `common::available`). Panics if `redis-server` is there but the
/// cluster cannot be formed: that is a broken setup, not a missing one.
pub async fn shared() -> Option<&'static RedisCluster> {
    match RedisCluster::shared().await {
        Ok(cluster) => Some(cluster),
        Err(ClusterError::Missing(why)) => {
            fanout_backend::conformance::skip_or_fail("Redis Cluster", &why);
            None
        }
        Err(why) => panic!("could not start the test Redis Cluster: {why}"),
    }
}

/// `redis://127.0.0.1:{port}`: one node, for tests that talk to one node
/// directly.
pub fn url_of(port: u16) -> String {
    RedisCluster::url_of(port)
}
