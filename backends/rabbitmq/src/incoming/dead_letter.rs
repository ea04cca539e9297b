//! Dead letters: publishing one (confirmed before the delivery is acked),
//! listing them without removing any, replaying and dropping them.

use std::sync::Arc;

use bytes::Bytes;
use fanout_backend::{
    BackendError, DeadLetter, DeadLetterAction, DeadLetterSelection, IncomingEvent, OrderingKey,
};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};

use crate::error::{bounded, within};
use crate::topology::{ss, H_ATTEMPTS, H_ORDERING_KEY, H_PARTITION, H_REASON};
use crate::Inner;

use super::publish::publish;
use super::settle::settled;
use super::{header_str, header_u64, unavailable};

pub(super) async fn publish_dead_letter(
    inner: &Arc<Inner>,
    event: &IncomingEvent,
    reason: &str,
    attempts: u32,
    partition: u32,
) -> Result<(), BackendError> {
    let session = inner.current()?;
    let message_id = ShortString::try_new(event.id.clone()).unwrap_or_else(|_| ss(""));
    let mut headers = FieldTable::default();
    headers.insert(
        ss(H_ORDERING_KEY),
        AMQPValue::LongString(LongString::from(event.ordering_key.as_str())),
    );
    headers.insert(
        ss(H_REASON),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert(ss(H_ATTEMPTS), AMQPValue::LongLongInt(i64::from(attempts)));
    headers.insert(
        ss(H_PARTITION),
        AMQPValue::LongLongInt(i64::from(partition)),
    );
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message_id)
        .with_headers(headers);
    let exchange = inner.names.dead_letter_exchange();
    let confirmation = bounded(inner.timeout(), "publish dead letter", async {
        let ch = session.incoming_pub.get(u64::from(partition)).await?;
        ch.basic_publish(
            ss(&exchange),
            ss(crate::topology::DEAD_KEY),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &event.payload,
            props,
        )
        .await?
        .await
    })
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
/// puts every message back in its original place (the dead-letter queue is
/// classic for this reason). Readers are serialised, so two of them never
/// see halves of the queue.
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
    while out.len() < selection.limit {
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
        let dead = parse_dead_letter(&m.delivery);
        if !selection.matches(&dead.event.id) {
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
    let headers = d.properties.headers().clone().unwrap_or_default();
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let ordering_key = header_str(&headers, H_ORDERING_KEY).unwrap_or_default();
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
