//! The client protocol's shapes and rules (`docs/protocol.md`): decoding
//! and validating `sendMessage`, the error codes, the delivered events, and
//! the envelopes that travel on the incoming and outgoing sides.

use chrono::{DateTime, SecondsFormat, Utc};
use fanout_backend::{is_valid_id, OrderingKey, RouteKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Event name of a personal message delivered to a client.
pub const MESSAGE_RECEIVE: &str = "MESSAGE_RECEIVE";
/// Event name of a group message delivered to a client.
pub const GROUP_MESSAGE_RECEIVE: &str = "GROUP_MESSAGE_RECEIVE";
/// Event name of a client's send.
pub const SEND_MESSAGE: &str = "sendMessage";

/// Longest `clientMsgId`.
pub const MAX_CLIENT_MSG_ID: usize = 64;

/// The error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is not a valid `sendMessage`.
    InvalidPayload,
    /// `content` is longer than `limits.max_content_bytes`.
    TooLarge,
    /// Group message to a channel the sender does not belong to.
    NotMember,
    /// Too many sends; try later.
    RateLimited,
    /// The broker did not accept the event; retry with the same `clientMsgId`.
    Unavailable,
}

/// A refusal, as sent in an ack: `{ "code", "message" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProtocolError {
    /// Machine-readable.
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
}

impl ProtocolError {
    /// A refusal with a code and text.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The ack a client receives: `{ "ok": false, "error": {...} }`.
    pub fn ack(&self) -> Value {
        serde_json::json!({ "ok": false, "error": self })
    }
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// One user (`to`).
    User(String),
    /// One channel (`channelId`).
    Channel(String),
}

/// A validated `sendMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    /// The recipient user or channel.
    pub target: Target,
    /// 1 to `max_content_bytes` bytes of UTF-8 without NUL.
    pub content: String,
    /// The sender's idempotency key, if given.
    pub client_msg_id: Option<String>,
}

/// Whether `s` is a valid `clientMsgId`: 1 to 64 of `[A-Za-z0-9_.:-]`.
pub fn is_valid_client_msg_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CLIENT_MSG_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Which target field a bad id was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdField {
    /// `to`: a user.
    To,
    /// `channelId`: a channel.
    ChannelId,
}

impl std::fmt::Display for IdField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdField::To => "to",
            IdField::ChannelId => "channelId",
        })
    }
}

/// Why a send is invalid: the rules of `docs/protocol.md`'s table, which
/// the gateway applies to what a client sends and the worker applies again
/// to what it takes off the incoming side. Each reason has the code and
/// text a client reads ([`ProtocolError`]) and the reason a worker
/// dead-letters with ([`Invalid::dead_letter_reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The payload is not a JSON object.
    #[error("payload must be an object with `to` or `channelId`, and `content`")]
    NotAnObject,
    /// A target id that is not 1 to 64 of `[A-Za-z0-9_-]`, or not a string.
    #[error("`{0}` must be 1 to 64 characters of [A-Za-z0-9_-]")]
    BadId(IdField),
    /// Both `to` and `channelId`.
    #[error("give exactly one of `to` and `channelId`, not both")]
    BothTargets,
    /// Neither `to` nor `channelId`.
    #[error("give exactly one of `to` and `channelId`")]
    NoTarget,
    /// `content` of another type than string.
    #[error("`content` must be a string")]
    ContentNotAString,
    /// No `content`.
    #[error("`content` is required")]
    NoContent,
    /// Empty `content`.
    #[error("`content` must not be empty")]
    EmptyContent,
    /// `content` longer than the limit, in bytes of UTF-8.
    #[error("`content` is {len} bytes of UTF-8; the limit is {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `content` with U+0000 (PostgreSQL cannot store it in text).
    #[error("`content` must not contain U+0000")]
    NulInContent,
    /// A `clientMsgId` that is not 1 to 64 of `[A-Za-z0-9_.:-]`.
    #[error("`clientMsgId` must be 1 to 64 characters of [A-Za-z0-9_.:-]")]
    BadClientMsgId,
}

