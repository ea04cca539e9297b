//! Identifiers and messages that cross the [`FanoutBackend`](crate::FanoutBackend) trait.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

use crate::BackendError;

/// Longest user, channel or server id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Whether `s` is a valid user, channel or server id: 1 to 64 characters of
/// `[A-Za-z0-9_-]`. Ids end up in routing keys, Redis keys and SQL, so the
/// alphabet deliberately excludes every separator (`:`, `.`, `|`, `*`, `#`,
/// space) that could let one id forge another key.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an id (see [`is_valid_id`]).
            pub fn new(s: impl Into<String>) -> Result<Self, BackendError> {
                let s = s.into();
                if is_valid_id(&s) {
                    Ok(Self(s))
                } else {
                    Err(BackendError::Invalid(format!(
                        concat!(stringify!($name), " must be 1 to 64 characters of [A-Za-z0-9_-], got {:?}"),
                        s
                    ).into()))
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The id of one gateway process, unique among live gateways.
    ServerId
);

/// Where an outgoing message is routed: one user's sessions, or one
/// channel's members. Its wire form ([`RouteKey::as_routing_key`]) is the
/// seed article's: the user id itself, or `channel:{id}`. Since ids cannot
/// contain `:`, the two forms can never collide.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKey {
    /// Every session of one user.
    User(String),
    /// Every session of every member of one channel.
    Channel(String),
}

impl RouteKey {
    /// A user key, validated.
    pub fn user(id: &str) -> Result<Self, BackendError> {
        check_id("user id", id)?;
        Ok(RouteKey::User(id.to_owned()))
    }

    /// A channel key, validated.
    pub fn channel(id: &str) -> Result<Self, BackendError> {
        check_id("channel id", id)?;
        Ok(RouteKey::Channel(id.to_owned()))
    }

    /// The routing key on the wire: `userId` or `channel:{id}`.
    pub fn as_routing_key(&self) -> String {
        match self {
            RouteKey::User(u) => u.clone(),
            RouteKey::Channel(c) => format!("channel:{c}"),
        }
    }

    /// Parses the wire form back; `None` for anything that is not one.
    pub fn parse(s: &str) -> Option<Self> {
        match s.strip_prefix("channel:") {
            Some(c) if is_valid_id(c) => Some(RouteKey::Channel(c.to_owned())),
            Some(_) => None,
            None if is_valid_id(s) => Some(RouteKey::User(s.to_owned())),
            None => None,
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_routing_key())
    }
}

fn check_id(what: &str, id: &str) -> Result<(), BackendError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(BackendError::Invalid(
            format!("{what} must be 1 to 64 characters of [A-Za-z0-9_-], got {id:?}").into(),
        ))
    }
}

/// The conversation an incoming event belongs to; events with one key are
/// processed in publish order. `dm:{a}:{b}` for a pair of users (the two ids
/// sorted, so both directions share one key) or `ch:{id}` for a channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderingKey(String);

impl OrderingKey {
    /// The key of the personal conversation between `a` and `b`, in either
    /// direction.
    pub fn direct(a: &str, b: &str) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        OrderingKey(format!("dm:{lo}:{hi}"))
    }

    /// The key of a channel's conversation.
    pub fn channel(id: &str) -> Self {
        OrderingKey(format!("ch:{id}"))
    }

    /// Wraps a key received from a broker.
    pub fn from_raw(s: impl Into<String>) -> Self {
        OrderingKey(s.into())
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The partition of the incoming side that carries `key`, out of
/// `partitions`. Every backend and every process MUST use this function, so
/// it is a fixed hash (FNV-1a, 64 bit), not `std`'s randomly seeded one.
pub fn partition_for(key: &OrderingKey, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.0.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // partitions is at least 1 by configuration; max(1) keeps this total.
    (h % u64::from(partitions.max(1))) as u32
}

/// An event on the incoming side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingEvent {
    /// Unique id (the message id); consumers deduplicate by it.
    pub id: String,
    /// The conversation; chooses the partition.
    pub ordering_key: OrderingKey,
    /// Opaque to the backend.
    pub payload: Bytes,
}

/// How a consumer joins the incoming side.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// A name for logs and broker consumer tags.
    pub consumer_name: String,
    /// Most unsettled deliveries on this stream at once (at least 1).
    pub prefetch: u16,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        Self {
            consumer_name: "worker".to_owned(),
            prefetch: 64,
        }
    }
}

/// Settles one incoming delivery. Implemented by each backend.
#[async_trait]
pub trait Settle: Send + Sync {
    /// The event is done with; it MUST NOT be delivered again.
    async fn ack(&self) -> Result<(), BackendError>;
    /// Delivers the event again, ahead of the later events of its
    /// partition. Counts towards nothing: a backend never dead-letters an
    /// event because of how often it was delivered (see
    /// [`FanoutBackend::consume_incoming`](crate::FanoutBackend::consume_incoming)).
    async fn reject(&self) -> Result<(), BackendError>;
    /// Moves the event to the dead-letter place now, with a reason.
    async fn dead_letter(&self, reason: &str) -> Result<(), BackendError>;
}

