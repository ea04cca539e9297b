//! Dead letters: listing them without removing any, replaying and dropping
//! them, and dead-lettering an entry no worker could process.

use fanout_backend::{
    partition_for, BackendError, DeadLetter, DeadLetterAction, DeadLetterSelection,
};
use redis::Value;

use crate::reply::{self, EntryId};
use crate::scripts::SettleMode;
use crate::Inner;

use super::Consumer;

pub(crate) async fn dead_letters(
    inner: &Inner,
    limit: usize,
) -> Result<Vec<DeadLetter>, BackendError> {
    let all = DeadLetterSelection { ids: None, limit };
    Ok(read_dead(inner, &all)
        .await?
        .into_iter()
        .map(|(_, d)| d)
        .collect())
}

/// Dead letters read per round trip while scanning for a selection.
const DEAD_SCAN_PAGE: usize = 500;

/// The dead letters `selection` picks, oldest first, with their entry ids
/// in the dead-letter stream.
async fn read_dead(
    inner: &Inner,
    selection: &DeadLetterSelection,
) -> Result<Vec<(String, DeadLetter)>, BackendError> {
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    let mut conn = inner.conn();
    while out.len() < selection.limit {
        let page = if selection.ids.is_none() {
            (selection.limit - out.len()).min(DEAD_SCAN_PAGE)
        } else {
            DEAD_SCAN_PAGE
        };
        let reply: Value = inner
            .run(
                redis::cmd("XRANGE")
                    .arg(inner.keys.dead())
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(page)
                    .query_async(&mut conn),
            )
            .await?;
        let Value::Array(entries) = reply else { break };
        let n = entries.len();
        for (entry_id, f) in entries.iter().filter_map(reply::range_entry) {
            start = format!("({entry_id}");
            let Some(dead) = f.dead_letter() else {
                tracing::warn!(entry = entry_id, "skipped a malformed dead letter");
                continue;
            };
            if out.len() >= selection.limit || !selection.matches(&dead.event.id) {
                continue;
            }
            out.push((entry_id.to_owned(), dead));
        }
        if n < page {
            break;
        }
    }
    Ok(out)
}

/// Replays (the REPLAY script: out of the dead letters and into the
/// partition stream atomically) or drops (XDEL) the selected dead letters.
/// A dead letter another call removed meanwhile is skipped.
pub(crate) async fn resolve_dead_letters(
    inner: &Inner,
    selection: &DeadLetterSelection,
    action: DeadLetterAction,
) -> Result<Vec<DeadLetter>, BackendError> {
    let mut done = Vec::new();
    let mut conn = inner.conn();
    for (entry_id, dead) in read_dead(inner, selection).await? {
        let removed: i64 = match action {
            DeadLetterAction::Replay => {
                let partition = partition_for(&dead.event.ordering_key, inner.config.partitions);
                let replay = &inner.scripts.replay;
                replay
                    .call(inner, &entry_id, partition, &dead.event)
                    .await?
            }
            DeadLetterAction::Drop => {
                inner
                    .run(
                        redis::cmd("XDEL")
                            .arg(inner.keys.dead())
                            .arg(&entry_id)
                            .query_async(&mut conn),
                    )
                    .await?
            }
        };
        if removed > 0 {
            done.push(dead);
        }
    }
    Ok(done)
}

impl Consumer {
    /// An entry this backend did not write (or a corrupted one): nothing a
    /// worker can process, so it goes to the dead-letter stream at once.
    pub(super) async fn malformed(&self, p: u32, id: EntryId) {
        tracing::warn!(partition = p, entry = %id, "malformed incoming entry; dead-lettering it");
        let inner = &self.inner;
        let result = inner
            .scripts
            .settle
            .call(
                inner,
                p,
                &self.token,
                id,
                SettleMode::Dead,
                "malformed entry",
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not dead-letter a malformed entry");
        }
    }
}
