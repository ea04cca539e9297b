//! The worker: consumes the incoming side, stores each message once, routes
//! it to the outgoing side, then acks.
//!
//! Order of work for a batch (as many deliveries as are ready, up to
//! `worker.batch_size`): decode and re-validate (poison goes to the
//! dead-letter place at once), store all in one transaction that also gives
//! each new message its positions (`seq`) in its streams (the receiver's
//! and the sender's inbox, or the channel's stream), publish each stored
//! entry as [`OutgoingEnvelope::Entry`] to its stream's route key (in
//! position order per key, keys concurrently), ack. Nothing is acked before
//! it is stored and published; a crash anywhere means redelivery: the store
//! writes nothing twice and returns the positions it gave the first time,
//! and a gateway drops what a session already has by its position.
//!
//! # Error policy
//!
//! An error is classed by what it says about the message, never by how
//! often the broker delivered it (redeliveries count hand-overs, restarts
//! and lost connections):
//!
//! - **Bad by content** — dead-lettered: the event fails decoding or
//!   validation (at once); or its store fails with an error that blames the
//!   data ([`StoreError::blames_data`]) while the database takes a probe
//!   message ([`Store::probe_insert`]) at the same moment, `max_attempts`
//!   times in a row (counted here, in the process; backoff between tries).
//! - **Infrastructure** — everything else (the database read-only, full,
//!   unreachable; the broker down): retried in place with capped backoff
//!   for as long as it lasts, never counted. The consumer holds its batch,
//!   so its partitions hold their place and order.
//!
//! A batch whose insert blames the data is stored one message at a time,
//! in order: the ones before the guilty one are stored and acked, the ones
//! after it wait until it is stored or dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use fanout_backend::{
    is_valid_id, BackendError, ConsumeOptions, DynBackend, IncomingDelivery, RouteKey, RouteOutcome,
};
use futures::StreamExt;
use tokio::sync::mpsc::{Receiver, Sender};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use crate::protocol::{self, IncomingEnvelope, Message, OutgoingEnvelope};
use crate::store::{Outcome, Store, StoreError};
use crate::stream::Entry;

/// Largest content a worker accepts, whatever the gateways' limit: a
/// backstop against an event no gateway should have published.
const MAX_CONTENT_BYTES: usize = crate::config::MAX_CONTENT_BYTES_CEILING;
/// The first retry's wait; each next one doubles, up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(50);
/// A consumer retrying a store or a publish holds its batch and takes no
/// other: the cap is how long it may stay idle after the database or the
/// broker is back. At 5 s, a RabbitMQ restart kept one consumer's
/// partitions stalled 5 s after the broker was back (fault matrix,
/// `docs/reliability.md`); one retry a second is still no load.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Runs `config.consumers` consumers until `stop` is cancelled (a message
/// the database refuses by its content is dead-lettered after
/// `max_attempts` refusals: see the module docs); then each
/// finishes the batch in hand and returns. Unsettled events go back to the
/// broker for the next worker.
pub async fn run(
    backend: DynBackend,
    store: Store,
    metrics: Arc<Metrics>,
    config: WorkerConfig,
    max_attempts: u32,
    stop: CancellationToken,
) -> Result<(), fanout_backend::BackendError> {
    let mut tasks = Vec::new();
    for i in 0..config.consumers {
        let stream = backend
            .consume_incoming(ConsumeOptions {
                consumer_name: format!("worker-{}-{i}", std::process::id()),
                prefetch: config.prefetch,
            })
            .await?;
        let consumer = Arc::new(Consumer {
            backend: backend.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
            max_attempts: max_attempts.max(1),
        });
        let batch = config.batch_size as usize;
        tasks.push(tokio::spawn(async move {
            // Storing and routing overlap: one batch is published while the
            // next is stored, so a batch costs the longer of the two, not
            // their sum. One stored batch waits at most; settled in order.
            let (to_router, from_store) = tokio::sync::mpsc::channel::<Settle>(1);
            let router = tokio::spawn({
                let consumer = consumer.clone();
                async move { consumer.settle_all(from_store).await }
            });
            let mut batches = stream.ready_chunks(batch);
            loop {
                let next = tokio::select! {
                    _ = consumer.stop.cancelled() => break,
                    next = batches.next() => next,
                };
                let Some(items) = next else { break };
                let mut deliveries = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Ok(d) => deliveries.push(d),
                        Err(e) => {
                            tracing::warn!(error = %e, "incoming stream error; the backend retries")
                        }
                    }
                }
                consumer.process(deliveries, &to_router).await;
                if to_router.is_closed() {
                    break; // the router stopped: the broker redelivers the rest
                }
            }
            drop(to_router);
            if let Err(e) = router.await {
                tracing::error!(error = %e, "worker router task failed");
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "worker consumer task failed");
        }
    }
    Ok(())
}

