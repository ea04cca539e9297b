//! Publishing an incoming event to its partition queue, confirmed by the
//! broker before the call returns.

use std::sync::Arc;

use fanout_backend::{partition_for, BackendError, IncomingEvent};
use lapin::types::ShortString;
use lapin::Confirmation;

use crate::topology::partition_key;
use crate::Inner;

use super::{event_properties, publish_confirmed, unavailable};

pub(crate) async fn publish(inner: &Arc<Inner>, event: IncomingEvent) -> Result<(), BackendError> {
    let message_id = ShortString::try_new(event.id.clone())
        .map_err(|_| BackendError::Invalid("event id longer than 255 bytes".into()))?;
    let p = partition_for(&event.ordering_key, inner.config.partitions);
    let session = inner.current()?;
    let props = event_properties(&event, message_id, []);
    let exchange = inner.names.incoming_exchange();
    // One channel per partition (modulo the pool): publishes of one
    // ordering key share a channel, so even concurrent ones reach the queue
    // in the order they were issued. Many publishes pipeline on a channel,
    // each awaiting its own confirm.
    let confirmation = publish_confirmed(
        inner,
        &session,
        "publish incoming",
        p,
        (&exchange, &partition_key(p)),
        &event.payload,
        props,
    )
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