impl Invalid {
    /// The error code a client's ack carries.
    pub fn code(self) -> ErrorCode {
        match self {
            Invalid::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::InvalidPayload,
        }
    }

    /// The reason a worker dead-letters an event with. Coarser than the
    /// client's text (an operator needs the rule, not the field), and a
    /// fixed set: the reasons that only raw JSON can break never reach a
    /// worker, whose events were decoded into a [`Message`] first.
    pub fn dead_letter_reason(self) -> &'static str {
        match self {
            Invalid::NotAnObject => "undecodable event",
            Invalid::BadId(_) | Invalid::BothTargets | Invalid::NoTarget => "invalid target id",
            Invalid::ContentNotAString
            | Invalid::NoContent
            | Invalid::EmptyContent
            | Invalid::TooLarge { .. }
            | Invalid::NulInContent => "invalid content",
            Invalid::BadClientMsgId => "invalid clientMsgId",
        }
    }
}

impl From<Invalid> for ProtocolError {
    fn from(i: Invalid) -> Self {
        ProtocolError::new(i.code(), i.to_string())
    }
}

/// One field of a send as it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// Absent, or `null`.
    Absent,
    /// A string.
    Str(&'a str),
    /// A value of another type.
    Other,
}

impl<'a> Field<'a> {
    fn of_json(v: Option<&'a Value>) -> Self {
        match v {
            None | Some(Value::Null) => Field::Absent,
            Some(Value::String(s)) => Field::Str(s),
            Some(_) => Field::Other,
        }
    }

    fn of_str(s: Option<&'a str>) -> Self {
        s.map_or(Field::Absent, Field::Str)
    }
}

/// The client-given fields of a send, before [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unchecked<'a> {
    /// `to`.
    pub to: Field<'a>,
    /// `channelId`.
    pub channel_id: Field<'a>,
    /// `content`.
    pub content: Field<'a>,
    /// `clientMsgId`.
    pub client_msg_id: Field<'a>,
}

impl<'a> Unchecked<'a> {
    /// The fields of a `sendMessage` payload. Unknown fields are ignored.
    pub fn from_json(value: &'a Value) -> Result<Self, Invalid> {
        let obj = value.as_object().ok_or(Invalid::NotAnObject)?;
        Ok(Self {
            to: Field::of_json(obj.get("to")),
            channel_id: Field::of_json(obj.get("channelId")),
            content: Field::of_json(obj.get("content")),
            client_msg_id: Field::of_json(obj.get("clientMsgId")),
        })
    }

    /// The client-given fields of a message (as a worker decoded it).
    pub fn from_message(m: &'a Message) -> Self {
        let (to, channel_id) = match &m.target {
            Target::User(u) => (Field::Str(u.as_str()), Field::Absent),
            Target::Channel(c) => (Field::Absent, Field::Str(c.as_str())),
        };
        Self {
            to,
            channel_id,
            content: Field::Str(&m.content),
            client_msg_id: Field::of_str(m.client_msg_id.as_deref()),
        }
    }
}

/// A send [`validate`] accepted, borrowed from its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Valid<'a> {
    /// Whether the target is a user (`to`) or a channel (`channelId`).
    pub target: IdField,
    /// The target's id.
    pub target_id: &'a str,
    /// 1 to `max_content_bytes` bytes of UTF-8 without NUL.
    pub content: &'a str,
    /// The sender's idempotency key, if given.
    pub client_msg_id: Option<&'a str>,
}