struct Consumer {
    backend: DynBackend,
    store: Store,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    /// Refusals of one message (with the probe passing) before it is
    /// dead-lettered: `incoming.max_attempts`.
    max_attempts: u32,
}

/// A stored batch on its way out: its entries are routed, then its events
/// acked.
struct Settle {
    stored: Vec<crate::store::Stored>,
    deliveries: Vec<IncomingDelivery>,
}

/// What holding a batch until it is stored ended with.
enum Held {
    Stored(Vec<crate::store::Stored>),
    /// The database refused it with an error that may be about the data.
    BlamesData(StoreError),
    /// The worker is stopping.
    Stopped,
}

/// Why an event can never be processed. The envelope's own fields (the
/// version, and the id and sender the gateway set) are checked here; what
/// the client gave is checked by the gateway's own rules, once more.
fn poison_reason(env: &IncomingEnvelope) -> Option<&'static str> {
    let m = &env.message;
    if env.v != 1 {
        return Some("unknown envelope version");
    }
    if uuid::Uuid::try_parse(&m.id).is_err() {
        return Some("message id is not a UUID");
    }
    if !is_valid_id(&m.sender_id) {
        return Some("invalid sender id");
    }
    protocol::validate(&protocol::Unchecked::from_message(m), MAX_CONTENT_BYTES)
        .err()
        .map(protocol::Invalid::dead_letter_reason)
}

impl Consumer {
    /// Decodes and stores a batch and hands it to the router (`out`); an
    /// event bad by its content is dead-lettered here.
    async fn process(&self, deliveries: Vec<IncomingDelivery>, out: &Sender<Settle>) {
        let mut batch: Vec<(IncomingDelivery, Message)> = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let decoded: Result<IncomingEnvelope, String> =
                serde_json::from_slice(&d.event.payload)
                    .map_err(|e| format!("undecodable event: {e}"));
            match decoded.and_then(|env| match poison_reason(&env) {
                Some(why) => Err(why.to_owned()),
                None => Ok(env.message),
            }) {
                Ok(m) => batch.push((d, m)),
                Err(why) => self.dead_letter(d, &why).await,
            }
        }
        if batch.is_empty() {
            return;
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        let messages: Vec<Message> = batch.iter().map(|(_, m)| m.clone()).collect();
        let started = std::time::Instant::now();
        let stored = match self.store_held(&messages).await {
            Held::Stored(stored) => stored,
            Held::BlamesData(e) if batch.len() > 1 => {
                // The batch cannot say which message the database refuses:
                // store them one by one, in order, so only that one waits.
                tracing::warn!(error = %e, "batch insert refused; storing one by one");
                return self.process_one_by_one(batch, out).await;
            }
            Held::BlamesData(_) => return self.process_one_by_one(batch, out).await,
            Held::Stopped => return, // the broker redelivers
        };
        self.metrics
            .worker_store_seconds
            .observe(started.elapsed().as_secs_f64());
        let deliveries = batch.into_iter().map(|(d, _)| d).collect();
        // A closed router means stopping: the broker redelivers.
        let _ = out.send(Settle { stored, deliveries }).await;
    }

