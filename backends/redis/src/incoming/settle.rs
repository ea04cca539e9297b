//! Settling one delivery (ack, reject, dead-letter, each only while this
//! consumer still holds the entry) and redelivering what the consumer holds:
//! rejected entries, deliveries dropped unsettled, settles that failed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fanout_backend::{BackendError, IncomingDelivery, Settle};
use redis::Value;
use tokio::sync::OwnedSemaphorePermit;

use crate::keys::GROUP;
use crate::reply::{self, EntryId, Redelivered};
use crate::scripts::{SettleMode, Settled};
use crate::{lock, Counters, Inner};

use super::{Consumer, Entry, Shared};

impl Consumer {
    /// Yields buffered entries and redeliveries while permits last, the
    /// lowest id of each partition first, partitions in turn.
    pub(super) async fn deliver(&mut self) -> Result<bool, BackendError> {
        let mut progress = false;
        loop {
            // A closed stream would drop each delivery at once and queue it
            // again, bumping its count each time: stop, the task is leaving.
            if self.tx.is_closed()
                || self.shared.permits.available_permits() == 0
                || self.held.is_empty()
            {
                return Ok(progress);
            }
            let order: Vec<u32> = {
                let (after, before): (Vec<u32>, Vec<u32>) =
                    self.held.keys().partition(|&&p| p >= self.cursor);
                after.into_iter().chain(before).collect()
            };
            let mut did = false;
            for p in order {
                let next_redeliver = lock(&self.shared.parts)
                    .get(&p)
                    .and_then(|s| s.redeliver.first().copied());
                let Some(part) = self.held.get(&p) else {
                    continue;
                };
                let next_ready = part.ready.front().map(|e| e.id);
                match (next_redeliver, next_ready) {
                    (Some(r), f) if f.is_none_or(|f| r < f) => {
                        if let Some(s) = lock(&self.shared.parts).get_mut(&p) {
                            s.redeliver.remove(&r);
                        }
                        if let Err(e) = self.redeliver(p, r).await {
                            // Keep it for the next try.
                            if let Some(s) = lock(&self.shared.parts).get_mut(&p) {
                                s.redeliver.insert(r);
                            }
                            return Err(e);
                        }
                    }
                    (_, Some(_)) => {
                        let entry = self
                            .held
                            .get_mut(&p)
                            .and_then(|part| part.ready.pop_front());
                        if let Some(entry) = entry {
                            self.send(p, entry);
                        }
                    }
                    _ => continue,
                }
                self.cursor = p + 1;
                did = true;
                break;
            }
            if !did {
                return Ok(progress);
            }
            progress = true;
        }
    }

    /// Delivers again one entry this consumer holds (the REDELIVER script).
    async fn redeliver(&mut self, p: u32, id: EntryId) -> Result<(), BackendError> {
        let inner = self.inner.clone();
        // `Gone`: acked meanwhile, or now another consumer's.
        if let Redelivered::Again { event, attempt } = inner
            .scripts
            .redeliver
            .call(&inner, p, &self.token, id)
            .await?
        {
            match event {
                Some(event) => self.send(p, Entry { id, event, attempt }),
                None => self.malformed(p, id).await,
            }
        }
        Ok(())
    }

    /// After a failed read: entries pending on us that we do not know about
    /// are queued for redelivery (their count goes up: Redis did deliver
    /// them once).
    pub(super) async fn resync_pending(&mut self) -> Result<(), BackendError> {
        let partitions: Vec<u32> = self.held.keys().copied().collect();
        for p in partitions {
            let inner = self.inner.clone();
            let mut conn = inner.conn();
            let pending: Value = inner
                .run(
                    redis::cmd("XPENDING")
                        .arg(inner.keys.stream(p))
                        .arg(GROUP)
                        .arg("-")
                        .arg("+")
                        .arg(1000)
                        .arg(&self.token)
                        .query_async(&mut conn),
                )
                .await?;
            let buffered: BTreeSet<EntryId> = self
                .held
                .get(&p)
                .map(|part| part.ready.iter().map(|e| e.id).collect())
                .unwrap_or_default();
            let mut parts = lock(&self.shared.parts);
            let Some(s) = parts.get_mut(&p) else { continue };
            for id in reply::pending_ids(&pending) {
                if !s.inflight.contains(&id) && !buffered.contains(&id) {
                    s.redeliver.insert(id);
                }
            }
        }
        self.resync = false;
        Ok(())
    }

