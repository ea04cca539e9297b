//! The memory backend runs the whole conformance suite.

use std::sync::Arc;

use async_trait::async_trait;
use fanout_backend::conformance::{Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_memory::{MemoryBackend, MemoryConfig};

struct Memory;

#[async_trait]
impl Harness for Memory {
    // Each memory backend is its own broker, so the instance is the namespace.
    async fn backend(&self, _namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        Arc::new(MemoryBackend::new(MemoryConfig {
            partitions: s.partitions,
            ..MemoryConfig::default()
        }))
    }
}

fanout_backend::conformance_tests!(Memory);
