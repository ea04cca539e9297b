//! The `FanoutBackend` contract: the one trait that every broker backend
//! implements, and that gateway and worker code is written against.
//!
//! The design follows the seed article's split of a chat system's traffic:
//!
//! - the **incoming side** carries raw events from gateways to workers. It is
//!   durable, at-least-once, and partitioned by an [`OrderingKey`] (the
//!   conversation) so that events of one conversation are processed in
//!   publish order even when several workers run;
//! - the **outgoing side** carries processed events from workers to exactly
//!   the gateways that hold the recipients, routed by a [`RouteKey`] (a user
//!   id or `channel:{id}`) that gateways bind and unbind for themselves.
//!
//! Parts:
//! - [`FanoutBackend`]: the trait, with its contract written on each method;
//! - [`types`]: the identifiers and messages that cross it;
//! - [`BackendError`]: the one error type, which says whether a retry can help
//!   and keeps the broker client's error as its source ([`Detail`]);
//! - [`Capabilities`]: what a backend guarantees;
//! - `conformance` (feature `conformance`): the checks every backend's tests run.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

mod error;
pub mod types;
pub use error::{BackendError, Detail};
pub use types::*;

#[cfg(feature = "conformance")]
pub mod conformance;

/// A backend shared by gateways and workers in one process.
pub type DynBackend = Arc<dyn FanoutBackend>;

