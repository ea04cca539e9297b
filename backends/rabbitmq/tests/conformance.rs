//! The RabbitMQ backend runs the whole conformance suite against the broker
//! at `FANOUT_RABBITMQ_URL` (default: the local one), once with quorum
//! partition queues and once with classic ones. Without a broker the
//! checks are skipped loudly, or fail when `FANOUT_TEST_REQUIRE_SERVICES=1`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fanout_backend::conformance::{eventually, Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_rabbitmq::{QueueType, RabbitMqBackend, RabbitMqConfig};

struct RabbitMq {
    queue_type: QueueType,
    /// The settings each namespace was made with, to purge it whole.
    made: Mutex<HashMap<String, Settings>>,
}

impl RabbitMq {
    fn new(queue_type: QueueType) -> Self {
        Self {
            queue_type,
            made: Mutex::default(),
        }
    }

    fn config(&self, namespace: &str, s: Settings) -> RabbitMqConfig {
        RabbitMqConfig {
            partitions: s.partitions,
            queue_type: self.queue_type,
            ..common::config(namespace)
        }
    }
}

#[async_trait]
impl Harness for RabbitMq {
    async fn backend(&self, namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        self.made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(namespace.to_owned(), s);
        Arc::new(common::connect(self.config(namespace, s)).await)
    }

    async fn available(&self) -> bool {
        common::broker_available().await
    }

    async fn clean_up(&self, namespace: &str) {
        let made = self
            .made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(namespace);
        let Some(s) = made else { return };
        // Queues also expire on their own (`common::config`); purging now
        // keeps the broker's queue list short while the suite runs.
        if let Err(e) = RabbitMqBackend::purge(&self.config(namespace, s)).await {
            eprintln!("could not purge test namespace {namespace}: {e}");
        }
    }

    /// Closes the namespace's connections on the broker with
    /// `rabbitmqctl close_connection`, as an operator or a broker restart
    /// would.
    async fn sever(&self, namespace: &str) -> bool {
        if !common::rabbitmqctl_available() {
            return false;
        }
        let prefix = format!("fanout {namespace} ");
        eventually(Duration::from_secs(10), "a connection to close", || {
            let prefix = prefix.clone();
            async move {
                tokio::task::spawn_blocking(move || common::kill_connections_named(&prefix))
                    .await
                    .expect("rabbitmqctl task")
                    > 0
            }
        })
        .await;
        true
    }
}

mod quorum {
    fanout_backend::conformance_tests!(super::RabbitMq::new(super::QueueType::Quorum));
}

mod classic {
    fanout_backend::conformance_tests!(super::RabbitMq::new(super::QueueType::Classic));
}
