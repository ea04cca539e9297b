//! The memory backend runs the whole conformance suite.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fanout_backend::conformance::{Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_memory::{MemoryBackend, MemoryConfig};

/// Each memory backend is its own broker, so one value per namespace
/// stands for every process on it: asked twice for a namespace, the
/// harness hands out the same value, as two processes would share a broker.
#[derive(Default)]
struct Memory {
    brokers: Mutex<HashMap<String, Arc<MemoryBackend>>>,
}

#[async_trait]
impl Harness for Memory {
    async fn backend(&self, namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        let mut brokers = self.brokers.lock().unwrap_or_else(|p| p.into_inner());
        brokers
            .entry(namespace.to_owned())
            .or_insert_with(|| {
                Arc::new(MemoryBackend::new(MemoryConfig {
                    partitions: s.partitions,
                    ..MemoryConfig::default()
                }))
            })
            .clone()
    }

    async fn clean_up(&self, namespace: &str) {
        self.brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(namespace);
    }
}

fanout_backend::conformance_tests!(Memory::default());
