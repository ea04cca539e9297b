//! Dead letters: listing them without removing any, replaying and dropping
//! them, and dead-lettering an entry no worker could process.

use fanout_backend::{
    partition_for, BackendError, DeadLetter, DeadLetterAction, DeadLetterSelection,
};
use redis::Value;

use crate::keys::GROUP;
use crate::Inner;

use super::{as_int, as_str, event_from, fields, Consumer, EntryId};

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
        for entry in &entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(entry_id), Some(fv)) = (parts.first().and_then(as_str), parts.get(1)) else {
                continue;
            };
            start = format!("({entry_id}");
            let f = fields(fv);
            let Some(event) = event_from(&f) else {
                tracing::warn!(entry = entry_id, "skipped a malformed dead letter");
                continue;
            };
            if out.len() >= selection.limit || !selection.matches(&event.id) {
                continue;
            }
            let dead = DeadLetter {
                event,
                reason: f
                    .get("reason")
                    .and_then(|v| as_str(v))
                    .unwrap_or_default()
                    .to_owned(),
                attempts: f
                    .get("attempts")
                    .and_then(|v| as_int(v))
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0),
            };
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
                inner
                    .run(
                        inner
                            .scripts
                            .replay
                            .key(inner.keys.dead())
                            .key(inner.keys.stream(partition))
                            .arg(&entry_id)
                            .arg(&dead.event.id)
                            .arg(dead.event.ordering_key.as_str())
                            .arg(dead.event.payload.as_ref())
                            .invoke_async(&mut conn),
                    )
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
        let mut conn = inner.conn();
        let result: Result<String, BackendError> = inner
            .run(
                inner
                    .scripts
                    .settle
                    .key(inner.keys.stream(p))
                    .key(inner.keys.dead())
                    .arg(GROUP)
                    .arg(&self.token)
                    .arg(id.to_string())
                    .arg("dead")
                    .arg("malformed entry")
                    .arg(p)
                    .invoke_async(&mut conn),
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not dead-letter a malformed entry");
        }
    }
}
