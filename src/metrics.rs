//! Prometheus metrics, one registry per process (not a global, so tests can
//! run several gateways in one process and read each one's figures).

use std::sync::{Arc, Mutex};

use fanout_backend::DynBackend;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set with one label (`code`, `reason` or `scope`).
pub type CodeLabels = Vec<(&'static str, &'static str)>;

/// Every metric fanout exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Live Socket.IO sessions on this gateway.
    pub sessions: Gauge,
    /// Connections refused at the handshake (bad token, backend down, too
    /// many connections).
    pub connects_refused: Counter,
    /// The same, by `reason`: `unauthorized`, `unavailable`,
    /// `too_many_connections`.
    pub connects_refused_by_reason: Family<CodeLabels, Counter>,
    /// Sends and API requests refused by a rate or queue limit, by `scope`:
    /// `connection`, `user`, `queue` (sends), `api` (HTTP).
    pub rate_limited: Family<CodeLabels, Counter>,
    /// Sessions cut off because their send buffer was full (slow clients).
    pub slow_client_disconnects: Counter,
    /// Events and acks not written to a session because its send buffer
    /// was full or it had been cut off for that.
    pub slow_client_drops: Counter,
    /// Sends acked `ok`.
    pub sends_accepted: Counter,
    /// Sends refused, by error code.
    pub sends_refused: Family<CodeLabels, Counter>,
    /// Seconds from receiving a send to acking it.
    pub send_ack_seconds: Histogram,
    /// Events emitted to sessions.
    pub deliveries: Counter,
    /// Entries not emitted because the session already had their position
    /// (a redelivery, or a live entry a fill or replay had shown).
    pub duplicates_dropped: Counter,
    /// Route keys bound by this gateway now.
    pub bound_keys: Gauge,
    /// Times the backend lost this gateway's routes and they were re-bound.
    pub routes_lost: Counter,
    /// Reads of a stream from the store that filled sessions' gaps (a
    /// missing position, a route loss, a join, a repaired bind).
    pub fills: Counter,
    /// Entries that arrived before an earlier position of their stream
    /// (writers of one stream publish concurrently) and waited for it.
    pub entries_early: Counter,
    /// Entries emitted to sessions from such reads.
    pub fill_entries: Counter,
    /// Fills that failed (the store did not answer); each is retried.
    pub fill_failures: Counter,
    /// Binds the backend refused (at connect, on a join, after a route loss).
    pub bind_failures: Counter,
    /// Binds tried again after a failure (a key is retried until it holds).
    pub bind_retries: Counter,
    /// Resumes answered, by `complete` (`true` or `false`).
    pub resumes: Family<CodeLabels, Counter>,
    /// Entries replayed to resuming sessions.
    pub replayed_entries: Counter,
    /// Seconds from a resuming session's connect to its `RESUMED`.
    pub replay_seconds: Histogram,
    /// Messages stored by the worker (new ones only).
    pub messages_stored: Counter,
    /// Retried or redelivered messages that were already stored.
    pub messages_deduplicated: Counter,
    /// Outgoing publishes nobody was bound to (recipient offline).
    pub unroutable: Counter,
    /// Events moved to the dead-letter place by the worker.
    pub dead_lettered: Counter,
    /// Worker batch sizes.
    pub batch_size: Histogram,
    /// Seconds a worker's batch took to store (positions included).
    pub worker_store_seconds: Histogram,
    /// Seconds a worker's stored batch took to publish to the outgoing side.
    pub worker_route_seconds: Histogram,
    /// Database or broker errors the worker retried.
    pub worker_retries: Counter,
    /// Failed stores of one message that the database refused by its
    /// content while it took a probe message (counted towards
    /// `incoming.max_attempts`; infrastructure errors never are).
    pub worker_message_refusals: Counter,
    /// Stored messages the broker refused to route for good (an invalid
    /// argument); they stay in the history.
    pub worker_publish_refused: Counter,
    /// `/readyz` probes that asked the broker and the database (at most
    /// one per second, however many requests).
    pub readiness_probes: Counter,
    /// Backends whose own counters are exported (see
    /// [`Metrics::attach_backend`]).
    backends: Arc<Mutex<Vec<DynBackend>>>,
}

/// Reads the attached backends' counters at each scrape.
#[derive(Debug)]
struct BackendCounters(Arc<Mutex<Vec<DynBackend>>>);

