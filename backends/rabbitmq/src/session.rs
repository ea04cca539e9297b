//! One "session" with the broker: two connections and the long-lived
//! channels on them. The supervisor replaces a dead session with a new one.
//!
//! Two connections, because RabbitMQ throttles (and on a resource alarm,
//! blocks) connections that publish: consumers' acks on a separate
//! connection keep flowing, so queues can drain while publishers wait.
//!
//! - `publish`: confirm-mode channels for incoming events, outgoing messages
//!   and dead letters;
//! - `consume`: the gateways' exclusive queues (exclusive queues belong to
//!   the connection that declared them, so their bindings go over it too),
//!   the binding channels, the partition consumers and the presence queues.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::types::LongString;
use lapin::{Channel, Connection, ConnectionProperties};

use fanout_backend::BackendError;

use crate::error::map_err;
use crate::{nodes, topology, Inner};

/// Channels in each publishing pool. Publishes pipeline on a channel (many
/// in flight, each awaiting its own confirm), so a few channels suffice;
/// more than one spreads the broker-side channel process work over cores.
const PUBLISH_CHANNELS: usize = 4;
/// Channels that carry queue.bind / queue.unbind. Binding is a synchronous
/// method, pipelined per channel by lapin; several channels let the broker
/// work on several at once.
const BIND_CHANNELS: usize = 8;

/// A fixed set of lazily (re)opened channels on one connection. A channel
/// closed by a channel-level error (for example NOT_FOUND) is replaced on
/// next use instead of failing every later call.
pub(crate) struct ChannelPool {
    conn: Arc<Connection>,
    confirm: bool,
    slots: Vec<tokio::sync::Mutex<Option<Channel>>>,
}

impl ChannelPool {
    fn new(conn: Arc<Connection>, size: usize, confirm: bool) -> Self {
        Self {
            conn,
            confirm,
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        }
    }

    /// The channel for `hint` (callers pass a hash of what must stay in
    /// order, so that e.g. two publishes of one ordering key share a
    /// channel and keep their order on the broker).
    pub(crate) async fn get(&self, hint: u64) -> lapin::Result<Channel> {
        let i = (hint % self.slots.len() as u64) as usize;
        let mut slot = self.slots[i].lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = self.conn.create_channel().await?;
        if self.confirm {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
        }
        *slot = Some(ch.clone());
        Ok(ch)
    }
}

/// A live pair of connections with their channels.
pub(crate) struct Session {
    /// Increases with every new session of one backend.
    pub(crate) generation: u64,
    /// The index, in the node list, of the node both connections go to.
    pub(crate) node: usize,
    pub(crate) publish: Arc<Connection>,
    pub(crate) consume: Arc<Connection>,
    pub(crate) incoming_pub: ChannelPool,
    pub(crate) outgoing_pub: ChannelPool,
    pub(crate) binders: ChannelPool,
    /// Declarations and other rare calls.
    pub(crate) admin: ChannelPool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("generation", &self.generation)
            .field("node", &self.node)
            .field("publish", &self.publish.status().connected())
            .field("consume", &self.consume.status().connected())
            .finish()
    }
}

impl Session {
    /// Whether both connections are still open.
    pub(crate) fn alive(&self) -> bool {
        self.publish.status().connected() && self.consume.status().connected()
    }

    /// Connects to the first node that answers, in the cursor's order (a
    /// random node first, or the one after the node last lost), and
    /// declares the namespace's topology there. Each node gets
    /// `operation_timeout`, so a node that swallows packets costs that much
    /// before the next is tried.
    pub(crate) async fn open(inner: &Inner, generation: u64) -> Result<Session, BackendError> {
        let n = inner.nodes.len();
        let mut failures = Vec::new();
        let mut last = None;
        for node in inner.cursor.order(n) {
            let url = &inner.nodes[node];
            let attempt =
                tokio::time::timeout(inner.timeout(), Self::open_on(inner, generation, node, url))
                    .await;
            let e = match attempt {
                Ok(Ok(session)) => {
                    inner.cursor.connected(node, n);
                    tracing::info!(
                        namespace = %inner.config.namespace,
                        generation,
                        node = %nodes::redact(url),
                        "connected to RabbitMQ"
                    );
                    return Ok(session);
                }
                Ok(Err(e)) => map_err("connect to RabbitMQ", &e),
                Err(_) => BackendError::Unavailable(
                    format!(
                        "connect to RabbitMQ: no answer within {:?}",
                        inner.timeout()
                    )
                    .into(),
                ),
            };
            if n > 1 {
                tracing::warn!(node = %nodes::redact(url), error = %e, "RabbitMQ node unreachable; trying the next");
            }
            failures.push(format!("{}: {e}", nodes::redact(url)));
            last = Some(e);
        }
        match last {
            // One node: its own error, classed as it was (a refusal stays
            // a refusal).
            Some(e) if n == 1 => Err(e),
            // Several: the last one's class (if every node refuses our
            // credentials, that is a refusal), every node's reason.
            Some(e) => {
                let text = format!("no RabbitMQ node of {n} answered: {}", failures.join("; "));
                Err(match e {
                    BackendError::Refused(_) => BackendError::Refused(text.into()),
                    BackendError::Invalid(_) => BackendError::Invalid(text.into()),
                    _ => BackendError::Unavailable(text.into()),
                })
            }
            None => Err(BackendError::Invalid("no RabbitMQ URL configured".into())),
        }
    }

    /// Opens both connections to one node and declares the topology.
    async fn open_on(
        inner: &Inner,
        generation: u64,
        node: usize,
        url: &str,
    ) -> lapin::Result<Session> {
        let props = |role: &str| {
            ConnectionProperties::default()
                .with_connection_name(LongString::from(inner.connection_name(role)))
        };
        let publish = Arc::new(Connection::connect(url, props("pub")).await?);
        let consume = match Connection::connect(url, props("sub")).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let _ = publish.close(200, "setup failed".into()).await;
                return Err(e);
            }
        };
        let session = Session {
            generation,
            node,
            incoming_pub: ChannelPool::new(publish.clone(), PUBLISH_CHANNELS, true),
            outgoing_pub: ChannelPool::new(publish.clone(), PUBLISH_CHANNELS, true),
            admin: ChannelPool::new(publish.clone(), 1, true),
            binders: ChannelPool::new(consume.clone(), BIND_CHANNELS, false),
            publish,
            consume,
        };
        let declared =
            topology::declare(&session.admin, &inner.config, &inner.names, &inner.legacy).await;
        if let Err(e) = declared {
            session.close().await;
            return Err(e);
        }
        Ok(session)
    }

    /// Closes both connections, best effort and bounded: used on shutdown
    /// and when one connection of the pair died.
    pub(crate) async fn close(&self) {
        let limit = Duration::from_secs(2);
        for conn in [&self.publish, &self.consume] {
            if conn.status().connected() {
                let _ = tokio::time::timeout(limit, conn.close(200, "closing".into())).await;
            }
        }
    }
}

/// A stable hash for choosing a pool channel.
pub(crate) fn hint_of(parts: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// Generations of sessions, servers' attachments and partition slots.
pub(crate) fn next_id(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}
