//! The Redis backend in cluster mode runs the whole conformance suite
//! against a private 6-node Redis Cluster (3 primaries, 3 replicas) that
//! this test process starts on loopback and stops when it exits
//! (`common::cluster`, from `fanout-localcluster`). The same checks as `conformance.rs`, asserted the
//! same way: only the topology differs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fanout_backend::conformance::{eventually, Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_redis::{RedisBackend, RedisConfig};

struct RedisCluster;

#[async_trait]
impl Harness for RedisCluster {
    async fn backend(&self, namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        let cluster = common::cluster::shared()
            .await
            .expect("available() said the cluster is up");
        let backend = RedisBackend::connect(RedisConfig {
            url: cluster.seeds.clone(),
            cluster: true,
            partitions: s.partitions,
            ..common::config(namespace)
        })
        .await
        .expect("connect to the Redis Cluster");
        Arc::new(backend)
    }

    async fn available(&self) -> bool {
        common::cluster::shared().await.is_some()
    }

    async fn clean_up(&self, namespace: &str) {
        if let Some(cluster) = common::cluster::shared().await {
            // Reported, not raised: clean-up must not mask the check's own
            // failure.
            if let Err(e) = cluster.purge(namespace).await {
                eprintln!("could not purge test namespace {namespace}: {e}");
            }
        }
    }

    /// Kills the namespace's subscriber connections (named
    /// `{namespace}:sub:{server}` on the node of their channel) with
    /// `CLIENT KILL`, as a node restart or a network fault would.
    async fn sever(&self, namespace: &str) -> bool {
        let Some(cluster) = common::cluster::shared().await else {
            return false;
        };
        let prefix = format!("name={namespace}:sub:");
        eventually(
            Duration::from_secs(5),
            "a subscriber connection to kill",
            || {
                let prefix = prefix.clone();
                async move { cluster.kill_clients(&prefix).await.expect("CLIENT KILL") > 0 }
            },
        )
        .await;
        true
    }
}

fanout_backend::conformance_tests!(RedisCluster);
