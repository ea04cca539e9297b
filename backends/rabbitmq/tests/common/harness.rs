//! The conformance harness of the RabbitMQ backend, on the broker at
//! `FANOUT_RABBITMQ_URL` or on the three-node cluster of `super::cluster`:
//! the same checks, asserted the same way, only the topology differs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fanout_backend::conformance::{eventually, Harness, Settings};
use fanout_backend::FanoutBackend;
use fanout_rabbitmq::{QueueType, RabbitMqBackend, RabbitMqConfig};

pub struct RabbitMq {
    queue_type: QueueType,
    /// On the cluster, every backend given the list of its nodes.
    cluster: bool,
    /// The settings each namespace was made with, to purge it whole.
    made: Mutex<HashMap<String, Settings>>,
}

impl RabbitMq {
    /// On the configured broker.
    pub fn new(queue_type: QueueType) -> Self {
        Self {
            queue_type,
            cluster: false,
            made: Mutex::default(),
        }
    }

    /// On the cluster; quorum queues only (classic ones are not
    /// replicated, the wrong choice on a cluster).
    pub fn on_cluster() -> Self {
        Self {
            cluster: true,
            ..Self::new(QueueType::Quorum)
        }
    }

    async fn nodes(&self) -> Option<&'static super::cluster::Cluster> {
        if self.cluster {
            super::cluster::cluster().await
        } else {
            None
        }
    }

    async fn config(&self, namespace: &str, s: Settings) -> RabbitMqConfig {
        let mut config = RabbitMqConfig {
            partitions: s.partitions,
            queue_type: self.queue_type,
            ..super::config(namespace)
        };
        if let Some(nodes) = self.nodes().await {
            config.url = nodes.url_list();
        }
        config
    }
}

#[async_trait]
impl Harness for RabbitMq {
    async fn backend(&self, namespace: &str, s: Settings) -> Arc<dyn FanoutBackend> {
        self.made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(namespace.to_owned(), s);
        Arc::new(super::connect(self.config(namespace, s).await).await)
    }

    async fn available(&self) -> bool {
        if self.cluster {
            self.nodes().await.is_some()
        } else {
            super::broker_available().await
        }
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
        if let Err(e) = RabbitMqBackend::purge(&self.config(namespace, s).await).await {
            eprintln!("could not purge test namespace {namespace}: {e}");
        }
    }

    /// Closes the namespace's connections with `rabbitmqctl
    /// close_connection`, as an operator or a broker restart would (on a
    /// cluster, asked of one node: connections are listed and closed
    /// cluster-wide).
    async fn sever(&self, namespace: &str) -> bool {
        let nodes = self.nodes().await;
        if nodes.is_none() && !super::rabbitmqctl_available() {
            return false;
        }
        let prefix = format!("fanout {namespace} ");
        eventually(Duration::from_secs(10), "a connection to close", || {
            let prefix = prefix.clone();
            async move {
                tokio::task::spawn_blocking(move || match nodes {
                    Some(n) => n
                        .kill_connections_named(&prefix)
                        .expect("close the connections"),
                    None => super::kill_connections_named(&prefix),
                })
                .await
                .expect("rabbitmqctl task")
                    > 0
            }
        })
        .await;
        true
    }
}
