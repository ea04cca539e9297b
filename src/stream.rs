//! Streams and positions (the contract's "Positions and resume").
//!
//! Every event a session receives is an [`Entry`] of one [`Stream`]: a
//! user's inbox (their personal messages, both directions, and the changes
//! to their own memberships) or a channel's stream (its messages and
//! membership changes). Positions (`seq`) are assigned by the store in the
//! transaction that stores the entry, from 1, without gaps: what lets a
//! gateway keep each session gap-free and a client resume on any gateway.

use std::fmt;

use fanout_backend::{is_valid_id, RouteKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::{format_time, Message};

/// Event name of a membership change delivered to a client.
pub const MEMBERSHIP_CHANGE: &str = "MEMBERSHIP_CHANGE";
/// Event name of the answer to a resume, after the replay.
pub const RESUMED: &str = "RESUMED";

/// One sequenced stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Stream {
    /// A user's inbox.
    Inbox(String),
    /// A channel's stream.
    Channel(String),
}

impl Stream {
    /// The stream's name in the store and on the outgoing side:
    /// `inbox:{user}` or `channel:{id}`. Ids cannot contain `:`, so the
    /// two never collide.
    pub fn key(&self) -> String {
        match self {
            Stream::Inbox(u) => format!("inbox:{u}"),
            Stream::Channel(c) => format!("channel:{c}"),
        }
    }

    /// Parses [`Stream::key`] back.
    pub fn parse_key(s: &str) -> Option<Self> {
        let (kind, id) = s.split_once(':')?;
        if !is_valid_id(id) {
            return None;
        }
        match kind {
            "inbox" => Some(Stream::Inbox(id.to_owned())),
            "channel" => Some(Stream::Channel(id.to_owned())),
            _ => None,
        }
    }

    /// The name a client sees: `inbox` (always its own) or `channel:{id}`.
    pub fn client_name(&self) -> String {
        match self {
            Stream::Inbox(_) => "inbox".to_owned(),
            Stream::Channel(c) => format!("channel:{c}"),
        }
    }

    /// The route key its entries are published to.
    pub fn route_key(&self) -> RouteKey {
        match self {
            Stream::Inbox(u) => RouteKey::User(u.clone()),
            Stream::Channel(c) => RouteKey::Channel(c.clone()),
        }
    }

    /// The stream a route key carries.
    pub fn of_route_key(key: &RouteKey) -> Self {
        match key {
            RouteKey::User(u) => Stream::Inbox(u.clone()),
            RouteKey::Channel(c) => Stream::Channel(c.clone()),
        }
    }

    /// The channel, for a channel's stream.
    pub fn channel(&self) -> Option<&str> {
        match self {
            Stream::Channel(c) => Some(c),
            Stream::Inbox(_) => None,
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

impl From<Stream> for String {
    fn from(s: Stream) -> String {
        s.key()
    }
}

impl TryFrom<String> for Stream {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Stream::parse_key(&s).ok_or_else(|| format!("not a stream name: {s:?}"))
    }
}

/// Whether a membership began or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The user became a member.
    Added,
    /// The user stopped being a member.
    Removed,
}

impl Change {
    /// Its name in the store and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
        }
    }

    /// Parses [`Change::as_str`] back.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "added" => Some(Change::Added),
            "removed" => Some(Change::Removed),
            _ => None,
        }
    }
}

/// A change to one channel's membership. It is written twice: once in the
/// channel's stream and once in the affected user's inbox; both copies
/// carry the channel-stream position (`channel_seq`), which is where the
/// change takes effect for the user's sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The channel.
    pub channel_id: String,
    /// Who was added or removed.
    pub user_id: String,
    /// Added or removed.
    pub change: Change,
    /// Who did it (the creator for a channel's initial members).
    pub by_user_id: String,
    /// When, ms since the epoch.
    pub created_at: i64,
    /// The position of this change in the channel's stream.
    pub channel_seq: i64,
}

