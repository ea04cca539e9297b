//! The consumer group: every stream's group, the consumer's membership and
//! leases (one maintenance script), the take-over of a newly acquired
//! partition's pending entries, releasing a drained partition and leaving.

use std::collections::VecDeque;
use std::time::Duration;

use fanout_backend::BackendError;
use tokio::time::Instant;

use crate::keys::GROUP;
use crate::reply::{ClaimStatus, ReadEntry};
use crate::{lock, Inner};

use super::{Consumer, Entry, Part, Phase, CLAIM_BATCH, MAINTENANCE, READ_BLOCK};

/// Creates the consumer group of every partition's stream (and the stream),
/// from id 0: events appended before the group existed are delivered too.
pub(crate) async fn ensure_groups(inner: &Inner) -> Result<(), BackendError> {
    for p in 0..inner.config.partitions {
        let mut conn = inner.conn();
        let created: Result<(), BackendError> = inner
            .run(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(inner.keys.stream(p))
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn),
            )
            .await;
        match created {
            Ok(()) => {}
            Err(BackendError::Refused(m)) if m.contains("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Consumer {
    /// Heartbeat, lease renewal and acquisition (the MAINTAIN script).
    pub(super) async fn maintain(&mut self) -> Result<(), BackendError> {
        let started = Instant::now();
        self.next_maintenance = started + MAINTENANCE;
        let inner = self.inner.clone();
        let statuses = inner.scripts.maintain.call(&inner, &self.token).await?;
        // A lease is only ours once a replica has it: one lost in a
        // failover would let two consumers read one partition.
        if statuses.contains(&3) {
            inner.replicated(&inner.keys.consumers()).await?;
        }
        // The renewal happened after `started`, so the leases last at least
        // until `started + lease_ttl`; stop reading well before.
        let margin = inner.config.lease_ttl / 4 + READ_BLOCK;
        self.lease_valid_until = Some(started + inner.config.lease_ttl.saturating_sub(margin));
        for (p, status) in statuses.into_iter().enumerate() {
            let p = p as u32;
            match status {
                1..=3 => {
                    let releasing = status == 2;
                    match self.held.get_mut(&p) {
                        Some(part) => part.releasing = releasing,
                        None => {
                            self.held.insert(
                                p,
                                Part {
                                    phase: Phase::Claiming {
                                        start: "-".to_owned(),
                                        retry_at: Instant::now(),
                                    },
                                    releasing,
                                    ready: VecDeque::new(),
                                },
                            );
                            lock(&self.shared.parts).entry(p).or_default();
                            tracing::debug!(consumer = %self.token, partition = p, "partition acquired");
                        }
                    }
                }
                _ => {
                    if self.held.remove(&p).is_some() {
                        // Our lease expired and someone else may own it now:
                        // whatever we buffered stays pending on us and is
                        // taken over by the next owner.
                        lock(&self.shared.parts).remove(&p);
                        tracing::warn!(consumer = %self.token, partition = p, "partition lease lost");
                    }
                }
            }
        }
        Ok(())
    }

    /// Releases partitions that are no longer desired and have nothing
    /// unsettled or buffered.
    pub(super) async fn release_drained(&mut self) -> Result<bool, BackendError> {
        let drained: Vec<u32> = {
            let parts = lock(&self.shared.parts);
            self.held
                .iter()
                .filter(|(p, part)| {
                    part.releasing
                        && part.ready.is_empty()
                        && parts
                            .get(p)
                            .is_none_or(|s| s.inflight.is_empty() && s.redeliver.is_empty())
                })
                .map(|(p, _)| *p)
                .collect()
        };
        for &p in &drained {
            let inner = &self.inner;
            inner
                .scripts
                .handover
                .release(inner, p, &self.token)
                .await?;
            self.held.remove(&p);
            lock(&self.shared.parts).remove(&p);
            tracing::debug!(consumer = %self.token, partition = p, "partition released");
        }
        Ok(!drained.is_empty())
    }

    /// Takes over pending entries of newly acquired partitions (the CLAIM
    /// script), in order, as far as permits allow.
    pub(super) async fn claim(&mut self) -> Result<bool, BackendError> {
        if !self.lease_valid(Duration::ZERO) {
            return Ok(false);
        }
        let now = Instant::now();
        let due: Vec<(u32, String)> = self
            .held
            .iter()
            .filter_map(|(p, part)| match &part.phase {
                Phase::Claiming { start, retry_at } if !part.releasing && *retry_at <= now => {
                    Some((*p, start.clone()))
                }
                _ => None,
            })
            .collect();
        let mut progress = false;
        for (p, start) in due {
            let permits = self.shared.permits.available_permits();
            if permits == 0 || self.tx.is_closed() {
                break;
            }
            let inner = self.inner.clone();
            let batch = permits.min(CLAIM_BATCH);
            let Some(reply) = inner
                .scripts
                .claim
                .call(&inner, p, &self.token, batch, &start)
                .await?
            else {
                continue;
            };
            let mut claimed = Vec::new();
            for (ReadEntry { id, event }, attempt) in reply.entries {
                match event {
                    Some(event) => claimed.push(Entry { id, event, attempt }),
                    None => self.malformed(p, id).await,
                }
            }
            if !claimed.is_empty() {
                tracing::info!(consumer = %self.token, partition = p, claimed = claimed.len(), "took over pending entries");
            }
            for entry in claimed {
                self.send(p, entry);
            }
            let next_start = if reply.last.is_empty() {
                start
            } else {
                format!("({}", reply.last)
            };
            let poll = (self.inner.config.claim_idle / 10)
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            if let Some(part) = self.held.get_mut(&p) {
                part.phase = match reply.status {
                    ClaimStatus::More => Phase::Claiming {
                        start: next_start,
                        retry_at: Instant::now(),
                    },
                    ClaimStatus::Wait => Phase::Claiming {
                        start: next_start,
                        retry_at: Instant::now() + poll,
                    },
                    ClaimStatus::Done => Phase::Reading,
                };
            }
            progress = true;
        }
        Ok(progress)
    }

    /// Leaves the group: hands over every pending entry and lease at once,
    /// so the next owner does not wait for leases to expire.
    pub(super) async fn leave(&mut self) {
        let inner = self.inner.clone();
        let left = inner.scripts.handover.leave(&inner, &self.token).await;
        if let Err(e) = left {
            tracing::warn!(consumer = %self.token, error = %e, "could not leave the group; leases expire after lease_ttl");
        }
        self.held.clear();
    }
}
