//! Parsing of raw Redis replies: stream entries (XRANGE, XREADGROUP),
//! XPENDING rows, and the replies of the CLAIM and REDELIVER scripts.
//!
//! Redis answers these with nested arrays that redis-rs cannot map onto
//! types by itself. The parsers are lenient on purpose: a part that is not
//! what this backend writes is skipped, or handed back as a malformed entry
//! (`event: None`) for the caller to dead-letter, never turned into an
//! error, so that one odd entry cannot stop a consumer.

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;
use fanout_backend::{DeadLetter, IncomingEvent, OrderingKey};
use redis::Value;

/// A stream entry id, `ms-seq`, ordered like Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    fn from_value(v: &Value) -> Option<Self> {
        as_str(v).and_then(Self::parse)
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<&str> {
    as_bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_str(other).and_then(|s| s.parse().ok()),
    }
}

/// An attempt count (a delivery count plus one) as a script returns it.
fn as_attempt(v: Option<&Value>) -> Option<u32> {
    v.and_then(as_int).and_then(|n| u32::try_from(n).ok())
}

/// The fields of an entry (`[f1, v1, f2, v2, ...]`), by name. Anything but
/// an array reads as no fields.
#[derive(Debug, Default)]
pub(crate) struct Fields<'a>(HashMap<&'a str, &'a Value>);

impl<'a> Fields<'a> {
    pub(crate) fn parse(v: &'a Value) -> Self {
        let mut out = HashMap::new();
        if let Value::Array(items) = v {
            for pair in items.chunks(2) {
                if let [k, v] = pair {
                    if let Some(k) = as_str(k) {
                        out.insert(k, v);
                    }
                }
            }
        }
        Self(out)
    }

    /// The incoming event of an entry this backend wrote (fields `id`, `k`,
    /// `p`); `None` if malformed.
    pub(crate) fn event(&self) -> Option<IncomingEvent> {
        Some(IncomingEvent {
            id: as_str(self.0.get("id")?)?.to_owned(),
            ordering_key: OrderingKey::from_raw(as_str(self.0.get("k")?)?),
            payload: Bytes::copy_from_slice(as_bytes(self.0.get("p")?)?),
        })
    }

    /// The dead letter of an entry of the dead-letter stream (the event's
    /// fields plus `reason` and `attempts`); `None` if its event is
    /// malformed.
    pub(crate) fn dead_letter(&self) -> Option<DeadLetter> {
        Some(DeadLetter {
            event: self.event()?,
            reason: self
                .0
                .get("reason")
                .and_then(|v| as_str(v))
                .unwrap_or_default()
                .to_owned(),
            attempts: as_attempt(self.0.get("attempts").copied()).unwrap_or(0),
        })
    }
}

/// One entry of an XRANGE reply, `[id, fields]`: `None` unless it has both.
pub(crate) fn range_entry(v: &Value) -> Option<(&str, Fields<'_>)> {
    let Value::Array(parts) = v else { return None };
    let id = parts.first().and_then(as_str)?;
    Some((id, Fields::parse(parts.get(1)?)))
}

/// An entry read for delivery; `event` is `None` when the entry is
/// malformed (not written by this backend).
#[derive(Debug)]
pub(crate) struct ReadEntry {
    pub id: EntryId,
    pub event: Option<IncomingEvent>,
}

/// An XREADGROUP reply: each stream's key with its entries. Entries without
/// a valid id are skipped.
pub(crate) fn read_group(v: &Value) -> Vec<(&str, Vec<ReadEntry>)> {
    let Value::Array(streams) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(kv) = s else { continue };
        let (Some(key), Some(Value::Array(entries))) = (kv.first().and_then(as_str), kv.get(1))
        else {
            continue;
        };
        let entries = entries
            .iter()
            .filter_map(|e| {
                let Value::Array(e) = e else { return None };
                let id = e.first().and_then(EntryId::from_value)?;
                let event = e.get(1).map(Fields::parse).unwrap_or_default().event();
                Some(ReadEntry { id, event })
            })
            .collect();
        out.push((key, entries));
    }
    out
}

/// The ids of an XPENDING reply in its extended form (rows `[id, consumer,
/// idle, count]`); rows without a valid id are skipped.
pub(crate) fn pending_ids(v: &Value) -> Vec<EntryId> {
    let Value::Array(rows) = v else {
        return Vec::new();
    };
    rows.iter()
        .filter_map(|row| {
            let Value::Array(row) = row else { return None };
            row.first().and_then(EntryId::from_value)
        })
        .collect()
}

