//! The whole conformance suite against a three-node RabbitMQ cluster
//! (`common::cluster`, started once for this binary, ~30 s), with every
//! backend given the list of the three nodes' URLs, as `FANOUT_RABBITMQ_URL`
//! would hold it for a cluster. Each backend connects to a random node, so
//! the checks with several backends span nodes: bindings made through one
//! node route messages published through another, a partition consumed
//! through one node is fed through another. Quorum partition queues only
//! (classic ones are not replicated, the wrong choice on a cluster).
//!
//! Without `rabbitmq-server` on the machine the checks skip loudly, or fail
//! when `FANOUT_TEST_REQUIRE_SERVICES=1`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::cluster::{cluster, Cluster};
use fanout_backend::conformance::{eventually, Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_rabbitmq::{QueueType, RabbitMqBackend, RabbitMqConfig};

struct RabbitMqCluster {
    /// The settings each namespace was made with, to purge it whole.
    made: Mutex<HashMap<String, Settings>>,
}

impl RabbitMqCluster {
    fn new() -> Self {
        Self {
            made: Mutex::default(),
        }
    }

    async fn nodes(&self) -> &'static Cluster {
        cluster().await.expect("available() said the cluster runs")
    }

    async fn config(&self, namespace: &str, s: Settings) -> RabbitMqConfig {
        RabbitMqConfig {
            url: self.nodes().await.url_list(),
            partitions: s.partitions,
            queue_type: QueueType::Quorum,
            ..common::config(namespace)
        }
    }
}

#[async_trait]
impl Harness for RabbitMqCluster {
    async fn backend(&self, namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        self.made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(namespace.to_owned(), s);
        Arc::new(common::connect(self.config(namespace, s).await).await)
    }

    async fn available(&self) -> bool {
        cluster().await.is_some()
    }

    async fn clean_up(&self, namespace: &str) {
        let made = self
            .made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(namespace);
        let Some(s) = made else { return };
        if let Err(e) = RabbitMqBackend::purge(&self.config(namespace, s).await).await {
            eprintln!("could not purge test namespace {namespace}: {e}");
        }
    }

    /// Closes the namespace's connections, on whichever nodes they are,
    /// with `rabbitmqctl close_connection` (asked of one node: connections
    /// are listed and closed cluster-wide).
    async fn sever(&self, namespace: &str) -> bool {
        let nodes = self.nodes().await;
        let prefix = format!("fanout {namespace} ");
        eventually(Duration::from_secs(10), "a connection to close", || {
            let prefix = prefix.clone();
            async move {
                tokio::task::spawn_blocking(move || nodes.kill_connections_named(&prefix))
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
    fanout_backend::conformance_tests!(super::RabbitMqCluster::new());
}
