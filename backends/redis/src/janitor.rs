//! The janitor: what a crashed process leaves behind, cleaned by the
//! survivors.
//!
//! Every backend value tries every `liveness_ttl / 4`; a lock (`SET NX`,
//! expiring after half a period) lets one of them do the work and the others
//! skip, so its cost does not grow with the number of gateways and workers.
//! The lock expires before its holder's next tick, so runs are never more
//! than a period apart while any instance lives, and at most 1.5 periods
//! apart when the last holder just died. One run:
//!
//! 1. for every server id in `{ns}:servers` whose liveness key is gone,
//!    removes its routes in batches (the script refuses as soon as a
//!    liveness key reappears: the id was registered again);
//! 2. trims every incoming stream behind its consumer group (never an
//!    unacked entry);
//! 3. deletes group consumers that left (not in `{ns}:consumers`, nothing
//!    pending, idle for two lease TTLs), so the group does not grow a
//!    consumer per worker restart.
//!
//! A server that dies without deregistering keeps its routes until its
//! liveness key expires (between 2/3 and 1 × `liveness_ttl` after its death:
//! it refreshes every third of the TTL) and then until the next janitor run
//! (at most 1.5 periods, `0.375 × liveness_ttl`, later): the stale-route
//! window is at most `1.375 × liveness_ttl` plus one run (13.75 s with the
//! default 10 s).

use std::sync::Arc;
use std::time::Duration;

use fanout_backend::BackendError;

use crate::outgoing::cleanup;
use crate::{Counters, Inner};

/// What one janitor run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JanitorReport {
    /// Servers found without a liveness key, whose routes were removed.
    pub stale_servers: u64,
    /// Routes removed from those servers.
    pub routes_removed: u64,
    /// Acked entries trimmed from the incoming streams.
    pub entries_trimmed: u64,
    /// Departed consumers removed from the consumer groups.
    pub consumers_removed: u64,
}

/// The janitor's period.
pub(crate) fn period(inner: &Inner) -> Duration {
    inner.config.liveness_ttl / 4
}

pub(crate) fn start(inner: &Arc<Inner>) {
    let task_inner = inner.clone();
    inner.spawn(async move {
        let inner = task_inner;
        let period = period(&inner);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = inner.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match take_lock(&inner, period / 2).await {
                Ok(true) => {
                    if let Err(e) = run_once(&inner).await {
                        tracing::warn!(error = %e, "janitor run failed");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "janitor lock unavailable"),
            }
        }
    });
}

/// `SET NX PX hold`: one winner per period per namespace. The lock is
/// never released; it expires before the winner's next tick, so the winner
/// (or anyone else) can run again next period.
async fn take_lock(inner: &Inner, hold: Duration) -> Result<bool, BackendError> {
    let mut conn = inner.conn();
    let set: Option<String> = inner
        .run(
            redis::cmd("SET")
                .arg(inner.keys.janitor_lock())
                .arg(&inner.instance)
                .arg("NX")
                .arg("PX")
                .arg(hold.as_millis().max(1) as u64)
                .query_async(&mut conn),
        )
        .await?;
    Ok(set.is_some())
}

pub(crate) async fn run_once(inner: &Inner) -> Result<JanitorReport, BackendError> {
    let mut report = JanitorReport::default();
    let mut conn = inner.conn();
    let servers: Vec<String> = inner
        .run(
            redis::cmd("SMEMBERS")
                .arg(inner.keys.servers())
                .query_async(&mut conn),
        )
        .await?;
    for server in servers {
        // "janitor" mode: refused (None) while the liveness key exists.
        if let Some(removed) = cleanup(inner, &server, "", "janitor").await? {
            report.stale_servers += 1;
            report.routes_removed += removed;
            tracing::info!(server = %server, routes = removed, "removed the routes of a server whose liveness expired");
        }
    }
    Counters::bump(
        &inner.counters.janitor_servers_cleaned,
        report.stale_servers,
    );
    Counters::bump(
        &inner.counters.janitor_routes_removed,
        report.routes_removed,
    );

    let min_idle = inner.config.lease_ttl * 2;
    let live: Vec<String> = inner
        .run(
            redis::cmd("ZRANGE")
                .arg(inner.keys.consumers())
                .arg(0)
                .arg(-1)
                .query_async(&mut conn),
        )
        .await?;
    for p in 0..inner.config.partitions {
        report.entries_trimmed += inner.scripts.trim.call(inner, p).await?;
        report.consumers_removed += inner
            .scripts
            .gc_consumers
            .call(inner, p, min_idle, &live)
            .await?;
    }
    Ok(report)
}