/// The broker behind fanout: a durable, partitioned incoming side and a
/// key-routed outgoing side.
///
/// # Contract
///
/// Every implementation MUST be safe to call concurrently from many tasks,
/// and every method MUST return (with an error if need be) rather than hang
/// forever when the broker is unreachable: callers answer clients with
/// `unavailable` and must be able to do so promptly.
///
/// All names a backend creates on its broker (queues, exchanges, keys,
/// streams) MUST be scoped by the namespace it was configured with, so that
/// two backends with different namespaces on the same broker never see each
/// other's events, routes or dead letters.
///
/// Reference counting of routes is not the backend's job: the gateway binds
/// a key when its first local session needs it and unbinds it when the last
/// one leaves, so a backend sees at most one `bind` per (server, key) until
/// the matching `unbind`.
#[async_trait]
pub trait FanoutBackend: Send + Sync + std::fmt::Debug + 'static {
    /// What this backend guarantees. MUST be constant for the life of the
    /// value.
    fn capabilities(&self) -> Capabilities;

    /// Checks that the broker is reachable now.
    ///
    /// - MUST return `Ok` only if a publish issued now could succeed.
    /// - SHOULD answer within a second or two; it backs `/readyz`.
    async fn health(&self) -> Result<(), BackendError>;

    // ----- incoming side -------------------------------------------------

    /// Publishes an event to the incoming side.
    ///
    /// - MUST return `Ok` only once the broker has durably accepted the event
    ///   under its configured persistence (publisher confirm, stream append):
    ///   the gateway acknowledges the client on this return, never earlier.
    /// - MUST place the event in the partition chosen by
    ///   [`partition_for`]`(&event.ordering_key, partitions)`.
    /// - Events published sequentially (each awaited before the next) with
    ///   the same ordering key MUST be delivered to consumers in that order.
    /// - On error the event MAY have been accepted anyway (a confirm lost in
    ///   transit); consumers are idempotent by [`IncomingEvent::id`].
    async fn publish_incoming(&self, event: IncomingEvent) -> Result<(), BackendError>;

    /// Starts consuming the incoming side as one consumer of the group.
    ///
    /// - Each partition MUST be consumed by at most one consumer at a time,
    ///   and partitions SHOULD be spread evenly over the live consumers.
    /// - Within a partition, deliveries MUST come in publish order; a
    ///   partition MUST NOT move to another consumer while the previous
    ///   owner holds unsettled deliveries from it (so order survives a
    ///   rebalance), except when that owner is gone.
    /// - An event that is neither acked, rejected nor dead-lettered before
    ///   its consumer stream is dropped (or its process dies) MUST be
    ///   delivered again, to this or another consumer, ahead of the later
    ///   events of its partition.
    /// - [`IncomingDelivery::reject`] requeues the event ahead of the later
    ///   events of its partition.
    /// - A backend MUST NOT dead-letter an event on its own, by a delivery
    ///   count or otherwise: the broker's counts include hand-overs,
    ///   prefetched returns, restarts and lost connections, which say
    ///   nothing about the event. Only [`IncomingDelivery::dead_letter`]
    ///   moves an event to the dead-letter place; the application decides
    ///   when (it counts what says something about the event itself).
    /// - At most `prefetch` deliveries are unsettled on one stream at once.
    /// - The stream ends only when the backend is shut down; transient broker
    ///   errors SHOULD be retried inside the backend and MAY be surfaced as
    ///   `Err` items, after which the stream goes on.
    async fn consume_incoming(
        &self,
        options: ConsumeOptions,
    ) -> Result<BoxStream<'static, Result<IncomingDelivery, BackendError>>, BackendError>;

    /// Reads up to `limit` dead-lettered events, oldest first, without
    /// removing them: what an operator looks at after a poison event.
    ///
    /// - Dead letters MUST NOT be trimmed silently: a backend either keeps
    ///   every one until [`FanoutBackend::resolve_dead_letters`] removes
    ///   it, or, where it bounds them, logs and counts each one it drops.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BackendError>;

    /// Replays or drops the dead letters `selection` picks, oldest first;
    /// returns those acted on, in that order. What an operator does after
    /// fixing the cause of a dead letter (`fanout dead-letters replay`).
    ///
    /// - [`DeadLetterAction::Replay`] MUST publish the event to the incoming
    ///   side as [`FanoutBackend::publish_incoming`] does (confirmed, same
    ///   id, ordering key and payload) before it removes the dead letter:
    ///   a crash in between leaves it in both places, never in neither
    ///   (workers store by id, so a replayed event is stored once).
    /// - Dead letters not selected stay, in their order.
    /// - Two calls at once MUST NOT act on one dead letter twice.
    async fn resolve_dead_letters(
        &self,
        selection: &DeadLetterSelection,
        action: DeadLetterAction,
    ) -> Result<Vec<DeadLetter>, BackendError>;

    // ----- outgoing side -------------------------------------------------

    /// Registers a gateway and returns its stream of deliveries.
    ///
    /// - A second registration of a live server id MUST fail with
    ///   [`BackendError::Conflict`].
    /// - A fresh registration MUST start with no routes, even if the id was
    ///   used before (a restarted gateway never inherits old routes).
    /// - Dropping the stream deregisters the server; the backend MUST then
    ///   stop routing to it and SHOULD remove its routes.
    /// - Messages MUST be yielded in the order they were enqueued for this
    ///   server. Taking the next item from the stream acknowledges the
    ///   previous one (backends with broker-side acks ack then).
    /// - If the backend loses this server's routes (connection loss,
    ///   failover), it MUST yield [`ServerEvent::RoutesLost`] once its queue
    ///   or channel is usable again; the gateway then binds all its keys anew.
    async fn register_server(&self, server: &ServerId) -> Result<ServerStream, BackendError>;

    /// Removes every route of `server` and stops its stream, in batches small
    /// enough not to stall the broker. Idempotent. Called on graceful
    /// shutdown; a server that dies without it is cleaned by the backend's
    /// own means (exclusive queues, liveness keys), stated in its docs.
    async fn deregister_server(&self, server: &ServerId) -> Result<(), BackendError>;

    /// Routes messages published to `key` to `server` from now on.
    ///
    /// - MUST be idempotent: binding a bound key changes nothing.
    /// - MUST be effective when it returns: a publish to `key` that starts
    ///   after this returns is delivered to `server`.
    /// - MUST fail with [`BackendError::NotRegistered`] for a server that is
    ///   not registered on this backend value.
    async fn bind(&self, server: &ServerId, key: &RouteKey) -> Result<(), BackendError>;

    /// Stops routing `key` to `server`.
    ///
    /// - MUST be idempotent: unbinding an unbound key is `Ok`.
    /// - MUST be effective when it returns: a publish that starts after this
    ///   returns is not delivered to `server` for this key.
    async fn unbind(&self, server: &ServerId, key: &RouteKey) -> Result<(), BackendError>;

    /// Publishes a message to every server bound to `key` at the time.
    ///
    /// - MUST deliver to exactly the servers bound to `key`, each once.
    /// - A message for a key nobody is bound to is dropped; the backend MUST
    ///   say so with [`RouteOutcome::Unroutable`] where it can tell, and
    ///   [`RouteOutcome::Unknown`] where it cannot.
    /// - When it returns `Ok`, the message MUST already be enqueued for every
    ///   bound server, so that anything published afterwards (by anyone) to
    ///   the same server is yielded after it. Membership changes rely on
    ///   this: a control message published before an HTTP `204` reaches the
    ///   gateway before any chat message sent after the `204`.
    /// - A slow server MUST NOT cause silent loss on backends that declare
    ///   `outgoing_at_least_once`; it MAY apply backpressure to the publisher.
    async fn publish_outgoing(
        &self,
        key: &RouteKey,
        payload: bytes::Bytes,
    ) -> Result<RouteOutcome, BackendError>;

    /// Releases connections and background tasks. Idempotent. After it,
    /// every method MAY fail with [`BackendError::Closed`].
    async fn shutdown(&self) -> Result<(), BackendError>;

    /// The monotonic counters this backend value keeps, as `(name, value)`,
    /// read at each scrape of the process's `/metrics` (exported as
    /// `fanout_backend_{name}_total`).
    ///
    /// - Names MUST be constant `snake_case` without the `_total` suffix,
    ///   and each value MUST never decrease for the life of the value.
    /// - MUST be cheap and MUST NOT touch the broker: it is called inline.
    /// - The default keeps none.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// The stream of deliveries for one registered server.
pub type ServerStream = BoxStream<'static, ServerEvent>;

/// What a backend guarantees; reported by `/readyz` and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Short name: `memory`, `rabbitmq`, `redis`.
    pub name: &'static str,
    /// Accepted incoming events survive a broker restart.
    pub durable_incoming: bool,
    /// Unacked incoming events are redelivered (at-least-once).
    pub incoming_at_least_once: bool,
    /// Incoming events with one ordering key are processed in order even
    /// with several consumers.
    pub per_key_ordering: bool,
    /// Outgoing messages to a live, bound server are never dropped (a
    /// reconnecting Pub/Sub subscriber is the counter-example).
    pub outgoing_at_least_once: bool,
    /// The backend keeps its own user -> server table (Redis) rather than
    /// broker bindings (RabbitMQ).
    pub explicit_routing_table: bool,
    /// `publish_outgoing` can report `Unroutable`.
    pub reports_unroutable: bool,
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (durable_incoming={}, incoming_at_least_once={}, per_key_ordering={}, \
             outgoing_at_least_once={}, explicit_routing_table={}, reports_unroutable={})",
            self.name,
            self.durable_incoming,
            self.incoming_at_least_once,
            self.per_key_ordering,
            self.outgoing_at_least_once,
            self.explicit_routing_table,
            self.reports_unroutable
        )
    }
}
