//! The RabbitMQ backend runs the whole conformance suite against the broker
//! at `FANOUT_RABBITMQ_URL` (default: the local one). Without a broker the
//! checks are skipped loudly, or fail when `FANOUT_TEST_REQUIRE_SERVICES=1`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fanout_backend::conformance::{skip_or_fail, Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_rabbitmq::{QueueType, RabbitMqBackend, RabbitMqConfig};

struct RabbitMq;

fn url() -> String {
    std::env::var("FANOUT_RABBITMQ_URL").unwrap_or_else(|_| RabbitMqConfig::default().url)
}

/// `FANOUT_RABBITMQ_QUEUE_TYPE=classic` runs the suite on classic partition
/// queues; quorum (the default) otherwise.
fn queue_type() -> QueueType {
    match std::env::var("FANOUT_RABBITMQ_QUEUE_TYPE").as_deref() {
        Ok("classic") => QueueType::Classic,
        _ => QueueType::Quorum,
    }
}

#[async_trait]
impl Harness for RabbitMq {
    async fn backend(&self, namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        let backend = RabbitMqBackend::connect(RabbitMqConfig {
            url: url(),
            namespace: namespace.to_owned(),
            partitions: s.partitions,
            queue_type: queue_type(),
            // Nothing of a test run stays on the shared broker: queues
            // expire once unused, exchanges go with them.
            queue_expiry: Some(Duration::from_secs(60)),
            // The broker shares two cores with parallel builds and test
            // runs; a starved broker must not fail a check by deadline.
            operation_timeout: Duration::from_secs(15),
            ..RabbitMqConfig::default()
        })
        .await
        .expect("connect to RabbitMQ");
        Arc::new(backend)
    }

    async fn available(&self) -> bool {
        let probe = RabbitMqConfig {
            url: url(),
            namespace: "fanout-probe".into(),
            partitions: 1,
            queue_expiry: Some(Duration::from_secs(10)),
            operation_timeout: Duration::from_secs(5),
            ..RabbitMqConfig::default()
        };
        match RabbitMqBackend::connect(probe).await {
            Ok(b) => {
                let _ = b.shutdown().await;
                true
            }
            Err(e) => {
                skip_or_fail("RabbitMQ", &e.to_string());
                false
            }
        }
    }
}

fanout_backend::conformance_tests!(RabbitMq);
