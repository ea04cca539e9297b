//! Publishing an incoming event to its partition queue, confirmed by the
//! broker before the call returns.

use std::sync::Arc;

use fanout_backend::{partition_for, BackendError, IncomingEvent};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};

use crate::error::bounded;
use crate::topology::{partition_key, ss, H_ORDERING_KEY};
use crate::Inner;

use super::unavailable;

pub(crate) async fn publish(inner: &Arc<Inner>, event: IncomingEvent) -> Result<(), BackendError> {
    let message_id = ShortString::try_new(event.id.clone())
        .map_err(|_| BackendError::Invalid("event id longer than 255 bytes".into()))?;
    let p = partition_for(&event.ordering_key, inner.config.partitions);
    let session = inner.current()?;
    let mut headers = FieldTable::default();
    headers.insert(
        ss(H_ORDERING_KEY),
        AMQPValue::LongString(LongString::from(event.ordering_key.as_str())),
    );
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message_id)
        .with_headers(headers);
    let exchange = inner.names.incoming_exchange();
    // One channel per partition (modulo the pool): publishes of one
    // ordering key share a channel, so even concurrent ones reach the queue
    // in the order they were issued. Many publishes pipeline on a channel,
    // each awaiting its own confirm.
    let confirmation = bounded(inner.timeout(), "publish incoming", async {
        let ch = session.incoming_pub.get(u64::from(p)).await?;
        ch.basic_publish(
            ss(&exchange),
            ss(&partition_key(p)),
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
    .await;
    match confirmation {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => {
            inner.request_redeclare();
            Err(unavailable(
                "incoming event unroutable: its partition queue is missing; declaring it again",
            ))
        }
        Ok(Confirmation::Nack(_)) => Err(unavailable(
            "the broker did not accept the incoming event (nack)",
        )),
        Ok(Confirmation::NotRequested) => Err(unavailable("publisher confirms are off")),
        Err(e) => {
            inner.hint_lost();
            Err(e)
        }
    }
}