/// How a CLAIM call left the take-over of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimStatus {
    /// Nothing more pending: read new entries from now on.
    Done,
    /// A full batch: claim again at once.
    More,
    /// Stopped at an entry not idle long enough: claim again later.
    Wait,
}

/// A CLAIM reply: `{status, last id seen, {{id, fields, attempt}, ...}}`.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub status: ClaimStatus,
    /// The last pending id looked at; empty if none.
    pub last: String,
    pub entries: Vec<(ReadEntry, u32)>,
}

/// Parses a CLAIM reply; `None` if it is not an array. An unknown status
/// reads as done; an entry without an attempt count as its second delivery.
pub(crate) fn claimed(v: &Value) -> Option<Claimed> {
    let Value::Array(parts) = v else { return None };
    let status = match parts.first().and_then(as_str).unwrap_or("done") {
        "more" => ClaimStatus::More,
        "wait" => ClaimStatus::Wait,
        _ => ClaimStatus::Done,
    };
    let last = parts.get(1).and_then(as_str).unwrap_or("").to_owned();
    let mut entries = Vec::new();
    if let Some(Value::Array(raw)) = parts.get(2) {
        for e in raw {
            let Value::Array(e) = e else { continue };
            let (Some(id), Some(f)) = (
                e.first().and_then(EntryId::from_value),
                e.get(1).map(Fields::parse),
            ) else {
                continue;
            };
            let attempt = as_attempt(e.get(2)).unwrap_or(2);
            entries.push((
                ReadEntry {
                    id,
                    event: f.event(),
                },
                attempt,
            ));
        }
    }
    Some(Claimed {
        status,
        last,
        entries,
    })
}

/// A REDELIVER reply: `{'ok', fields, attempt}` or `{'gone'}`.
#[derive(Debug)]
pub(crate) enum Redelivered {
    /// Claimed again by this consumer; `event` is `None` if malformed.
    Again {
        event: Option<IncomingEvent>,
        attempt: u32,
    },
    /// Acked meanwhile, or now another consumer's.
    Gone,
}

