//! `auth.resume` (the contract's "Positions and resume"): a reconnecting
//! client gives, per stream, the last position it has; the handshake checks
//! them against the store and plans where the session starts in each
//! stream; once the client is connected, the replay reads every entry
//! after those positions from the store, writes them before any live
//! entry, and answers `RESUMED`.
//!
//! The session holds live entries through the replay and emits them after
//! it, dropping those the replay already showed: no gap and no duplicate
//! at the seam. A stream missing more than `gateway.replay_limit` entries
//! is replayed from its newest `replay_limit` and named in
//! `RESUMED.incomplete`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use socketioxide::{SendError, SocketError};

use super::sessions::{Item, ReplayStream, StreamStart};
use super::Gateway;
use crate::store::{MemberOf, Store, StoreError};
use crate::stream::{Stream, RESUMED};

/// Most streams one `resume` may name (the handshake payload is bounded
/// too; this bounds the work one handshake asks of the store).
pub const MAX_RESUME_STREAMS: usize = 4096;
/// How long the replay waits for room in a client's send buffer before it
/// treats the client as a slow one.
const REPLAY_STALL: Duration = Duration::from_secs(10);
/// Stream reads of one replay in flight at once.
const REPLAY_CONCURRENCY: usize = 8;

/// The positions a client gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions {
    /// Its inbox position.
    pub inbox: i64,
    /// Its channel positions, by channel id.
    pub channels: BTreeMap<String, i64>,
}

/// Why a handshake is refused with `invalid_resume`, or cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The resume is malformed or asks for what the user may not read.
    #[error("invalid resume: {0}")]
    Invalid(String),
    /// The store did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads `auth.resume`: `None` when absent (or null); an error text for
/// anything the contract refuses.
pub fn parse(resume: Option<&Value>) -> Result<Option<Positions>, String> {
    let obj = match resume {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(obj)) => obj,
        Some(_) => return Err("resume must be an object of stream positions".into()),
    };
    if obj.len() > MAX_RESUME_STREAMS {
        return Err(format!(
            "resume names more than {MAX_RESUME_STREAMS} streams"
        ));
    }
    let mut inbox = None;
    let mut channels = BTreeMap::new();
    for (name, v) in obj {
        let seq = v
            .as_u64()
            .and_then(|n| i64::try_from(n).ok())
            .ok_or_else(|| format!("the position of {name:?} must be a non-negative integer"))?;
        if name == "inbox" {
            inbox = Some(seq);
            continue;
        }
        match Stream::parse_key(name) {
            Some(Stream::Channel(c)) => {
                channels.insert(c, seq);
            }
            _ => return Err(format!("unknown stream {name:?}")),
        }
    }
    let inbox = inbox.ok_or("resume must give the inbox position")?;
    Ok(Some(Positions { inbox, channels }))
}

/// Where a connecting session starts.
#[derive(Debug)]
pub struct Plan {
    /// Each stream's start, the inbox first.
    pub starts: Vec<StreamStart>,
    /// The replay of a resume.
    pub replay: Option<Vec<ReplayStream>>,
    /// Streams that start live, at their head: read once more after the
    /// bind ([`Sessions::raise`](super::Sessions::raise)), so that nothing
    /// committed before the bind, and published before it, is awaited.
    pub at_head: Vec<Stream>,
}

/// Plans a session of `user` with `memberships`: without positions, every
/// stream starts at its head (live only, read after the bind); with them, each is checked and
/// replayed after its position (see the module doc and the contract).
pub async fn plan(
    store: &Store,
    user: &str,
    memberships: &[MemberOf],
    positions: Option<&Positions>,
    replay_limit: u32,
) -> Result<Plan, PlanError> {
    let inbox = Stream::Inbox(user.to_owned());
    let mut streams = vec![inbox.clone()];
    streams.extend(
        memberships
            .iter()
            .map(|m| Stream::Channel(m.channel_id.clone())),
    );
    let member: HashMap<&str, &MemberOf> = memberships
        .iter()
        .map(|m| (m.channel_id.as_str(), m))
        .collect();
    if let Some(p) = positions {
        streams.extend(
            p.channels
                .keys()
                .filter(|c| !member.contains_key(c.as_str()))
                .map(|c| Stream::Channel(c.clone())),
        );
    }
    let Some(p) = positions else {
        // Live only: every stream from its head as read after the bind.
        let starts = streams
            .iter()
            .map(|stream| StreamStart::live(stream.clone(), 0))
            .collect();
        return Ok(Plan {
            starts,
            replay: None,
            at_head: streams,
        });
    };
    let heads = store.heads(&streams).await?;
    let head = |s: &Stream| heads.get(s).copied().unwrap_or(0);
    let beyond = |name: &str, given: i64, head: i64| {
        PlanError::Invalid(format!(
            "position {given} of {name} is beyond its head ({head})"
        ))
    };
    if p.inbox > head(&inbox) {
        return Err(beyond("inbox", p.inbox, head(&inbox)));
    }
    let mut starts = vec![StreamStart::live(inbox.clone(), p.inbox)];
    let mut replay = vec![(inbox, p.inbox, None)];
    for (channel, &given) in &p.channels {
        let stream = Stream::Channel(channel.clone());
        let h = head(&stream);
        if given > h {
            return Err(beyond(&stream.client_name(), given, h));
        }
        if let Some(m) = member.get(channel.as_str()) {
            // Never before the entry that added them this time.
            let from = given.max(m.joined_seq - 1);
            starts.push(StreamStart::live(stream.clone(), from));
            replay.push((stream, from, None));
            continue;
        }
        match store.removal_after(channel, user, given).await? {
            Some(removed) => {
                starts.push(StreamStart {
                    stream: stream.clone(),
                    last: given,
                    ends_at: Some(removed),
                    bound: false,
                });
                replay.push((stream, given, Some(removed)));
            }
            None => {
                return Err(PlanError::Invalid(format!(
                    "not a member of channel {channel}"
                )))
            }
        }
    }
    let mut at_head = Vec::new();
    for m in memberships {
        if p.channels.contains_key(&m.channel_id) {
            continue;
        }
        let stream = Stream::Channel(m.channel_id.clone());
        if m.joined_seq > 0 && m.inbox_seq > p.inbox {
            // Added after the client's inbox position: from that entry on.
            let from = m.joined_seq - 1;
            starts.push(StreamStart::live(stream.clone(), from));
            replay.push((stream, from, None));
        } else {
            starts.push(StreamStart::live(stream.clone(), head(&stream)));
            at_head.push(stream);
        }
    }
    let limit = i64::from(replay_limit);
    let replay = replay
        .into_iter()
        .map(|(stream, from, ends_at)| {
            let upto = ends_at.unwrap_or_else(|| head(&stream));
            let incomplete = upto - from > limit;
            ReplayStream {
                from: if incomplete { upto - limit } else { from },
                stream,
                incomplete,
            }
        })
        .collect();
    Ok(Plan {
        starts,
        replay: Some(replay),
        at_head,
    })
}