/// One delivery from the incoming side, to be settled exactly once.
pub struct IncomingDelivery {
    /// The event as published.
    pub event: IncomingEvent,
    /// The partition it came from.
    pub partition: u32,
    /// 1 on first delivery, then 2, 3, ... on redeliveries, as far as the
    /// backend can tell. Informational only (logs): redeliveries include
    /// hand-overs, restarts and lost connections, which say nothing about
    /// the event itself.
    pub attempt: u32,
    settle: Box<dyn Settle>,
}

impl IncomingDelivery {
    /// Built by backends.
    pub fn new(
        event: IncomingEvent,
        partition: u32,
        attempt: u32,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            event,
            partition,
            attempt,
            settle,
        }
    }

    /// See [`Settle::ack`].
    pub async fn ack(self) -> Result<(), BackendError> {
        self.settle.ack().await
    }

    /// See [`Settle::reject`].
    pub async fn reject(self) -> Result<(), BackendError> {
        self.settle.reject().await
    }

    /// See [`Settle::dead_letter`].
    pub async fn dead_letter(self, reason: &str) -> Result<(), BackendError> {
        self.settle.dead_letter(reason).await
    }
}

impl fmt::Debug for IncomingDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingDelivery")
            .field("event", &self.event)
            .field("partition", &self.partition)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// An event an operator has to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event as published.
    pub event: IncomingEvent,
    /// Why it was dead-lettered: the worker's text.
    pub reason: String,
    /// How many times it was delivered before, as far as the backend can
    /// tell (informational).
    pub attempts: u32,
}

/// What [`FanoutBackend::resolve_dead_letters`](crate::FanoutBackend::resolve_dead_letters)
/// does with the dead letters it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    /// Publish each to the incoming side again (same id, ordering key and
    /// payload), then remove it from the dead letters.
    Replay,
    /// Remove each from the dead letters for good.
    Drop,
}

/// Which dead letters [`FanoutBackend::resolve_dead_letters`](crate::FanoutBackend::resolve_dead_letters)
/// acts on: the oldest `limit` of those whose event id is in `ids` (every
/// one when `ids` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterSelection {
    /// Event ids to select; `None` selects any.
    pub ids: Option<Vec<String>>,
    /// Most dead letters to act on.
    pub limit: usize,
}

impl DeadLetterSelection {
    /// Whether `event_id` is selected (ignoring the limit).
    pub fn matches(&self, event_id: &str) -> bool {
        self.ids
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|i| i == event_id))
    }
}

/// A message on the outgoing side, as a gateway receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The key it was published to.
    pub key: RouteKey,
    /// Opaque to the backend.
    pub payload: Bytes,
}

/// What a registered server's stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A message routed to this server.
    Message(OutgoingMessage),
    /// The backend lost this server's routes and restored its queue or
    /// subscription: bind every held key again. Messages published between
    /// the loss and the re-binding may be missing.
    RoutesLost,
}

/// What [`FanoutBackend::publish_outgoing`](crate::FanoutBackend::publish_outgoing) knows of where a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOutcome {
    /// At least one server was bound; `servers` is how many where known.
    Routed { servers: Option<usize> },
    /// Nobody was bound to the key; the message was dropped.
    Unroutable,
    /// The backend cannot tell.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_exclude_separators() {
        assert!(is_valid_id("alice_01-x"));
        for bad in ["", "a:b", "a.b", "a b", "a|b", "a*", "é", &"x".repeat(65)] {
            assert!(!is_valid_id(bad), "{bad:?} must be refused");
        }
        assert!(is_valid_id(&"x".repeat(64)));
    }

    #[test]
    fn route_keys_round_trip_and_never_collide() {
        let u = RouteKey::user("channel").expect("valid");
        let c = RouteKey::channel("x").expect("valid");
        assert_eq!(u.as_routing_key(), "channel");
        assert_eq!(c.as_routing_key(), "channel:x");
        assert_eq!(RouteKey::parse("channel:x"), Some(c));
        assert_eq!(RouteKey::parse("channel"), Some(u));
        assert_eq!(RouteKey::parse("channel:a:b"), None);
        assert!(RouteKey::user("a:b").is_err());
    }

    #[test]
    fn direct_keys_are_symmetric_and_partitions_stable() {
        assert_eq!(OrderingKey::direct("b", "a"), OrderingKey::direct("a", "b"));
        // Pinned: every process and backend must agree on this mapping.
        assert_eq!(partition_for(&OrderingKey::channel("general"), 16), 4);
        let spread: std::collections::HashSet<u32> = (0..200)
            .map(|i| partition_for(&OrderingKey::channel(&format!("c{i}")), 8))
            .collect();
        assert_eq!(spread.len(), 8);
        assert_eq!(partition_for(&OrderingKey::channel("x"), 0), 0);
    }
}