    /// Yields one delivery; it holds a permit until settled.
    pub(super) fn send(&mut self, p: u32, entry: Entry) {
        let permit = match self.shared.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Callers check the permits first; if none is left, keep the
                // entry for later rather than exceed the prefetch.
                if let Some(part) = self.held.get_mut(&p) {
                    part.ready.push_front(entry);
                }
                return;
            }
        };
        if let Some(s) = lock(&self.shared.parts).get_mut(&p) {
            s.inflight.insert(entry.id);
        }
        let settle = RedisSettle {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            token: self.token.clone(),
            partition: p,
            id: entry.id,
            settled: AtomicBool::new(false),
            permit: Mutex::new(Some(permit)),
        };
        let delivery = IncomingDelivery::new(entry.event, p, entry.attempt, Box::new(settle));
        // If the stream is gone, the delivery drops here and its settle
        // queues it for redelivery; the task then leaves and hands over.
        let _ = self.tx.send(Ok(delivery));
    }
}

/// Settles one delivery. Every path ends in [`RedisSettle::finish`], which
/// updates the task's bookkeeping, frees the permit and wakes the task.
struct RedisSettle {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    token: String,
    partition: u32,
    id: EntryId,
    settled: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl RedisSettle {
    /// `requeue`: the entry is still ours in Redis and must be delivered
    /// again (rejected, or the settle failed).
    fn finish(&self, requeue: bool) {
        if let Some(s) = lock(&self.shared.parts).get_mut(&self.partition) {
            s.inflight.remove(&self.id);
            if requeue {
                s.redeliver.insert(self.id);
            }
        }
        // Freed before the wake-up, so the woken task sees the permit.
        drop(lock(&self.permit).take());
        self.shared.wake.notify_one();
    }

    fn first_settle(&self) -> Result<(), BackendError> {
        if self.settled.swap(true, Ordering::AcqRel) {
            // IncomingDelivery consumes itself on settle, so this is only
            // reachable through a second settle of the same Settle object.
            return Err(BackendError::Invalid("delivery already settled".into()));
        }
        Ok(())
    }

    async fn run_settle(&self, mode: SettleMode, reason: &str) -> Result<Settled, BackendError> {
        let inner = &self.inner;
        let (p, token) = (self.partition, &self.token);
        inner
            .scripts
            .settle
            .call(inner, p, token, self.id, mode, reason)
            .await
    }
}

#[async_trait]
impl Settle for RedisSettle {
    async fn ack(&self) -> Result<(), BackendError> {
        self.first_settle()?;
        if let Err(e) = self.inner.check_open() {
            self.finish(false);
            return Err(e);
        }
        let mut conn = self.inner.conn();
        let acked: Result<i64, BackendError> = self
            .inner
            .run(
                redis::cmd("XACK")
                    .arg(self.inner.keys.stream(self.partition))
                    .arg(GROUP)
                    .arg(self.id.to_string())
                    .query_async(&mut conn),
            )
            .await;
        // Removed from the in-flight set only after the XACK landed, so a
        // partition is never released with an ack still on its way.
        self.finish(acked.is_err());
        acked.map(|_| ())
    }

    async fn reject(&self) -> Result<(), BackendError> {
        self.first_settle()?;
        if let Err(e) = self.inner.check_open() {
            self.finish(false);
            return Err(e);
        }
        match self.run_settle(SettleMode::Reject, "").await {
            Ok(outcome) => {
                self.finish(outcome == Settled::Requeue);
                Ok(())
            }
            Err(e) => {
                self.finish(true);
                Err(e)
            }
        }
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BackendError> {
        self.first_settle()?;
        if let Err(e) = self.inner.check_open() {
            self.finish(false);
            return Err(e);
        }
        match self.run_settle(SettleMode::Dead, reason).await {
            Ok(outcome) => {
                if outcome == Settled::Dead {
                    Counters::bump(&self.inner.counters.dead_lettered, 1);
                }
                self.finish(false);
                Ok(())
            }
            Err(e) => {
                self.finish(true);
                Err(e)
            }
        }
    }
}

impl Drop for RedisSettle {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            // Neither acked, rejected nor dead-lettered: deliver it again
            // (the task's redelivery bumps its count), and if the consumer
            // stream is gone, the hand-over passes it to the next owner.
            tracing::warn!(partition = self.partition, entry = %self.id, "delivery dropped unsettled; it will be delivered again");
            self.finish(true);
        }
    }
}