/// Parses a REDELIVER reply; anything but `ok` reads as gone, an `ok`
/// without an attempt count as a first delivery.
pub(crate) fn redelivered(v: &Value) -> Redelivered {
    let Value::Array(parts) = v else {
        return Redelivered::Gone;
    };
    if parts.first().and_then(as_str) != Some("ok") {
        return Redelivered::Gone;
    }
    Redelivered::Again {
        event: parts.get(1).map(Fields::parse).unwrap_or_default().event(),
        attempt: as_attempt(parts.get(2)).unwrap_or(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn array(items: Vec<Value>) -> Value {
        Value::Array(items)
    }

    /// The fields this backend writes for an incoming event.
    fn event_fields(id: &str) -> Value {
        array(vec![
            bulk("id"),
            bulk(id),
            bulk("k"),
            bulk("room-1"),
            bulk("p"),
            bulk("{}"),
        ])
    }

    #[test]
    fn entry_ids_order_like_redis() {
        let a = EntryId::parse("1700000000000-2").expect("id");
        let b = EntryId::parse("1700000000000-10").expect("id");
        let c = EntryId::parse("1700000000001-0").expect("id");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert_eq!(EntryId::parse("x-1"), None);
        assert_eq!(EntryId::parse("12"), None);
    }

    #[test]
    fn fields_read_an_event_and_a_dead_letter() {
        let v = event_fields("e1");
        let event = Fields::parse(&v).event().expect("event");
        assert_eq!(event.id, "e1");
        assert_eq!(event.ordering_key.as_str(), "room-1");
        assert_eq!(event.payload.as_ref(), b"{}");

        let dead = array(vec![
            bulk("id"),
            bulk("e1"),
            bulk("k"),
            bulk("room-1"),
            bulk("p"),
            bulk("{}"),
            bulk("reason"),
            bulk("poison"),
            bulk("attempts"),
            bulk("3"),
        ]);
        let d = Fields::parse(&dead).dead_letter().expect("dead letter");
        assert_eq!(
            (d.event.id.as_str(), d.reason.as_str(), d.attempts),
            ("e1", "poison", 3)
        );

        // Missing `p`, and not an array at all: malformed.
        let partial = array(vec![bulk("id"), bulk("e1"), bulk("k"), bulk("room-1")]);
        assert!(Fields::parse(&partial).event().is_none());
        assert!(Fields::parse(&Value::Nil).event().is_none());
    }

    #[test]
    fn range_entries_need_an_id_and_fields() {
        let ok = array(vec![bulk("1-0"), event_fields("e1")]);
        let (id, f) = range_entry(&ok).expect("entry");
        assert_eq!(id, "1-0");
        assert_eq!(f.event().expect("event").id, "e1");
        assert!(range_entry(&array(vec![bulk("1-0")])).is_none());
        assert!(range_entry(&bulk("1-0")).is_none());
    }

    #[test]
    fn read_group_keeps_malformed_entries_and_skips_bad_ids() {
        let reply = array(vec![array(vec![
            bulk("ns:in:3"),
            array(vec![
                array(vec![bulk("1-1"), event_fields("e1")]),
                array(vec![bulk("not-an-id"), event_fields("e2")]),
                array(vec![bulk("1-2"), array(vec![bulk("id")])]),
                array(vec![bulk("1-3")]),
            ]),
        ])]);
        let streams = read_group(&reply);
        assert_eq!(streams.len(), 1);
        let (key, entries) = &streams[0];
        assert_eq!(*key, "ns:in:3");
        let seen: Vec<(String, bool)> = entries
            .iter()
            .map(|e| (e.id.to_string(), e.event.is_some()))
            .collect();
        assert_eq!(
            seen,
            [
                ("1-1".to_owned(), true),
                ("1-2".to_owned(), false),
                ("1-3".to_owned(), false)
            ]
        );
        assert!(read_group(&Value::Nil).is_empty());
    }

    #[test]
    fn pending_ids_are_the_first_column() {
        let reply = array(vec![
            array(vec![bulk("5-0"), bulk("c1"), Value::Int(10), Value::Int(1)]),
            array(vec![bulk("bad"), bulk("c1"), Value::Int(10), Value::Int(1)]),
            array(vec![bulk("5-1"), bulk("c1"), Value::Int(10), Value::Int(2)]),
        ]);
        let ids: Vec<String> = pending_ids(&reply)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ids, ["5-0", "5-1"]);
        assert!(pending_ids(&Value::Nil).is_empty());
    }

    #[test]
    fn claim_replies_parse_status_cursor_and_entries() {
        let reply = array(vec![
            bulk("wait"),
            bulk("7-1"),
            array(vec![
                array(vec![bulk("7-0"), event_fields("e1"), Value::Int(4)]),
                array(vec![bulk("7-1"), array(vec![])]),
                array(vec![bulk("nope"), event_fields("e3"), Value::Int(2)]),
            ]),
        ]);
        let c = claimed(&reply).expect("claim reply");
        assert_eq!(c.status, ClaimStatus::Wait);
        assert_eq!(c.last, "7-1");
        assert_eq!(c.entries.len(), 2);
        assert_eq!(c.entries[0].1, 4);
        assert!(c.entries[0].0.event.is_some());
        // No attempt count: a take-over is at least a second delivery.
        assert_eq!(c.entries[1].1, 2);
        assert!(c.entries[1].0.event.is_none());

        let done = claimed(&array(vec![bulk("done"), bulk(""), array(vec![])])).expect("reply");
        assert_eq!((done.status, done.last.as_str()), (ClaimStatus::Done, ""));
        assert_eq!(
            claimed(&array(vec![bulk("more")])).expect("reply").status,
            ClaimStatus::More
        );
        assert!(claimed(&Value::Nil).is_none());
    }

    #[test]
    fn redeliver_replies_are_ok_or_gone() {
        let ok = array(vec![bulk("ok"), event_fields("e1"), Value::Int(3)]);
        match redelivered(&ok) {
            Redelivered::Again { event, attempt } => {
                assert_eq!(event.expect("event").id, "e1");
                assert_eq!(attempt, 3);
            }
            Redelivered::Gone => panic!("expected an entry"),
        }
        match redelivered(&array(vec![bulk("ok")])) {
            Redelivered::Again { event, attempt } => {
                assert!(event.is_none());
                assert_eq!(attempt, 1);
            }
            Redelivered::Gone => panic!("expected an entry"),
        }
        assert!(matches!(
            redelivered(&array(vec![bulk("gone")])),
            Redelivered::Gone
        ));
        assert!(matches!(redelivered(&Value::Nil), Redelivered::Gone));
    }
}
