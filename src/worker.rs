//! The worker: consumes the incoming side, stores each message once, routes
//! it to the outgoing side, then acks.
//!
//! Order of work for a batch (as many deliveries as are ready, up to
//! `worker.batch_size`): decode and re-validate (poison goes to the
//! dead-letter place at once), store all in one statement, publish (in
//! order per route key, keys concurrently), ack. Nothing is acked before it is stored and published;
//! a crash anywhere means redelivery, which the store's idempotency and the
//! gateways' duplicate windows absorb.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use fanout_backend::{
    is_valid_id, ConsumeOptions, DynBackend, IncomingDelivery, RouteKey, RouteOutcome,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use crate::protocol::{
    is_valid_client_msg_id, IncomingEnvelope, Message, OutgoingEnvelope, Target,
};
use crate::store::{Outcome, Store, StoreError};

/// Largest content a worker accepts, whatever the gateways' limit: a
/// backstop against an event no gateway should have published.
const MAX_CONTENT_BYTES: usize = crate::config::MAX_CONTENT_BYTES_CEILING;
const BACKOFF_START: Duration = Duration::from_millis(50);
/// A consumer retrying a store or a publish holds its batch and takes no
/// other: the cap is how long it may stay idle after the database or the
/// broker is back. At 5 s, a RabbitMQ restart kept one consumer's
/// partitions stalled 5 s after the broker was back (fault matrix,
/// `docs/reliability.md`); one retry a second is still no load.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Runs `config.consumers` consumers until `stop` is cancelled; then each
/// finishes the batch in hand and returns. Unsettled events go back to the
/// broker for the next worker.
pub async fn run(
    backend: DynBackend,
    store: Store,
    metrics: Arc<Metrics>,
    config: WorkerConfig,
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
        let consumer = Consumer {
            backend: backend.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        let batch = config.batch_size as usize;
        tasks.push(tokio::spawn(async move {
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
                consumer.process(deliveries).await;
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
}

/// Why an event can never be processed.
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
    let target_ok = match &m.target {
        Target::User(u) => is_valid_id(u),
        Target::Channel(c) => is_valid_id(c),
    };
    if !target_ok {
        return Some("invalid target id");
    }
    if m.content.is_empty() || m.content.len() > MAX_CONTENT_BYTES || m.content.contains('\0') {
        return Some("invalid content");
    }
    if m.client_msg_id
        .as_deref()
        .is_some_and(|c| !is_valid_client_msg_id(c))
    {
        return Some("invalid clientMsgId");
    }
    None
}

impl Consumer {
    async fn process(&self, deliveries: Vec<IncomingDelivery>) {
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
                Err(why) => {
                    tracing::error!(event = %d.event.id, reason = %why, "poison event dead-lettered");
                    self.metrics.dead_lettered.inc();
                    if let Err(e) = d.dead_letter(&why).await {
                        tracing::warn!(error = %e, "cannot dead-letter; the event will come back");
                    }
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        let messages: Vec<Message> = batch.iter().map(|(_, m)| m.clone()).collect();
        let stored = match self.store_batch(&messages).await {
            Some(Ok(stored)) => stored,
            Some(Err(e)) => {
                // Not a passing failure, and the batch cannot say which
                // event caused it: store them one by one, so only the
                // guilty one is rejected (and dead-lettered in the end).
                tracing::warn!(error = %e, "batch insert failed; storing one by one");
                return self.process_one_by_one(batch).await;
            }
            None => return, // stopping: the broker redelivers
        };
        if !self.settle_stored(&stored).await {
            return; // stopping: the broker redelivers
        }
        let acks = batch.into_iter().map(|(d, _)| d.ack());
        for r in futures::future::join_all(acks).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "ack failed; the event will be redelivered and deduplicated");
            }
        }
    }

    async fn process_one_by_one(&self, batch: Vec<(IncomingDelivery, Message)>) {
        for (d, m) in batch {
            match self.store_batch(std::slice::from_ref(&m)).await {
                None => return,
                Some(Ok(stored)) => {
                    if !self.settle_stored(&stored).await {
                        return;
                    }
                    let _ = d.ack().await;
                }
                Some(Err(e)) => {
                    tracing::error!(event = %d.event.id, attempt = d.attempt, error = %e, "cannot store event; rejecting it");
                    let _ = d.reject().await;
                }
            }
        }
    }

    /// Counts and routes stored messages (a client's retry is not routed:
    /// see [`Outcome::Retry`]); `false` if the worker stopped first.
    async fn settle_stored(&self, stored: &[crate::store::Stored]) -> bool {
        let mut routed = Vec::with_capacity(stored.len());
        for s in stored {
            match s.outcome {
                Outcome::New => self.metrics.messages_stored.inc(),
                Outcome::Redelivered | Outcome::Retry => self.metrics.messages_deduplicated.inc(),
            };
            if s.outcome != Outcome::Retry {
                routed.push(&s.message);
            }
        }
        self.route(&routed).await
    }

    /// Stores, retrying passing failures until they pass or the worker
    /// stops (`None`). A database outage therefore holds the batch unacked
    /// rather than losing or dead-lettering it.
    async fn store_batch(
        &self,
        messages: &[Message],
    ) -> Option<Result<Vec<crate::store::Stored>, StoreError>> {
        let mut backoff = BACKOFF_START;
        loop {
            match self.store.insert_messages(messages).await {
                Err(e) if e.is_temporary() => {
                    self.metrics.worker_retries.inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "database unavailable; retrying");
                    if !self.pause(&mut backoff).await {
                        return None;
                    }
                }
                other => return Some(other),
            }
        }
    }

    /// Publishes stored messages to their route keys, retrying broker
    /// errors; `false` if the worker stopped first. Messages to one key go
    /// out one after another in batch order (that is the conversation's
    /// order); different keys go out concurrently, so a batch costs about
    /// one round trip per message to its busiest key, not one per message.
    async fn route(&self, messages: &[&Message]) -> bool {
        let mut per_key: HashMap<RouteKey, Vec<bytes::Bytes>> = HashMap::new();
        for message in messages {
            let env = OutgoingEnvelope::Message {
                message: (*message).clone(),
            };
            let payload = match serde_json::to_vec(&env) {
                Ok(p) => bytes::Bytes::from(p),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode an outgoing message");
                    continue;
                }
            };
            for key in message.route_keys() {
                per_key.entry(key).or_default().push(payload.clone());
            }
        }
        let sends = per_key.into_iter().map(|(key, payloads)| async move {
            for payload in payloads {
                if !self.publish_one(&key, payload).await {
                    return false;
                }
            }
            true
        });
        futures::future::join_all(sends)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    async fn publish_one(&self, key: &RouteKey, payload: bytes::Bytes) -> bool {
        let mut backoff = BACKOFF_START;
        loop {
            match self.backend.publish_outgoing(key, payload.clone()).await {
                Ok(RouteOutcome::Unroutable) => {
                    self.metrics.unroutable.inc();
                    return true;
                }
                Ok(_) => return true,
                Err(e) => {
                    self.metrics.worker_retries.inc();
                    tracing::warn!(key = %key, error = %e, retry_in = ?backoff, "outgoing publish failed; retrying");
                    if !self.pause(&mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Sleeps `backoff` (then doubles it); `false` if the worker stopped.
    async fn pause(&self, backoff: &mut Duration) -> bool {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}