/// What an entry holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// A chat message.
    Message(Message),
    /// A membership change.
    Membership(Membership),
}

/// One positioned entry of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The stream.
    pub stream: Stream,
    /// Its position there, from 1.
    pub seq: i64,
    /// What it holds.
    pub body: Body,
}

impl Entry {
    /// The client event name and payload: the message's or the membership
    /// change's fields, plus `stream` and `seq`.
    pub fn to_event(&self) -> (&'static str, Value) {
        let (name, mut v) = match &self.body {
            Body::Message(m) => m.to_event(),
            Body::Membership(c) => (
                MEMBERSHIP_CHANGE,
                serde_json::json!({
                    "channelId": c.channel_id,
                    "userId": c.user_id,
                    "change": c.change.as_str(),
                    "byUserId": c.by_user_id,
                    "createdAt": format_time(c.created_at),
                }),
            ),
        };
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "stream".to_owned(),
                Value::String(self.stream.client_name()),
            );
            obj.insert("seq".to_owned(), Value::from(self.seq));
        }
        (name, v)
    }

    /// The membership change, if it is one.
    pub fn membership(&self) -> Option<&Membership> {
        match &self.body {
            Body::Membership(m) => Some(m),
            Body::Message(_) => None,
        }
    }

    /// When it was created, ms.
    pub fn created_at(&self) -> i64 {
        match &self.body {
            Body::Message(m) => m.created_at,
            Body::Membership(c) => c.created_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Target;

    #[test]
    fn stream_keys_round_trip_and_never_collide() {
        let i = Stream::Inbox("channel".into());
        let c = Stream::Channel("inbox".into());
        assert_eq!(i.key(), "inbox:channel");
        assert_eq!(c.key(), "channel:inbox");
        assert_eq!(Stream::parse_key("inbox:channel"), Some(i.clone()));
        assert_eq!(Stream::parse_key("channel:inbox"), Some(c.clone()));
        for bad in ["inbox", "inbox:", "inbox:a:b", "dm:a", "channel:a b"] {
            assert_eq!(Stream::parse_key(bad), None, "{bad:?}");
        }
        assert_eq!(i.client_name(), "inbox");
        assert_eq!(c.client_name(), "channel:inbox");
        assert_eq!(Stream::of_route_key(&i.route_key()), i);
        assert_eq!(Stream::of_route_key(&c.route_key()), c);
    }

    #[test]
    fn events_carry_stream_and_seq() {
        let e = Entry {
            stream: Stream::Inbox("bob".into()),
            seq: 42,
            body: Body::Message(Message {
                id: "m1".into(),
                sender_id: "alice".into(),
                target: Target::User("bob".into()),
                content: "hi".into(),
                client_msg_id: None,
                created_at: 0,
            }),
        };
        let (name, v) = e.to_event();
        assert_eq!(name, "MESSAGE_RECEIVE");
        assert_eq!(v["stream"], "inbox");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["receiverId"], "bob");
        let wire = serde_json::to_string(&e).expect("encode");
        assert_eq!(serde_json::from_str::<Entry>(&wire).expect("decode"), e);

        let m = Entry {
            stream: Stream::Channel("general".into()),
            seq: 231,
            body: Body::Membership(Membership {
                channel_id: "general".into(),
                user_id: "carol".into(),
                change: Change::Added,
                by_user_id: "alice".into(),
                created_at: 0,
                channel_seq: 231,
            }),
        };
        let (name, v) = m.to_event();
        assert_eq!(name, "MEMBERSHIP_CHANGE");
        assert_eq!(v["stream"], "channel:general");
        assert_eq!(v["change"], "added");
        assert_eq!(v["byUserId"], "alice");
        assert_eq!(v["createdAt"], "1970-01-01T00:00:00.000Z");
        assert!(v.get("channelSeq").is_none(), "internal only");
    }
}
