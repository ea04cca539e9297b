//! The consumer group: every stream's group, the consumer's membership and
//! leases (one maintenance script), the take-over of a newly acquired
//! partition's pending entries, releasing a drained partition and leaving.

use std::collections::VecDeque;
use std::time::Duration;

use fanout_backend::BackendError;
use redis::Value;
use tokio::time::Instant;

use crate::keys::GROUP;
use crate::{lock, Inner};

use super::{
    as_int, as_str, event_from, fields, Consumer, Entry, EntryId, Part, Phase, CLAIM_BATCH,
    MAINTENANCE, READ_BLOCK,
};

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
        let mut inv = inner.scripts.maintain.key(inner.keys.consumers());
        for p in 0..inner.config.partitions {
            inv.key(inner.keys.lease(p));
        }
        inv.arg(&self.token)
            .arg(inner.config.lease_ttl.as_millis() as u64);
        let mut conn = inner.conn();
        let statuses: Vec<i64> = inner.run(inv.invoke_async(&mut conn)).await?;
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
            let inner = self.inner.clone();
            let mut conn = inner.conn();
            let _: i64 = inner
                .run(
                    inner
                        .scripts
                        .release
                        .key(inner.keys.stream(p))
                        .key(inner.keys.lease(p))
                        .arg(GROUP)
                        .arg(&self.token)
                        .arg(inner.config.claim_idle.as_millis() as u64)
                        .invoke_async(&mut conn),
                )
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
            let mut conn = inner.conn();
            let reply: Value = inner
                .run(
                    inner
                        .scripts
                        .claim
                        .key(inner.keys.stream(p))
                        .arg(GROUP)
                        .arg(&self.token)
                        .arg(inner.config.claim_idle.as_millis() as u64)
                        .arg(permits.min(CLAIM_BATCH))
                        .arg(&start)
                        .invoke_async(&mut conn),
                )
                .await?;
            let Value::Array(parts) = reply else {
                continue;
            };
            let status = parts.first().and_then(as_str).unwrap_or("done").to_owned();
            let last = parts.get(1).and_then(as_str).unwrap_or("").to_owned();
            let mut claimed = Vec::new();
            if let Some(Value::Array(entries)) = parts.get(2) {
                for e in entries {
                    let Value::Array(e) = e else { continue };
                    let (Some(id), Some(f), attempt) = (
                        e.first().and_then(as_str).and_then(EntryId::parse),
                        e.get(1).map(fields),
                        e.get(2)
                            .and_then(as_int)
                            .and_then(|n| u32::try_from(n).ok())
                            .unwrap_or(2),
                    ) else {
                        continue;
                    };
                    match event_from(&f) {
                        Some(event) => claimed.push(Entry { id, event, attempt }),
                        None => self.malformed(p, id).await,
                    }
                }
            }
            if !claimed.is_empty() {
                tracing::info!(consumer = %self.token, partition = p, claimed = claimed.len(), "took over pending entries");
            }
            for entry in claimed {
                self.send(p, entry);
            }
            let next_start = if last.is_empty() {
                start
            } else {
                format!("({last}")
            };
            let poll = (self.inner.config.claim_idle / 10)
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            if let Some(part) = self.held.get_mut(&p) {
                part.phase = match status.as_str() {
                    "more" => Phase::Claiming {
                        start: next_start,
                        retry_at: Instant::now(),
                    },
                    "wait" => Phase::Claiming {
                        start: next_start,
                        retry_at: Instant::now() + poll,
                    },
                    _ => Phase::Reading,
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
        let mut inv = inner.scripts.leave.key(inner.keys.consumers());
        for p in 0..inner.config.partitions {
            inv.key(inner.keys.stream(p)).key(inner.keys.lease(p));
        }
        inv.arg(GROUP)
            .arg(&self.token)
            .arg(inner.config.claim_idle.as_millis() as u64);
        let mut conn = inner.conn();
        let left: Result<i64, BackendError> = inner.run(inv.invoke_async(&mut conn)).await;
        if let Err(e) = left {
            tracing::warn!(consumer = %self.token, error = %e, "could not leave the group; leases expire after lease_ttl");
        }
        self.held.clear();
    }
}