/// Applies `docs/protocol.md`'s table to a send, row by row: the first
/// rule broken is the one reported (the gateway and the worker must agree
/// on that, since both answer with it).
pub fn validate<'a>(send: &Unchecked<'a>, max_content_bytes: usize) -> Result<Valid<'a>, Invalid> {
    let id = |field: Field<'a>, which: IdField| match field {
        Field::Absent => Ok(None),
        Field::Str(s) if is_valid_id(s) => Ok(Some(s)),
        _ => Err(Invalid::BadId(which)),
    };
    let (target, target_id) = match (
        id(send.to, IdField::To)?,
        id(send.channel_id, IdField::ChannelId)?,
    ) {
        (Some(u), None) => (IdField::To, u),
        (None, Some(c)) => (IdField::ChannelId, c),
        (Some(_), Some(_)) => return Err(Invalid::BothTargets),
        (None, None) => return Err(Invalid::NoTarget),
    };
    let content = match send.content {
        Field::Str(s) => s,
        Field::Other => return Err(Invalid::ContentNotAString),
        Field::Absent => return Err(Invalid::NoContent),
    };
    if content.is_empty() {
        return Err(Invalid::EmptyContent);
    }
    if content.len() > max_content_bytes {
        return Err(Invalid::TooLarge {
            len: content.len(),
            max: max_content_bytes,
        });
    }
    // PostgreSQL cannot store U+0000 in text; refusing it here keeps a
    // message the gateway acked from becoming a poison event.
    if content.contains('\0') {
        return Err(Invalid::NulInContent);
    }
    let client_msg_id = match send.client_msg_id {
        Field::Absent => None,
        Field::Str(s) if is_valid_client_msg_id(s) => Some(s),
        _ => return Err(Invalid::BadClientMsgId),
    };
    Ok(Valid {
        target,
        target_id,
        content,
        client_msg_id,
    })
}

/// Decodes and validates a `sendMessage` payload. Unknown fields are
/// ignored; `null` counts as absent.
pub fn parse_send(value: &Value, max_content_bytes: usize) -> Result<SendRequest, ProtocolError> {
    let v = validate(&Unchecked::from_json(value)?, max_content_bytes)?;
    let id = v.target_id.to_owned();
    Ok(SendRequest {
        target: match v.target {
            IdField::To => Target::User(id),
            IdField::ChannelId => Target::Channel(id),
        },
        content: v.content.to_owned(),
        client_msg_id: v.client_msg_id.map(str::to_owned),
    })
}

/// RFC 3339 UTC with milliseconds, the form of every `createdAt`.
pub fn format_time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// A message as stored, delivered and listed in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// UUIDv7 assigned by the accepting gateway.
    pub id: String,
    /// Who sent it.
    pub sender_id: String,
    /// The recipient user or channel.
    pub target: Target,
    /// The text.
    pub content: String,
    /// The sender's idempotency key.
    pub client_msg_id: Option<String>,
    /// When the gateway accepted it, ms since the epoch.
    pub created_at: i64,
}

impl Message {
    /// The conversation it belongs to.
    pub fn ordering_key(&self) -> OrderingKey {
        match &self.target {
            Target::User(r) => OrderingKey::direct(&self.sender_id, r),
            Target::Channel(c) => OrderingKey::channel(c),
        }
    }

    /// The client event name and payload for this message.
    pub fn to_event(&self) -> (&'static str, Value) {
        let mut v = match &self.target {
            Target::User(r) => serde_json::json!({
                "id": self.id, "senderId": self.sender_id, "receiverId": r,
                "content": self.content, "createdAt": format_time(self.created_at),
            }),
            Target::Channel(c) => serde_json::json!({
                "id": self.id, "channelId": c, "senderId": self.sender_id,
                "content": self.content, "createdAt": format_time(self.created_at),
            }),
        };
        if let (Some(cid), Some(obj)) = (&self.client_msg_id, v.as_object_mut()) {
            obj.insert("clientMsgId".to_owned(), Value::String(cid.clone()));
        }
        let name = match self.target {
            Target::User(_) => MESSAGE_RECEIVE,
            Target::Channel(_) => GROUP_MESSAGE_RECEIVE,
        };
        (name, v)
    }

    /// The route keys a worker publishes this message to: the receiver and
    /// the sender (for their other sessions), or the channel.
    pub fn route_keys(&self) -> Vec<RouteKey> {
        match &self.target {
            Target::User(r) if *r == self.sender_id => vec![RouteKey::User(r.clone())],
            Target::User(r) => vec![
                RouteKey::User(r.clone()),
                RouteKey::User(self.sender_id.clone()),
            ],
            Target::Channel(c) => vec![RouteKey::Channel(c.clone())],
        }
    }
}

/// What a gateway publishes on the incoming side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingEnvelope {
    /// Format version, for rolling upgrades.
    pub v: u32,
    /// The accepted message.
    pub message: Message,
}

