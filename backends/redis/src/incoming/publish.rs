//! Appending an incoming event to its partition stream: the reply to XADD
//! is Redis' acknowledgement that the event is stored.

use fanout_backend::{partition_for, BackendError, IncomingEvent};

use crate::Inner;

pub(crate) async fn publish(inner: &Inner, event: IncomingEvent) -> Result<(), BackendError> {
    inner.check_open()?;
    let partition = partition_for(&event.ordering_key, inner.config.partitions);
    append(inner, partition, &event).await
}

/// Appends `event` to partition `p`'s stream (a publish, or a dead letter
/// replayed).
pub(crate) async fn append(
    inner: &Inner,
    p: u32,
    event: &IncomingEvent,
) -> Result<(), BackendError> {
    let mut conn = inner.conn();
    // No MAXLEN here: trimming at append time could drop entries nobody
    // has consumed. The janitor trims, behind the consumer group.
    let _: String = inner
        .run(
            redis::cmd("XADD")
                .arg(inner.keys.stream(p))
                .arg("*")
                .arg("id")
                .arg(&event.id)
                .arg("k")
                .arg(event.ordering_key.as_str())
                .arg("p")
                .arg(event.payload.as_ref())
                .query_async(&mut conn),
        )
        .await?;
    // Acked (or, replayed, out of the dead letters) only once a replica
    // has it, when asked to: a primary that dies right after the XADD must
    // not take it along.
    inner.replicated(&inner.keys.stream(p)).await
}