    /// Routes each stored batch, then acks its events, in the order they
    /// were stored; returns when the storing side is done or the worker
    /// stops (what is not acked then, the broker redelivers).
    async fn settle_all(&self, mut batches: Receiver<Settle>) {
        while let Some(Settle { stored, deliveries }) = batches.recv().await {
            let started = std::time::Instant::now();
            if !self.settle_stored(&stored).await {
                return;
            }
            self.metrics
                .worker_route_seconds
                .observe(started.elapsed().as_secs_f64());
            let acks = deliveries.into_iter().map(|d| d.ack());
            for r in futures::future::join_all(acks).await {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "ack failed; the event will be redelivered and deduplicated");
                }
            }
        }
    }

    /// Stores each message alone, in order. One the database refuses by
    /// its content (while it takes a probe) is tried `max_attempts` times,
    /// then dead-lettered; the messages behind it wait meanwhile.
    async fn process_one_by_one(
        &self,
        batch: Vec<(IncomingDelivery, Message)>,
        out: &Sender<Settle>,
    ) {
        for (d, m) in batch {
            let mut refusals = 0u32;
            let mut attempt = 0u32;
            let stored = loop {
                match self.store_held(std::slice::from_ref(&m)).await {
                    Held::Stored(stored) => break Ok(stored),
                    Held::Stopped => return,
                    Held::BlamesData(e) => match self.store.probe_insert().await {
                        Err(probe) => {
                            // The database refuses a made-up message too:
                            // its trouble, not this message's.
                            self.metrics.worker_retries.inc();
                            tracing::warn!(error = %e, probe = %probe, retry_in = ?backoff(attempt), "database refuses every message; retrying");
                        }
                        Ok(()) => {
                            refusals += 1;
                            self.metrics.worker_message_refusals.inc();
                            tracing::warn!(event = %d.event.id, refusals, max = self.max_attempts, error = %e, "database refuses this message (a probe message passes)");
                            if refusals >= self.max_attempts {
                                break Err(format!(
                                    "refused by the database {refusals} times: {e}"
                                ));
                            }
                        }
                    },
                }
                if !pause(&self.stop, &mut attempt).await {
                    return;
                }
            };
            let stored = match stored {
                Ok(stored) => stored,
                Err(why) => {
                    self.dead_letter(d, &why).await;
                    continue;
                }
            };
            let settle = Settle {
                stored,
                deliveries: vec![d],
            };
            if out.send(settle).await.is_err() {
                return; // stopping: the broker redelivers
            }
        }
    }

    async fn dead_letter(&self, d: IncomingDelivery, why: &str) {
        tracing::error!(event = %d.event.id, reason = %why, "event dead-lettered (`fanout dead-letters` lists, replays or drops it)");
        let id = d.event.id.clone();
        match d.dead_letter(why).await {
            Ok(()) => {
                self.metrics.dead_lettered.inc();
            }
            Err(e) => {
                tracing::warn!(event = %id, error = %e, "cannot dead-letter; the event will come back")
            }
        }
    }

    /// Counts stored messages and routes their entries (a client's retry
    /// is not routed: see [`Outcome::Retry`]); `false` if the worker
    /// stopped first.
    async fn settle_stored(&self, stored: &[crate::store::Stored]) -> bool {
        let mut routed = Vec::with_capacity(stored.len() * 2);
        for s in stored {
            match s.outcome {
                Outcome::New => self.metrics.messages_stored.inc(),
                Outcome::Redelivered | Outcome::Retry => self.metrics.messages_deduplicated.inc(),
            };
            if s.outcome != Outcome::Retry {
                routed.extend(s.entries.iter());
            }
        }
        self.route(&routed).await
    }

    /// Stores, retrying every error that does not blame the data in place
    /// (with capped backoff, uncounted) until it passes or the worker stops.
    /// A database outage, a read-only or full database therefore holds the
    /// batch unacked, in its place, rather than losing or dead-lettering it.
    async fn store_held(&self, messages: &[Message]) -> Held {
        let mut attempt = 0u32;
        loop {
            match self.store.insert_messages(messages).await {
                Ok(stored) => return Held::Stored(stored),
                Err(e) if e.blames_data() => return Held::BlamesData(e),
                Err(e) => {
                    self.metrics.worker_retries.inc();
                    tracing::warn!(error = %e, retry_in = ?backoff(attempt), "cannot store; holding the batch and retrying");
                    if !pause(&self.stop, &mut attempt).await {
                        return Held::Stopped;
                    }
                }
            }
        }
    }

    /// Publishes stored entries to their streams' route keys, retrying
    /// broker errors; `false` if the worker stopped first. All go out at
    /// once, issued in position order per key (a redelivered message's
    /// entries may come after newer ones in the batch), so a batch costs
    /// about one broker round trip. The broker may still deliver one that
    /// overtakes an earlier position (another worker's, or a retried
    /// publish): the gateway holds it until the earlier one comes
    /// (`fanout_entries_early_total`), so order costs latency there, never
    /// correctness. Waiting for each entry's confirm before publishing the
    /// next of its key cost a round trip per entry of the busiest key.
    async fn route(&self, entries: &[&Entry]) -> bool {
        let mut ordered: Vec<&Entry> = entries.to_vec();
        ordered.sort_by(|a, b| (&a.stream, a.seq).cmp(&(&b.stream, b.seq)));
        let mut sends = Vec::with_capacity(ordered.len());
        for entry in ordered {
            let env = OutgoingEnvelope::Entry(entry.clone());
            match serde_json::to_vec(&env) {
                Ok(p) => sends.push(self.publish_one(entry.stream.route_key(), p.into())),
                Err(e) => tracing::error!(error = %e, "cannot encode an outgoing entry"),
            }
        }
        futures::future::join_all(sends)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    async fn publish_one(&self, key: RouteKey, payload: bytes::Bytes) -> bool {
        let key = &key;
        let mut attempt = 0u32;
        loop {
            match self.backend.publish_outgoing(key, payload.clone()).await {
                Ok(RouteOutcome::Unroutable) => {
                    self.metrics.unroutable.inc();
                    return true;
                }
                Ok(_) => return true,
                Err(BackendError::Invalid(why)) => {
                    // Says something about the message, and no retry can
                    // change it; it is stored and stays in the history.
                    self.metrics.worker_publish_refused.inc();
                    tracing::error!(key = %key, reason = %why, "the broker refuses this outgoing message for good; it is stored but not delivered live");
                    return true;
                }
                Err(e) => {
                    self.metrics.worker_retries.inc();
                    tracing::warn!(key = %key, error = %e, retry_in = ?backoff(attempt), "outgoing publish failed; retrying");
                    if !pause(&self.stop, &mut attempt).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// The wait before retry `attempt` (0 is the first): [`BACKOFF_START`],
/// doubling each time, capped at [`BACKOFF_MAX`].
fn backoff(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    BACKOFF_START.saturating_mul(factor).min(BACKOFF_MAX)
}

/// Waits [`backoff`] of `attempt` and counts it; `false` if `stop` came
/// first (the worker is stopping).
async fn pause(stop: &CancellationToken, attempt: &mut u32) -> bool {
    let wait = backoff(*attempt);
    *attempt = attempt.saturating_add(1);
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn backoff_doubles_from_50_ms_to_a_1_s_cap() {
        let waits: Vec<u128> = (0..8).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(
            backoff(40),
            BACKOFF_MAX,
            "no overflow however long it lasts"
        );
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_wait_the_backoff_sequence_exactly() {
        let stop = CancellationToken::new();
        let mut attempt = 0;
        let started = Instant::now();
        let mut at = Vec::new();
        for _ in 0..7 {
            assert!(pause(&stop, &mut attempt).await);
            at.push(started.elapsed().as_millis());
        }
        assert_eq!(at, [50, 150, 350, 750, 1550, 2550, 3550]);
        assert_eq!(attempt, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_pause_at_once() {
        let stop = CancellationToken::new();
        let mut attempt = 10;
        let started = Instant::now();
        let cancel = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        });
        assert!(!pause(&stop, &mut attempt).await, "stopped, not waited out");
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }
}
