//! The Redis backend runs the whole conformance suite against a real Redis
//! (`FANOUT_REDIS_URL`, default `redis://127.0.0.1:6379`). Every check uses
//! fresh namespaces and deletes their keys when it shuts its backends down.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use fanout_backend::conformance::{Harness, Settings};
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
        common::Purging::new(backend)
    }

    async fn available(&self) -> bool {
        common::available().await
    }
}

fanout_backend::conformance_tests!(Redis);
