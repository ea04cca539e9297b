//! The Redis backend runs the whole conformance suite against a real Redis
//! (`FANOUT_REDIS_URL`, default `redis://127.0.0.1:6379`). Every check uses
//! fresh namespaces, whose keys the harness deletes once the check is over.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fanout_backend::conformance::{eventually, Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_redis::{RedisBackend, RedisConfig};

struct Redis;

#[async_trait]
impl Harness for Redis {
    async fn backend(&self, namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        let backend = RedisBackend::connect(RedisConfig {
            partitions: s.partitions,
            ..common::config(namespace)
        })
        .await
        .expect("connect to Redis");
        Arc::new(backend)
    }

    async fn available(&self) -> bool {
        common::available().await
    }

    async fn clean_up(&self, namespace: &str) {
        common::purge(namespace).await;
    }

    /// Kills the namespace's subscriber connections (the only named ones,
    /// `{namespace}:sub:{server}`) with `CLIENT KILL`, as a Redis restart
    /// or a network fault would.
    async fn sever(&self, namespace: &str) -> bool {
        let prefix = format!("name={namespace}:sub:");
        eventually(
            Duration::from_secs(5),
            "a subscriber connection to kill",
            || {
                let prefix = prefix.clone();
                async move { common::kill_clients(&prefix).await > 0 }
            },
        )
        .await;
        true
    }
}

fanout_backend::conformance_tests!(Redis);
