//! The Lua scripts. Each runs atomically on the Redis server, which is what
//! lets a check and the write that depends on it happen in one round trip
//! with no interleaving (publish to every bound server, compare-and-renew a
//! lease, "dead-letter only if this consumer still owns the entry").
//!
//! Next to each script is its typed wrapper: a `call` that builds the
//! script's KEYS and ARGV from the backend's keys and settings, runs it
//! bounded by `operation_timeout`, and returns its reply as a type (the
//! nested replies parsed in [`crate::reply`]), so no caller spells KEYS and
//! ARGV by hand.
//!
//! They are sent with EVALSHA (redis-rs' `Script` falls back to loading the
//! source on `NOSCRIPT`, e.g. after a Redis restart), so the source crosses
//! the network once per server, not per call.
//!
//! Some scripts build key names from a prefix passed in ARGV (route sets,
//! per-server channels) instead of declaring every key in KEYS: the set of
//! keys depends on data read inside the script. That is fine on a standalone
//! Redis (or a primary with replicas) and is the reason this backend does not
//! support Redis Cluster; see `docs/backends/redis.md`.

use std::time::Duration;

use fanout_backend::{BackendError, IncomingEvent, RouteKey, ServerId};
use redis::{FromRedisValue, Script, ScriptInvocation, Value};

use crate::keys::GROUP;
use crate::reply::{self, Claimed, EntryId, Redelivered};
use crate::Inner;

