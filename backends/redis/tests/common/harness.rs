//! The conformance harness of the Redis backend, on a standalone Redis or
//! on the private Redis Cluster of this test process: the same checks,
//! asserted the same way, only the topology differs.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fanout_backend::conformance::{eventually, Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_redis::{RedisBackend, RedisConfig};

/// `cluster`: on the cluster of `super::cluster`, in cluster mode.
pub struct Redis {
    pub cluster: bool,
}

impl Redis {
    async fn cluster(&self) -> Option<&'static super::cluster::RedisCluster> {
        if self.cluster {
            super::cluster::shared().await
        } else {
            None
        }
    }
}

#[async_trait]
impl Harness for Redis {
    async fn backend(&self, namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        let mut config = RedisConfig {
            partitions: s.partitions,
            ..super::config(namespace)
        };
        if let Some(cluster) = self.cluster().await {
            config.url = cluster.seeds.clone();
            config.cluster = true;
        }
        Arc::new(
            RedisBackend::connect(config)
                .await
                .expect("connect to Redis"),
        )
    }

    async fn available(&self) -> bool {
        if self.cluster {
            self.cluster().await.is_some()
        } else {
            super::available().await
        }
    }

    async fn clean_up(&self, namespace: &str) {
        match self.cluster().await {
            // Reported, not raised: clean-up must not mask the check's own
            // failure.
            Some(cluster) => {
                if let Err(e) = cluster.purge(namespace).await {
                    eprintln!("could not purge test namespace {namespace}: {e}");
                }
            }
            None => super::purge(namespace).await,
        }
    }

    /// Kills the namespace's subscriber connections (the only named ones,
    /// `{namespace}:sub:{server}`; on a cluster, on the node of their
    /// channel) with `CLIENT KILL`, as a restart or a network fault would.
    async fn sever(&self, namespace: &str) -> bool {
        let prefix = format!("name={namespace}:sub:");
        let cluster = self.cluster().await;
        eventually(
            Duration::from_secs(5),
            "a subscriber connection to kill",
            || {
                let prefix = prefix.clone();
                async move {
                    match cluster {
                        Some(c) => c.kill_clients(&prefix).await.expect("CLIENT KILL") > 0,
                        None => super::kill_clients(&prefix).await > 0,
                    }
                }
            },
        )
        .await;
        true
    }
}