impl Collector for BackendCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let backends = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // One family per name, summed over the attached backends (a process
        // normally holds one).
        let mut sums: Vec<(&'static str, u64)> = Vec::new();
        for b in &backends {
            for (name, value) in b.counters() {
                match sums.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => *v = v.saturating_add(value),
                    None => sums.push((name, value)),
                }
            }
        }
        for (name, value) in sums {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(
                name,
                "Counted by the broker backend (see docs/reliability.md)",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fanout");
        let m = Self {
            sessions: Gauge::default(),
            connects_refused: Counter::default(),
            connects_refused_by_reason: Family::default(),
            rate_limited: Family::default(),
            slow_client_disconnects: Counter::default(),
            slow_client_drops: Counter::default(),
            sends_accepted: Counter::default(),
            sends_refused: Family::default(),
            send_ack_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            deliveries: Counter::default(),
            duplicates_dropped: Counter::default(),
            bound_keys: Gauge::default(),
            routes_lost: Counter::default(),
            fills: Counter::default(),
            entries_early: Counter::default(),
            fill_entries: Counter::default(),
            fill_failures: Counter::default(),
            bind_failures: Counter::default(),
            bind_retries: Counter::default(),
            resumes: Family::default(),
            replayed_entries: Counter::default(),
            replay_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            messages_stored: Counter::default(),
            messages_deduplicated: Counter::default(),
            unroutable: Counter::default(),
            dead_lettered: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            worker_store_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            worker_route_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            worker_retries: Counter::default(),
            worker_message_refusals: Counter::default(),
            worker_publish_refused: Counter::default(),
            readiness_probes: Counter::default(),
            backends: Arc::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sessions",
            "Live Socket.IO sessions on this gateway",
            m.sessions.clone(),
        );
        registry.register(
            "connects_refused",
            "Handshakes refused",
            m.connects_refused.clone(),
        );
        registry.register(
            "connects_refused_by_reason",
            "Handshakes refused, by reason",
            m.connects_refused_by_reason.clone(),
        );
        registry.register(
            "rate_limited",
            "Sends and API requests refused by a rate or queue limit, by scope",
            m.rate_limited.clone(),
        );
        registry.register(
            "slow_client_disconnects",
            "Sessions cut off because their send buffer was full",
            m.slow_client_disconnects.clone(),
        );
        registry.register(
            "slow_client_drops",
            "Events and acks not written to a session whose send buffer was full",
            m.slow_client_drops.clone(),
        );
        registry.register(
            "sends_accepted",
            "sendMessage events acked ok",
            m.sends_accepted.clone(),
        );
        registry.register(
            "sends_refused",
            "sendMessage events refused, by code",
            m.sends_refused.clone(),
        );
        registry.register(
            "send_ack_seconds",
            "Seconds from receiving a send to its ack",
            m.send_ack_seconds.clone(),
        );
        registry.register(
            "deliveries",
            "Events emitted to sessions",
            m.deliveries.clone(),
        );
        registry.register(
            "duplicates_dropped",
            "Entries a session already had by position",
            m.duplicates_dropped.clone(),
        );
        registry.register(
            "bound_keys",
            "Route keys this gateway has bound",
            m.bound_keys.clone(),
        );
        registry.register(
            "routes_lost",
            "Times the backend lost this gateway's routes",
            m.routes_lost.clone(),
        );
        registry.register(
            "fills",
            "Stream reads from the store that filled sessions' gaps",
            m.fills.clone(),
        );
        registry.register(
            "entries_early",
            "Entries that arrived before an earlier position of their stream and waited for it",
            m.entries_early.clone(),
        );
        registry.register(
            "fill_entries",
            "Entries emitted to sessions from gap fills",
            m.fill_entries.clone(),
        );
        registry.register(
            "fill_failures",
            "Gap fills the store did not answer (each is retried)",
            m.fill_failures.clone(),
        );
        registry.register(
            "bind_failures",
            "Binds the backend refused (each is retried until it holds)",
            m.bind_failures.clone(),
        );
        registry.register(
            "bind_retries",
            "Binds tried again after a failure",
            m.bind_retries.clone(),
        );
        registry.register(
            "resumes",
            "Resumes answered, by complete",
            m.resumes.clone(),
        );
        registry.register(
            "replayed_entries",
            "Entries replayed to resuming sessions",
            m.replayed_entries.clone(),
        );
        registry.register(
            "replay_seconds",
            "Seconds from a resuming session's connect to its RESUMED",
            m.replay_seconds.clone(),
        );
        registry.register(
            "messages_stored",
            "Messages stored by workers",
            m.messages_stored.clone(),
        );
        registry.register(
            "messages_deduplicated",
            "Retries and redeliveries of stored messages",
            m.messages_deduplicated.clone(),
        );
        registry.register(
            "unroutable",
            "Outgoing publishes with no bound gateway",
            m.unroutable.clone(),
        );
        registry.register(
            "dead_lettered",
            "Events dead-lettered by workers",
            m.dead_lettered.clone(),
        );
        registry.register(
            "worker_batch_size",
            "Events per worker batch",
            m.batch_size.clone(),
        );
        registry.register(
            "worker_store_seconds",
            "Seconds a worker batch took to store, positions included",
            m.worker_store_seconds.clone(),
        );
        registry.register(
            "worker_route_seconds",
            "Seconds a stored worker batch took to publish to the outgoing side",
            m.worker_route_seconds.clone(),
        );
        registry.register(
            "worker_retries",
            "Database or broker errors retried by workers",
            m.worker_retries.clone(),
        );
        registry.register(
            "worker_message_refusals",
            "Stores of one message the database refused by its content while it took a probe",
            m.worker_message_refusals.clone(),
        );
        registry.register(
            "worker_publish_refused",
            "Stored messages the broker refused to route for good",
            m.worker_publish_refused.clone(),
        );
        registry.register(
            "readiness_probes",
            "Readiness probes of the broker and the database",
            m.readiness_probes.clone(),
        );
        registry
            .sub_registry_with_prefix("backend")
            .register_collector(Box::new(BackendCounters(m.backends.clone())));
        Self { registry, ..m }
    }

    /// Exports `backend`'s own counters ([`fanout_backend::FanoutBackend::counters`])
    /// as `fanout_backend_{name}_total` from now on.
    pub fn attach_backend(&self, backend: DynBackend) {
        self.backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(backend);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_counters_are_exported_with_the_process_metrics() {
        let m = Metrics::new();
        m.messages_stored.inc_by(7);
        m.attach_backend(Arc::new(fanout_memory::MemoryBackend::default()));
        let page = m.render();
        assert!(page.contains("fanout_messages_stored_total 7"), "{page}");
        assert!(
            page.contains("# TYPE fanout_backend_dead_letters_dropped counter\n"),
            "{page}"
        );
        assert!(
            page.contains("\nfanout_backend_dead_letters_dropped_total 0\n"),
            "{page}"
        );
        assert!(page.ends_with("# EOF\n"), "{page}");
        assert_eq!(page.matches("# EOF").count(), 1);
    }
}