/// What travels on the outgoing side to gateways.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutgoingEnvelope {
    /// A stored entry of the stream the route key carries (see
    /// [`crate::stream`]).
    Entry(crate::stream::Entry),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(v: Value) -> ErrorCode {
        parse_send(&v, 10).expect_err("must be refused").code
    }

    #[test]
    fn valid_sends() {
        let r = parse_send(
            &json!({"to": "bob", "content": "hi", "clientMsgId": "a.b:c-1"}),
            10,
        )
        .expect("valid");
        assert_eq!(r.target, Target::User("bob".into()));
        assert_eq!(r.client_msg_id.as_deref(), Some("a.b:c-1"));
        let r = parse_send(
            &json!({"channelId": "c", "content": "x", "to": null, "extra": 1}),
            10,
        )
        .expect("valid");
        assert_eq!(r.target, Target::Channel("c".into()));
    }

    #[test]
    fn refusals_have_their_codes() {
        use ErrorCode::*;
        assert_eq!(code(json!("hi")), InvalidPayload);
        assert_eq!(code(json!({"content": "hi"})), InvalidPayload);
        assert_eq!(
            code(json!({"to": "a", "channelId": "b", "content": "hi"})),
            InvalidPayload
        );
        assert_eq!(code(json!({"to": "a:b", "content": "hi"})), InvalidPayload);
        assert_eq!(code(json!({"to": "", "content": "hi"})), InvalidPayload);
        assert_eq!(code(json!({"to": 5, "content": "hi"})), InvalidPayload);
        assert_eq!(code(json!({"to": "a", "content": ""})), InvalidPayload);
        assert_eq!(code(json!({"to": "a", "content": 3})), InvalidPayload);
        assert_eq!(
            code(json!({"to": "a", "content": "a\u{0}b"})),
            InvalidPayload
        );
        assert_eq!(
            code(json!({"to": "a", "content": "hi", "clientMsgId": "a b"})),
            InvalidPayload
        );
        assert_eq!(
            code(json!({"to": "a", "content": "hi", "clientMsgId": "x".repeat(65)})),
            InvalidPayload
        );
        // Ten bytes pass, eleven do not; é is two bytes of UTF-8.
        assert!(parse_send(
            &json!({"to": "a", "content": "éééééé"[..10].to_owned()}),
            10
        )
        .is_ok());
        assert_eq!(code(json!({"to": "a", "content": "ééééé!"})), TooLarge);
    }

    #[test]
    fn the_worker_reads_a_decoded_message_by_the_same_rules() {
        let mut m = Message {
            id: "i".into(),
            sender_id: "a".into(),
            target: Target::Channel("c".into()),
            content: "hi".into(),
            client_msg_id: Some("x".into()),
            created_at: 0,
        };
        let check = |m: &Message| validate(&Unchecked::from_message(m), 10).map(|_| ());
        assert_eq!(check(&m), Ok(()));
        m.content = "x".repeat(11);
        let e = check(&m).expect_err("too large");
        assert_eq!(e, Invalid::TooLarge { len: 11, max: 10 });
        assert_eq!(
            (e.code(), e.dead_letter_reason()),
            (ErrorCode::TooLarge, "invalid content")
        );
        m.content = "hi".into();
        m.target = Target::User("a b".into());
        let e = check(&m).expect_err("bad target");
        assert_eq!(e, Invalid::BadId(IdField::To));
        assert_eq!(e.dead_letter_reason(), "invalid target id");
    }

    #[test]
    fn events_have_the_contract_shape() {
        let m = Message {
            id: "i".into(),
            sender_id: "a".into(),
            target: Target::User("b".into()),
            content: "c".into(),
            client_msg_id: None,
            created_at: 1_700_000_000_123,
        };
        let (name, v) = m.to_event();
        assert_eq!(name, MESSAGE_RECEIVE);
        assert_eq!(
            v,
            json!({"id":"i","senderId":"a","receiverId":"b","content":"c","createdAt":"2023-11-14T22:13:20.123Z"})
        );
        assert_eq!(m.route_keys().len(), 2);
    }
}