/// Declares a script's typed wrapper: a struct holding the hashed script
/// and a `call` that runs the invocation `$call` builds (from `$script` and
/// the arguments) through [`invoke`]. With `=> $parse`, the raw reply is
/// handed to `$parse` and `call` returns what it makes of it.
macro_rules! wrapper {
    (
        $(#[$doc:meta])*
        $name:ident |$script:ident, $inner:ident $(, $arg:ident: $ty:ty)*| -> $ret:ty
        { $call:expr }
    ) => {
        wrapper! {
            $(#[$doc])*
            $name |$script, $inner $(, $arg: $ty)*| -> $ret { $call } => std::convert::identity
        }
    };
    (
        $(#[$doc:meta])*
        $name:ident |$script:ident, $inner:ident $(, $arg:ident: $ty:ty)*| -> $ret:ty
        { $call:expr } => $parse:expr
    ) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub(crate) struct $name(Script);

        impl $name {
            pub(crate) async fn call(
                &self,
                $inner: &Inner,
                $($arg: $ty),*
            ) -> Result<$ret, BackendError> {
                let $script = &self.0;
                Ok(($parse)(invoke($inner, $call).await?))
            }
        }
    };
}

/// Shared by the scripts that may move an incoming entry to the dead-letter
/// stream: copies the entry's fields, adds why and how often it was
/// delivered, and acks it so it is never delivered again. The dead-letter
/// stream is never trimmed: dead letters leave it only by an operator's
/// replay or drop.
const DEAD_LETTER_FN: &str = r#"
local function dead_letter(stream, dead, group, id, reason, attempts, partition)
  local e = redis.call('XRANGE', stream, id, id)
  if #e > 0 then
    local args = {'XADD', dead, '*'}
    for _, v in ipairs(e[1][2]) do args[#args + 1] = v end
    args[#args + 1] = 'reason'; args[#args + 1] = reason
    args[#args + 1] = 'attempts'; args[#args + 1] = tostring(attempts)
    args[#args + 1] = 'partition'; args[#args + 1] = partition
    args[#args + 1] = 'entry'; args[#args + 1] = id
    redis.call(unpack(args))
  end
  redis.call('XACK', stream, group, id)
end
"#;

/// Outgoing publish: look up the servers bound to a route key and publish
/// the frame on each server's channel, in one round trip.
///
/// KEYS[1] = route set. ARGV[1] = channel prefix (`{ns}:out:`), ARGV[2] =
/// frame. Returns `{bound, received}`: servers in the set, and servers whose
/// channel had at least one subscriber (the message reached them).
const PUBLISH: &str = r#"
local servers = redis.call('SMEMBERS', KEYS[1])
local received = 0
for _, s in ipairs(servers) do
  if redis.call('PUBLISH', ARGV[1] .. s, ARGV[2]) > 0 then received = received + 1 end
end
return {#servers, received}
"#;

wrapper! {
    /// Calls [`PUBLISH`]: the frame to every server bound to `key`. Returns
    /// `(bound, received)`.
    Publish |script, inner, key: &RouteKey, frame: &[u8]| -> (u64, u64) {
        script
            .key(inner.keys.route(key))
            .arg(inner.keys.out_prefix())
            .arg(frame)
    }
}

/// Bind: add a route, but only for the current holder of the server id.
///
/// KEYS[1] = route set, KEYS[2] = the server's key set, KEYS[3] = liveness
/// key, KEYS[4] = servers set. ARGV[1] = server id, ARGV[2] = routing key,
/// ARGV[3] = holder token, ARGV[4] = liveness TTL ms.
/// Returns 1 (bound), 0 (bound, but the liveness key had expired and was
/// re-asserted: the janitor may have removed routes, so the caller reports
/// `RoutesLost`), -1 (another process holds the id now: nothing written).
const BIND: &str = r#"
local a = redis.call('GET', KEYS[3])
local code = 1
if a == false then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
  redis.call('SADD', KEYS[4], ARGV[1])
  code = 0
elseif a ~= ARGV[3] then
  return -1
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return code
"#;

wrapper! {
    /// Calls [`BIND`] for the registration holding `token`. Returns 1, 0 or
    /// -1 as the script says.
    Bind |script, inner, server: &ServerId, key: &RouteKey, token: &str| -> i64 {
        script
            .key(inner.keys.route(key))
            .key(inner.keys.server_keys(server.as_str()))
            .key(inner.keys.alive(server.as_str()))
            .key(inner.keys.servers())
            .arg(server.as_str())
            .arg(key.as_routing_key())
            .arg(token)
            .arg(ms(inner.config.liveness_ttl))
    }
}

/// Liveness: take the id (`claim`) or refresh / re-assert it (`refresh`).
///
/// KEYS[1] = liveness key, KEYS[2] = servers set. ARGV[1] = token, ARGV[2] =
/// TTL ms, ARGV[3] = server id, ARGV[4] = mode, ARGV[5] = the server's
/// Pub/Sub channel.
/// `claim` takes the id and returns 1, unless another token holds it and
/// someone is subscribed to the id's channel (a live process: -1). A
/// holder with no subscriber is a crashed predecessor, replaced at once.
/// `refresh` returns 1 (still ours, extended), 0 (had expired:
/// re-asserted, routes may be gone) or -1 (another token holds it: left
/// alone).
const ALIVE: &str = r#"
if ARGV[4] == 'claim' then
  local held = redis.call('GET', KEYS[1])
  if held and held ~= ARGV[1] then
    local subs = redis.call('PUBSUB', 'NUMSUB', ARGV[5])
    if tonumber(subs[2]) > 0 then return -1 end
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  return 1
end
local a = redis.call('GET', KEYS[1])
if a == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif a == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  return 0
end
return -1
"#;

wrapper! {
    /// Calls [`ALIVE`] for `server` in `mode` (`claim` or `refresh`).
    /// Returns 1, 0 or -1 as the script says.
    Alive |script, inner, server: &ServerId, token: &str, mode: &str| -> i64 {
        script
            .key(inner.keys.alive(server.as_str()))
            .key(inner.keys.servers())
            .arg(token)
            .arg(ms(inner.config.liveness_ttl))
            .arg(server.as_str())
            .arg(mode)
            .arg(inner.keys.out_channel(server))
    }
}

/// Removes one batch of a server's routes. Batched so that a gateway with
/// 100,000 users does not block Redis for the whole cleanup.
///
/// KEYS[1] = the server's key set, KEYS[2] = liveness key, KEYS[3] =
/// servers set. ARGV[1] = mode, ARGV[2] = token, ARGV[3] = batch size,
/// ARGV[4] = route prefix (`{ns}:route:`), ARGV[5] = server id.
/// Modes guard against removing routes of a newer holder of the id:
/// `owner` runs only while the liveness key holds the token (registration
/// wiping a predecessor's routes), `janitor` only while there is no liveness
/// key, `deregister` while it holds the token or is gone.
/// Returns `{keys left, keys removed}`; `{-1, 0}` when the guard refused.
const CLEANUP: &str = r#"
local a = redis.call('GET', KEYS[2])
local mode = ARGV[1]
if mode == 'owner' and a ~= ARGV[2] then return {-1, 0} end
if mode == 'janitor' and a ~= false then return {-1, 0} end
if mode == 'deregister' and a ~= false and a ~= ARGV[2] then return {-1, 0} end
local keys = redis.call('SPOP', KEYS[1], tonumber(ARGV[3]))
for _, k in ipairs(keys) do
  redis.call('SREM', ARGV[4] .. k, ARGV[5])
end
local left = redis.call('SCARD', KEYS[1])
if left == 0 then
  if mode == 'janitor' then
    redis.call('SREM', KEYS[3], ARGV[5])
  elseif mode == 'deregister' then
    if a == ARGV[2] then redis.call('DEL', KEYS[2]) end
    if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[5]) end
  end
end
return {left, #keys}
"#;

wrapper! {
    /// Calls [`CLEANUP`] once: removes up to `batch` routes of `server` in
    /// `mode`. Returns `(keys left, keys removed)`.
    Cleanup |script, inner, server: &str, token: &str, mode: &str, batch: usize| -> (i64, u64) {
        script
            .key(inner.keys.server_keys(server))
            .key(inner.keys.alive(server))
            .key(inner.keys.servers())
            .arg(mode)
            .arg(token)
            .arg(batch)
            .arg(inner.keys.route_prefix())
            .arg(server)
    }
}

/// Consumer heartbeat, lease renewal and acquisition, in one round trip.
///
/// KEYS[1] = consumers ZSET, KEYS[2..] = the lease key of each partition in
/// order. ARGV[1] = consumer token, ARGV[2] = lease TTL ms (also how long a
/// consumer stays a member without a heartbeat).
/// Live consumers are sorted by token; partition p is *desired* by the
/// consumer at index `p mod n`. Per partition the reply says: 0 not ours,
/// 1 ours and desired (renewed), 2 ours but not desired (renewed; release it
/// once drained), 3 acquired now (was free and desired).
const MAINTAIN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - ttl))
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
local n = #members
local me = 0
for i, m in ipairs(members) do if m == ARGV[1] then me = i - 1 end end
local out = {}
for i = 2, #KEYS do
  local p = i - 2
  local desired = (p % n) == me
  local owner = redis.call('GET', KEYS[i])
  local status = 0
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ttl)
    if desired then status = 1 else status = 2 end
  elseif owner == false and desired then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ttl)
    status = 3
  end
  out[#out + 1] = status
end
return out
"#;

wrapper! {
    /// Calls [`MAINTAIN`] for the consumer `token` over every partition.
    /// Returns one status per partition, in order.
    Maintain |script, inner, token: &str| -> Vec<i64> {
        &{
            let mut call = script.key(inner.keys.consumers());
            for p in 0..inner.config.partitions {
                call.key(inner.keys.lease(p));
            }
            call.arg(token).arg(ms(inner.config.lease_ttl));
            call
        }
    }
}

/// Shared by `RELEASE` and `LEAVE`: makes this consumer's pending entries
/// of one stream claimable at once by the next owner (their idle time is set
/// to `claim_idle` without touching the delivery count), so a graceful
/// hand-over does not wait for the entries to age.
const HANDOVER_FN: &str = r#"
local function handover(stream, group, me, idle)
  local from = '-'
  while true do
    local pend = redis.pcall('XPENDING', stream, group, from, '+', 500, me)
    -- No stream or no group (e.g. deleted by an operator): nothing pending.
    if type(pend) ~= 'table' or pend.err or #pend == 0 then return end
    local args = {'XCLAIM', stream, group, me, 0}
    for _, pe in ipairs(pend) do args[#args + 1] = pe[1] end
    args[#args + 1] = 'IDLE'; args[#args + 1] = idle; args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
    if #pend < 500 then return end
    from = '(' .. pend[#pend][1]
  end
end
"#;

/// Gives one partition back: hands over what is still pending (normally
/// nothing: releases wait for the partition to drain) and deletes the lease
/// if it is still ours.
///
/// KEYS[1] = stream, KEYS[2] = lease. ARGV[1] = group, ARGV[2] = token,
/// ARGV[3] = idle ms to stamp on pending entries.
const RELEASE_BODY: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
handover(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
redis.call('DEL', KEYS[2])
return 1
"#;

wrapper! {
    /// Calls `RELEASE` for partition `p`. Returns 1 (released) or 0 (the
    /// lease was no longer ours).
    Release |script, inner, p: u32, token: &str| -> i64 {
        script
            .key(inner.keys.stream(p))
            .key(inner.keys.lease(p))
            .arg(GROUP)
            .arg(token)
            .arg(ms(inner.config.claim_idle))
    }
}

/// A consumer leaves the group: out of the membership ZSET, every pending
/// entry it holds handed over, every lease it holds deleted.
///
/// KEYS[1] = consumers ZSET, then pairs (stream, lease) for each partition.
/// ARGV[1] = group, ARGV[2] = token, ARGV[3] = idle ms.
const LEAVE_BODY: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[2])
for i = 2, #KEYS, 2 do
  handover(KEYS[i], ARGV[1], ARGV[2], ARGV[3])
  if redis.call('GET', KEYS[i + 1]) == ARGV[2] then redis.call('DEL', KEYS[i + 1]) end
end
return 1
"#;

wrapper! {
    /// Calls `LEAVE` for the consumer `token` over every partition.
    Leave |script, inner, token: &str| -> i64 {
        &{
            let mut call = script.key(inner.keys.consumers());
            for p in 0..inner.config.partitions {
                call.key(inner.keys.stream(p)).key(inner.keys.lease(p));
            }
            call.arg(GROUP).arg(token).arg(ms(inner.config.claim_idle));
            call
        }
    }
}

/// Takes over the pending entries of a partition a consumer has just
/// acquired, oldest first, starting after a cursor.
///
/// KEYS[1] = stream. ARGV[1] = group, ARGV[2] = token, ARGV[3] = min idle
/// ms (claim_idle), ARGV[4] = batch, ARGV[5] = start (`-` or `(id`).
/// Stops at the first entry that is not idle long enough, so that a later
/// entry is never delivered before an earlier one (which XAUTOCLAIM alone
/// would do: it skips entries that are too young). However often an entry
/// was claimed before, it is claimed again: a take-over says nothing about
/// the entry (the worker decides what is dead-lettered).
/// Returns `{status, last id seen, {{id, fields, attempt}, ...}}` with
/// status `done`, `more` or `wait`.
const CLAIM: &str = r#"
local batch = tonumber(ARGV[4])
local pend = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[5], '+', batch)
local out = {}
local last = ''
local status = 'done'
if #pend >= batch then status = 'more' end
for _, pe in ipairs(pend) do
  local id, idle, n = pe[1], pe[3], pe[4]
  if idle < tonumber(ARGV[3]) then status = 'wait'; break end
  local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
  if c[1] and c[1][2] then
    out[#out + 1] = {c[1][1], c[1][2], n + 1}
  else
    -- The entry was trimmed or deleted: nothing left to deliver.
    redis.call('XACK', KEYS[1], ARGV[1], id)
  end
  last = id
end
return {status, last, out}
"#;

wrapper! {
    /// Calls [`CLAIM`] on partition `p` for the consumer `token`: at most
    /// `batch` entries after `start`. `None` if the reply is not the
    /// script's.
    Claim |script, inner, p: u32, token: &str, batch: usize, start: &str| -> Option<Claimed> {
        script
            .key(inner.keys.stream(p))
            .arg(GROUP)
            .arg(token)
            .arg(ms(inner.config.claim_idle))
            .arg(batch)
            .arg(start)
    } => |raw: Value| reply::claimed(&raw)
}

/// Delivers again one entry this consumer holds (after `reject`, a dropped
/// delivery or a failed settle): XCLAIM to itself, which increments the
/// delivery count (informational: nothing is dead-lettered by it).
///
/// KEYS[1] = stream. ARGV[1] = group, ARGV[2] = token, ARGV[3] = id.
/// Returns `{'ok', fields, attempt}` or `{'gone'}` (acked, or now held by
/// another consumer).
const REDELIVER: &str = r#"
local pe = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pe == 0 or pe[1][2] ~= ARGV[2] then return {'gone'} end
local n = pe[1][4]
local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3])
if c[1] and c[1][2] then return {'ok', c[1][2], n + 1} end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return {'gone'}
"#;

wrapper! {
    /// Calls [`REDELIVER`] on partition `p` for entry `id` of the consumer
    /// `token`.
    Redeliver |script, inner, p: u32, token: &str, id: EntryId| -> Redelivered {
        script
            .key(inner.keys.stream(p))
            .arg(GROUP)
            .arg(token)
            .arg(id.to_string())
    } => |raw: Value| reply::redelivered(&raw)
}

/// `reject` and `dead_letter` of one delivery, only if this consumer still
/// holds the entry (if another consumer took it over, it is theirs now).
///
/// KEYS[1] = stream, KEYS[2] = dead-letter stream. ARGV[1] = group,
/// ARGV[2] = token, ARGV[3] = id, ARGV[4] = `reject` or `dead`, ARGV[5] =
/// reason, ARGV[6] = partition. Returns `requeue`, `dead` or `gone`.
const SETTLE_BODY: &str = r#"
local pe = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pe == 0 or pe[1][2] ~= ARGV[2] then return 'gone' end
if ARGV[4] == 'reject' then return 'requeue' end
dead_letter(KEYS[1], KEYS[2], ARGV[1], ARGV[3], ARGV[5], pe[1][4], ARGV[6])
return 'dead'
"#;

/// What `SETTLE` does with the entry (ARGV[4]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SettleMode {
    /// `reject`: leave it pending on this consumer, to be delivered again.
    Reject,
    /// `dead`: move it to the dead-letter stream.
    Dead,
}

/// What `SETTLE` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// `requeue`: still ours; deliver it again.
    Requeue,
    /// `dead`: dead-lettered.
    Dead,
    /// `gone` (or any other answer): no longer ours.
    Gone,
}

impl SettleMode {
    fn as_arg(self) -> &'static str {
        match self {
            SettleMode::Reject => "reject",
            SettleMode::Dead => "dead",
        }
    }
}

impl Settled {
    fn from_reply(outcome: String) -> Self {
        match outcome.as_str() {
            "requeue" => Settled::Requeue,
            "dead" => Settled::Dead,
            _ => Settled::Gone,
        }
    }
}

wrapper! {
    /// Calls `SETTLE` on partition `p` for entry `id` of the consumer
    /// `token`.
    Settle |
        script, inner, p: u32, token: &str, id: EntryId, mode: SettleMode, reason: &str
    | -> Settled {
        script
            .key(inner.keys.stream(p))
            .key(inner.keys.dead())
            .arg(GROUP)
            .arg(token)
            .arg(id.to_string())
            .arg(mode.as_arg())
            .arg(reason)
            .arg(p)
    } => Settled::from_reply
}

/// Replays one dead letter: removes it from the dead-letter stream and
/// appends its event to its partition stream, both or neither, so two
/// operators replaying at once never replay one dead letter twice.
///
/// KEYS[1] = dead-letter stream, KEYS[2] = partition stream. ARGV[1] =
/// dead-letter entry id, ARGV[2] = event id, ARGV[3] = ordering key,
/// ARGV[4] = payload. Returns 1 (replayed) or 0 (gone already).
const REPLAY: &str = r#"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[2], 'k', ARGV[3], 'p', ARGV[4])
return 1
"#;

wrapper! {
    /// Calls [`REPLAY`]: the dead letter at `entry_id` back to partition
    /// `p`. Returns 1 (replayed) or 0 (gone already).
    Replay |script, inner, entry_id: &str, p: u32, event: &IncomingEvent| -> i64 {
        script
            .key(inner.keys.dead())
            .key(inner.keys.stream(p))
            .arg(entry_id)
            .arg(&event.id)
            .arg(event.ordering_key.as_str())
            .arg(event.payload.as_ref())
    }
}

/// Trims one incoming stream without ever removing an unacked entry.
///
/// KEYS[1] = stream. ARGV[1] = group, ARGV[2] = max length.
/// Nothing happens while the stream holds at most `max length` entries.
/// Beyond it, every entry older than the group's oldest pending entry (or,
/// with nothing pending, older than its last-delivered id) is removed with
/// `XTRIM MINID`: all of those were delivered and acked. Entries not yet
/// delivered and entries pending are never touched, so an unconsumed backlog
/// can exceed the bound. Without the group, nothing is known to be consumed
/// and nothing is trimmed. Returns the number of entries removed.
const TRIM: &str = r#"
local len = redis.call('XLEN', KEYS[1])
if len <= tonumber(ARGV[2]) then return 0 end
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if type(groups) ~= 'table' or groups.err then return 0 end
local last = nil
for _, g in ipairs(groups) do
  local name, ld
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then ld = g[i + 1] end
  end
  if name == ARGV[1] then last = ld end
end
if not last or last == '0-0' then return 0 end
local floor = last
local pend = redis.call('XPENDING', KEYS[1], ARGV[1])
if pend[1] > 0 then floor = pend[2] end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"#;

wrapper! {
    /// Calls [`TRIM`] on partition `p`'s stream. Returns the entries
    /// removed.
    Trim |script, inner, p: u32| -> u64 {
        script
            .key(inner.keys.stream(p))
            .arg(GROUP)
            .arg(inner.config.max_stream_len)
    }
}

/// Removes consumers of a stream's group that are gone: not members of the
/// consumers ZSET, nothing pending, idle for a while. Checked and deleted
/// in one script so a consumer cannot receive entries between the check and
/// the delete (XGROUP DELCONSUMER drops a consumer's pending entries).
///
/// KEYS[1] = stream, KEYS[2] = consumers ZSET. ARGV[1] = group, ARGV[2] =
/// min idle ms. Returns the number of consumers removed.
const GC_CONSUMERS: &str = r#"
local cs = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(cs) ~= 'table' or cs.err then return 0 end
local removed = 0
for _, c in ipairs(cs) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name and pending == 0 and idle >= tonumber(ARGV[2])
     and redis.call('ZSCORE', KEYS[2], name) == false then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
"#;

wrapper! {
    /// Calls [`GC_CONSUMERS`] on partition `p`'s stream. Returns the
    /// consumers removed.
    GcConsumers |script, inner, p: u32, min_idle: Duration| -> u64 {
        script
            .key(inner.keys.stream(p))
            .key(inner.keys.consumers())
            .arg(GROUP)
            .arg(ms(min_idle))
    }
}

/// Runs one script call on the command connection, bounded by
/// `operation_timeout` like every call.
async fn invoke<T: FromRedisValue>(
    inner: &Inner,
    call: &ScriptInvocation<'_>,
) -> Result<T, BackendError> {
    let mut conn = inner.conn();
    inner.run(call.invoke_async(&mut conn)).await
}

/// A duration as the milliseconds the scripts take.
fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Every script, hashed once per backend.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub publish: Publish,
    pub bind: Bind,
    pub alive: Alive,
    pub cleanup: Cleanup,
    pub maintain: Maintain,
    pub release: Release,
    pub leave: Leave,
    pub claim: Claim,
    pub redeliver: Redeliver,
    pub settle: Settle,
    pub replay: Replay,
    pub trim: Trim,
    pub gc_consumers: GcConsumers,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            publish: Publish(Script::new(PUBLISH)),
            bind: Bind(Script::new(BIND)),
            alive: Alive(Script::new(ALIVE)),
            cleanup: Cleanup(Script::new(CLEANUP)),
            maintain: Maintain(Script::new(MAINTAIN)),
            release: Release(Script::new(&format!("{HANDOVER_FN}{RELEASE_BODY}"))),
            leave: Leave(Script::new(&format!("{HANDOVER_FN}{LEAVE_BODY}"))),
            claim: Claim(Script::new(CLAIM)),
            redeliver: Redeliver(Script::new(REDELIVER)),
            settle: Settle(Script::new(&format!("{DEAD_LETTER_FN}{SETTLE_BODY}"))),
            replay: Replay(Script::new(REPLAY)),
            trim: Trim(Script::new(TRIM)),
            gc_consumers: GcConsumers(Script::new(GC_CONSUMERS)),
        }
    }
}