/// Replays to a session that just connected with a resume, then answers
/// `RESUMED` and lets live entries through (see the module doc).
pub async fn replay(gw: Arc<Gateway>, sid: Sid, streams: Vec<ReplayStream>) {
    let started = Instant::now();
    let limit = gw.config.gateway.replay_limit;
    let mut incomplete: Vec<String> = streams
        .iter()
        .filter(|r| r.incomplete)
        .map(|r| r.stream.client_name())
        .collect();
    let store = &gw.store;
    let reads: Vec<_> = futures::stream::iter(streams)
        .map(|r| async move {
            let read = store.entries_after(&r.stream, r.from, limit).await;
            (r, read)
        })
        .buffered(REPLAY_CONCURRENCY)
        .collect()
        .await;
    let mut batches = Vec::with_capacity(reads.len());
    for (r, read) in reads {
        match read {
            Ok(entries) => {
                let items = entries.into_iter().map(Item::new).collect();
                batches.push((r.stream, r.from, items));
            }
            Err(e) => {
                // The session's position stays; a later gap fill reads it.
                tracing::warn!(stream = %r.stream, error = %e, "replay read failed; the client is told the stream is incomplete");
                if !r.incomplete {
                    incomplete.push(r.stream.client_name());
                }
            }
        }
    }
    let (items, follows) = gw.sessions.replay(sid, batches);
    let Some(socket) = gw.sessions.socket(sid) else {
        return;
    };
    for item in &items {
        let (event, data) = item.event();
        if !write_paced(&socket, event, data).await {
            gw.sessions.cut_off(sid, "a replay");
            return;
        }
    }
    let complete = incomplete.is_empty();
    let mut resumed = json!({ "replayed": items.len(), "complete": complete });
    if !complete {
        resumed["incomplete"] = json!(incomplete);
    }
    if !write_paced(&socket, RESUMED, &resumed).await {
        gw.sessions.cut_off(sid, "RESUMED");
        return;
    }
    let more = gw.sessions.finish_replay(sid);
    gw.metrics.replayed_entries.inc_by(items.len() as u64);
    gw.metrics
        .resumes
        .get_or_create(&vec![("complete", if complete { "true" } else { "false" })])
        .inc();
    gw.metrics
        .replay_seconds
        .observe(started.elapsed().as_secs_f64());
    // After the hold ends: a join's fill skips held sessions.
    gw.follow(follows);
    gw.follow(more);
}

/// Writes one event, waiting for room in the send buffer (a replay may be
/// longer than the buffer); `false` if the socket is closed or stays full
/// for [`REPLAY_STALL`].
async fn write_paced(socket: &SocketRef, event: &'static str, data: &Value) -> bool {
    let deadline = Instant::now() + REPLAY_STALL;
    loop {
        match socket.emit(event, data) {
            Ok(()) => return true,
            Err(SendError::Socket(SocketError::InternalChannelFull))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_shapes_the_contract_refuses() {
        assert_eq!(parse(None), Ok(None));
        assert_eq!(parse(Some(&Value::Null)), Ok(None));
        let ok = parse(Some(&json!({ "inbox": 41, "channel:general": 230 })))
            .expect("valid")
            .expect("present");
        assert_eq!(ok.inbox, 41);
        assert_eq!(ok.channels.get("general"), Some(&230));
        for bad in [
            json!([]),
            json!("inbox"),
            json!(7),
            json!({}),
            json!({ "channel:x": 1 }),
            json!({ "inbox": -1 }),
            json!({ "inbox": 1.5 }),
            json!({ "inbox": "3" }),
            json!({ "inbox": null }),
            json!({ "inbox": 1, "foo": 1 }),
            json!({ "inbox": 1, "channel:": 1 }),
            json!({ "inbox": 1, "inbox:x": 1 }),
            json!({ "inbox": 1, "channel:a b": 1 }),
            json!({ "inbox": 1, "channel:x": 18446744073709551615u64 }),
        ] {
            assert!(parse(Some(&bad)).is_err(), "{bad} must be refused");
        }
    }
}
