//! Dead letters: publishing one (confirmed before the delivery is acked),
//! listing them without removing any, replaying and dropping them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use fanout_backend::{
    BackendError, DeadLetter, DeadLetterAction, DeadLetterSelection, IncomingEvent, OrderingKey,
};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, LongString, ShortString};
use lapin::Confirmation;

use crate::error::{bounded, within};
use crate::topology::{ss, H_ATTEMPTS, H_PARTITION, H_REASON};
use crate::{Inner, QueueType};

use super::publish::publish;
use super::settle::settled;
use super::{event_properties, header_str, header_u64, publish_confirmed, read_event, unavailable};

pub(super) async fn publish_dead_letter(
    inner: &Arc<Inner>,
    event: &IncomingEvent,
    reason: &str,
    attempts: u32,
    partition: u32,
) -> Result<(), BackendError> {
    let session = inner.current()?;
    let message_id = ShortString::try_new(event.id.clone()).unwrap_or_else(|_| ss(""));
    let props = event_properties(
        event,
        message_id,
        [
            (H_REASON, AMQPValue::LongString(LongString::from(reason))),
            (H_ATTEMPTS, AMQPValue::LongLongInt(i64::from(attempts))),
            (H_PARTITION, AMQPValue::LongLongInt(i64::from(partition))),
        ],
    );
    let exchange = inner.names.dead_letter_exchange();
    let confirmation = publish_confirmed(
        inner,
        &session,
        "publish dead letter",
        partition,
        (&exchange, crate::topology::DEAD_KEY),
        &event.payload,
        props,
    )
    .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => {
            inner.request_redeclare();
            Err(unavailable(
                "dead letter unroutable: the dead-letter queue is missing; declaring it again",
            ))
        }
        Confirmation::Nack(_) => Err(unavailable("the broker refused the dead letter (nack)")),
        Confirmation::NotRequested => Err(unavailable("publisher confirms are off")),
    }
}

/// Reads up to `limit` dead letters without removing them: basic.get
/// without ack on a channel of its own, then closing that channel, which
/// puts every message back in its order (a quorum queue only if all of
/// them were taken: see `scan_dead_letters`). Readers are serialised, so
/// two of them never see halves of the queue.
pub(crate) async fn dead_letters(
    inner: &Arc<Inner>,
    limit: usize,
) -> Result<Vec<DeadLetter>, BackendError> {
    let selection = DeadLetterSelection { ids: None, limit };
    scan_dead_letters(inner, &selection, None).await
}

/// Replays or drops the selected dead letters: the same scan as
/// [`dead_letters`], acking (removing) each selected one after its replay
/// was confirmed; closing the channel puts the others back in order.
pub(crate) async fn resolve_dead_letters(
    inner: &Arc<Inner>,
    selection: &DeadLetterSelection,
    action: DeadLetterAction,
) -> Result<Vec<DeadLetter>, BackendError> {
    scan_dead_letters(inner, selection, Some(action)).await
}

async fn scan_dead_letters(
    inner: &Arc<Inner>,
    selection: &DeadLetterSelection,
    action: Option<DeadLetterAction>,
) -> Result<Vec<DeadLetter>, BackendError> {
    if selection.limit == 0 {
        return Ok(Vec::new());
    }
    let _reader = within(inner.timeout(), "read dead letters", async {
        Ok(inner.dead_read.lock().await)
    })
    .await?;
    let session = inner.current()?;
    let queue = inner.names.dead_letter_queue();
    let per_get = inner.timeout();
    let ch = bounded(per_get, "open channel", session.consume.create_channel()).await?;
    let mut out = Vec::new();
    let mut result = Ok(());
    // A quorum queue puts the messages a closed channel gives back behind
    // the others (checked on 3.10.8; a classic queue puts them back where
    // they were). Taking every message that was there when the scan began,
    // and giving all of them back, keeps the order: the scan goes to the
    // end of the queue, whatever the limit.
    let whole_queue = inner.config.queue_type == QueueType::Quorum
        && !inner.legacy.classic_dead.load(Ordering::Relaxed);
    // Messages left to take, from the first get's count of the rest.
    let mut left: Option<u32> = None;
    loop {
        if (out.len() >= selection.limit && !whole_queue) || left == Some(0) {
            break;
        }
        let m = match bounded(
            per_get,
            "read dead letters",
            ch.basic_get(ss(&queue), BasicGetOptions { no_ack: false }),
        )
        .await
        {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        left = Some(left.map_or(m.message_count, |l| l.saturating_sub(1)));
        let dead = parse_dead_letter(&m.delivery);
        if out.len() >= selection.limit || !selection.matches(&dead.event.id) {
            continue;
        }
        if let Some(action) = action {
            if action == DeadLetterAction::Replay {
                // Confirmed on the incoming side before it leaves the
                // dead letters: a crash in between leaves it in both.
                if let Err(e) = publish(inner, dead.event.clone()).await {
                    result = Err(e);
                    break;
                }
            }
            let acked = bounded(
                per_get,
                "remove dead letter",
                m.delivery.acker.ack(BasicAckOptions::default()),
            )
            .await;
            if let Err(e) = settled(acked) {
                result = Err(e);
                break;
            }
        }
        out.push(dead);
    }
    // Closing the channel requeues everything we took and did not ack, in
    // order.
    let _ = tokio::time::timeout(per_get, ch.close(200, "done".into())).await;
    result.map(|()| out)
}

fn parse_dead_letter(d: &Delivery) -> DeadLetter {
    let (headers, id, ordering_key) = read_event(d);
    // Our own dead letters say why; the broker's (quorum delivery limit,
    // after workers crashed on the event) carry x-first-death-reason.
    let (reason, attempts) = match header_str(&headers, H_REASON) {
        Some(r) => (
            r,
            header_u64(&headers, H_ATTEMPTS)
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(0),
        ),
        // A broker's own dead letter (a delivery limit set by policy, a
        // message TTL): what it says.
        None => match header_str(&headers, "x-first-death-reason") {
            Some(why) => (format!("dead-lettered by the broker: {why}"), 0),
            None => ("unknown".to_owned(), 0),
        },
    };
    DeadLetter {
        event: IncomingEvent {
            id,
            ordering_key: OrderingKey::from_raw(ordering_key),
            payload: Bytes::from(d.data.clone()),
        },
        reason,
        attempts,
    }
}
