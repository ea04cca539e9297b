//! Settling one delivery: ack, reject (requeued ahead of later events) and
//! dead-letter, each on the channel the delivery came from, and the attempt
//! count a delivery carries.

use std::future::Future;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use fanout_backend::{BackendError, IncomingDelivery, IncomingEvent, OrderingKey, Settle};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Acker;

use crate::error::bounded;
use crate::{lock, Inner, QueueType};

use super::dead_letter::publish_dead_letter;
use super::{header_u64, read_event, unavailable, MemberShared};

pub(super) fn to_delivery(
    inner: &Arc<Inner>,
    shared: &Arc<MemberShared>,
    partition: u32,
    slot: u64,
    delivery: Delivery,
) -> IncomingDelivery {
    let (headers, id, ordering_key) = read_event(&delivery);
    let floor = if delivery.redelivered { 2 } else { 1 };
    let attempt = match inner.config.queue_type {
        // The broker's own counter: every earlier return (reject, lost
        // channel) of this message.
        QueueType::Quorum => header_u64(&headers, "x-delivery-count")
            .map(|c| u32::try_from(c.saturating_add(1)).unwrap_or(u32::MAX))
            .unwrap_or(floor),
        // No broker counter: only the redelivered flag.
        QueueType::Classic => floor,
    };
    let event = IncomingEvent {
        id,
        ordering_key: OrderingKey::from_raw(ordering_key),
        payload: Bytes::from(delivery.data),
    };
    let settle = RabbitSettle {
        inner: Arc::downgrade(inner),
        shared: shared.clone(),
        partition,
        slot,
        acker: delivery.acker,
        attempt,
        event: event.clone(),
    };
    IncomingDelivery::new(event, partition, attempt, Box::new(settle))
}

/// Settles one delivery on the channel it came from.
pub(super) struct RabbitSettle {
    inner: Weak<Inner>,
    shared: Arc<MemberShared>,
    partition: u32,
    slot: u64,
    acker: Acker,
    attempt: u32,
    event: IncomingEvent,
}

impl RabbitSettle {
    /// The delivery is no longer the application's: release its prefetch
    /// place and let a pending hand-over go on.
    fn finish(&self) {
        let mut st = lock(&self.shared.state);
        let counted = match st.slots.get_mut(&self.partition) {
            Some(s) if s.generation == self.slot => {
                s.unsettled = s.unsettled.saturating_sub(1);
                true
            }
            _ => false,
        };
        if counted {
            st.unsettled = st.unsettled.saturating_sub(1);
        }
        drop(st);
        self.shared.changed.notify_waiters();
    }

    fn inner(&self) -> Result<Arc<Inner>, BackendError> {
        self.inner.upgrade().ok_or(BackendError::Closed)
    }

    async fn dead_letter_now(&self, inner: &Arc<Inner>, reason: &str) -> Result<(), BackendError> {
        // Publish first, ack after the confirm: a crash in between leaves
        // the event in both places (it is delivered again and dead-lettered
        // a second time) rather than in neither.
        match publish_dead_letter(inner, &self.event, reason, self.attempt, self.partition).await {
            Ok(()) => settled(
                self.send(
                    inner,
                    "ack dead-lettered event",
                    self.acker.ack(BasicAckOptions::default()),
                )
                .await,
            ),
            Err(e) => {
                // Give it back so that it is not stuck unsettled; it comes
                // back and will be dead-lettered then.
                let _ = self.send(inner, "requeue", self.requeue()).await;
                Err(e)
            }
        }
    }

    /// Sends an ack or nack within the operation timeout; whatever the
    /// answer, the delivery is no longer the application's.
    async fn send(
        &self,
        inner: &Inner,
        what: &str,
        op: impl Future<Output = lapin::Result<bool>>,
    ) -> Result<bool, BackendError> {
        let r = bounded(inner.timeout(), what, op).await;
        self.finish();
        r
    }

    /// A nack that puts the delivery back on its queue.
    fn requeue(&self) -> impl Future<Output = lapin::Result<bool>> + '_ {
        self.acker.nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
    }
}

/// An ack or nack the broker never got (its channel is gone: connection
/// loss, or the stream was dropped) means the event will come back.
pub(super) fn settled(r: Result<bool, BackendError>) -> Result<(), BackendError> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(unavailable(
            "the delivery's channel is closed; the event will be delivered again",
        )),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(&self) -> Result<(), BackendError> {
        let inner = self.inner()?;
        settled(
            self.send(&inner, "ack", self.acker.ack(BasicAckOptions::default()))
                .await,
        )
    }

    async fn reject(&self) -> Result<(), BackendError> {
        let inner = self.inner()?;
        // Requeued at the head of its partition (both queue types put a
        // requeued message back in front of later ones).
        settled(self.send(&inner, "reject", self.requeue()).await)
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BackendError> {
        let inner = self.inner()?;
        self.dead_letter_now(&inner, reason).await
    }
}
