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
//! Every script touches the keys of one hash slot (see `keys.rs`), so each
//! runs on a Redis Cluster as on a standalone Redis. Where one operation
//! spans slots (a route set and the server's own record, a stream and the
//! dead letters, a stream and its lease), it is a sequence of single-slot
//! steps, ordered so that a crash between two steps leaves something the
//! next run repairs or a harmless duplicate, never a loss: each such
//! operation says how. The one exception is [`PUBLISH`], standalone only:
//! it reads a route set and publishes to channels of other slots in one
//! round trip; on a cluster the publish is two (`outgoing::publish`).

use std::time::Duration;

use fanout_backend::{BackendError, IncomingEvent, RouteKey, ServerId};
use futures::future::try_join_all;
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

/// Outgoing publish on a standalone Redis: look up the servers bound to a
/// route key and publish the frame on each server's channel, in one round
/// trip.
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

/// Bind, first step: record the routing key in the server's own key set,
/// but only for the current holder of the server id. The caller then adds
/// the server to the route set. In that order, so the janitor (which
/// removes what the key set lists) never misses a route; a crash between the
/// two leaves a key-set entry without its route, which removes nothing.
///
/// KEYS[1] = the server's key set, KEYS[2] = liveness key. ARGV[1] =
/// routing key, ARGV[2] = holder token, ARGV[3] = liveness TTL ms.
/// Returns 1 (bind it), 0 (bind it, but the liveness key had expired and was
/// re-asserted: the janitor may have removed routes, so the caller reports
/// `RoutesLost`), -1 (another process holds the id now: nothing written).
const BIND: &str = r#"
local a = redis.call('GET', KEYS[2])
local code = 1
if a == false then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  code = 0
elseif a ~= ARGV[2] then
  return -1
end
redis.call('SADD', KEYS[1], ARGV[1])
return code
"#;

/// A bind: [`BIND`], then the route set (and, if the liveness had lapsed,
/// the servers set the janitor walks).
#[derive(Debug)]
pub(crate) struct Bind(Script);

impl Bind {
    /// Binds `key` to `server` for the registration holding `token`.
    /// Returns 1, 0 or -1 as [`BIND`] says.
    pub(crate) async fn call(
        &self,
        inner: &Inner,
        server: &ServerId,
        key: &RouteKey,
        token: &str,
    ) -> Result<i64, BackendError> {
        let code: i64 = invoke(
            inner,
            self.0
                .key(inner.keys.server_keys(server.as_str()))
                .key(inner.keys.alive(server.as_str()))
                .arg(key.as_routing_key())
                .arg(token)
                .arg(ms(inner.config.liveness_ttl)),
        )
        .await?;
        if code < 0 {
            return Ok(code);
        }
        inner
            .query::<()>(
                redis::cmd("SADD")
                    .arg(inner.keys.route(key))
                    .arg(server.as_str()),
            )
            .await?;
        if code == 0 {
            add_server(inner, server.as_str()).await?;
        }
        // The route survives a failover of its node only once a replica
        // has it (the key-set write went first, to the server's node).
        inner.replicated(&inner.keys.route(key)).await?;
        inner
            .replicated(&inner.keys.server_keys(server.as_str()))
            .await?;
        Ok(code)
    }
}

/// Adds a server id to the servers set the janitor walks. Idempotent; done
/// before a claim and after every refresh, so an id a racing janitor took
/// out of the set is back within a third of the liveness TTL.
pub(crate) async fn add_server(inner: &Inner, server: &str) -> Result<(), BackendError> {
    inner
        .query::<()>(redis::cmd("SADD").arg(inner.keys.servers()).arg(server))
        .await
}

/// Liveness: take the id (`claim`) or refresh / re-assert it (`refresh`).
///
/// KEYS[1] = liveness key. ARGV[1] = token, ARGV[2] = TTL ms, ARGV[3] =
/// mode, ARGV[4] = the server's channel, ARGV[5] = how to count its
/// subscribers (`NUMSUB`, or `SHARDNUMSUB` for a sharded channel, which on a
/// cluster is in the liveness key's slot).
/// `claim` takes the id and returns 1, unless another token holds it and
/// someone is subscribed to the id's channel (a live process: -1). A
/// holder with no subscriber is a crashed predecessor, replaced at once.
/// `refresh` returns 1 (still ours, extended), 0 (had expired:
/// re-asserted, routes may be gone) or -1 (another token holds it: left
/// alone).
const ALIVE: &str = r#"
if ARGV[3] == 'claim' then
  local held = redis.call('GET', KEYS[1])
  if held and held ~= ARGV[1] then
    local subs = redis.call('PUBSUB', ARGV[5], ARGV[4])
    if tonumber(subs[2]) > 0 then return -1 end
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
local a = redis.call('GET', KEYS[1])
if a == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif a == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 0
end
return -1
"#;

/// Liveness with the servers set: added before a claim (so the janitor
/// knows the id before any route exists) and after every refresh.
#[derive(Debug)]
pub(crate) struct Alive(Script);

impl Alive {
    /// Runs [`ALIVE`] for `server` in `mode` (`claim` or `refresh`).
    /// Returns 1, 0 or -1 as the script says.
    pub(crate) async fn call(
        &self,
        inner: &Inner,
        server: &ServerId,
        token: &str,
        mode: &str,
    ) -> Result<i64, BackendError> {
        if mode == "claim" {
            add_server(inner, server.as_str()).await?;
        }
        let numsub = if inner.cluster() {
            "SHARDNUMSUB"
        } else {
            "NUMSUB"
        };
        let code: i64 = invoke(
            inner,
            self.0
                .key(inner.keys.alive(server.as_str()))
                .arg(token)
                .arg(ms(inner.config.liveness_ttl))
                .arg(mode)
                .arg(inner.keys.out_channel(server))
                .arg(numsub),
        )
        .await?;
        if mode != "claim" && code >= 0 {
            add_server(inner, server.as_str()).await?;
        }
        Ok(code)
    }
}

/// Removes one batch of a server's routes, first step: takes up to a batch
/// of routing keys out of the server's key set, under a guard. The caller
/// then removes the server from those route sets. Batched so that a
/// gateway with 100,000 users does not block Redis for the whole cleanup.
///
/// KEYS[1] = the server's key set, KEYS[2] = liveness key. ARGV[1] = mode,
/// ARGV[2] = token, ARGV[3] = batch size.
/// Modes guard against removing routes of a newer holder of the id:
/// `owner` runs only while the liveness key holds the token (registration
/// wiping a predecessor's routes), `janitor` only while there is no liveness
/// key, `deregister` while it holds the token or is gone.
/// Returns `{keys left, key, key, ...}`; `{-1}` when the guard refused.
const CLEANUP: &str = r#"
local a = redis.call('GET', KEYS[2])
local mode = ARGV[1]
if mode == 'owner' and a ~= ARGV[2] then return {-1} end
if mode == 'janitor' and a ~= false then return {-1} end
if mode == 'deregister' and a ~= false and a ~= ARGV[2] then return {-1} end
local keys = redis.call('SPOP', KEYS[1], tonumber(ARGV[3]))
local out = {redis.call('SCARD', KEYS[1])}
for _, k in ipairs(keys) do out[#out + 1] = k end
return out
"#;

/// Cleanup, last step once the key set is empty: a graceful deregistration
/// gives the id back (deletes the liveness key if it still holds the
/// token). Returns 1 when no liveness key is left (the id can leave the
/// servers set), else 0.
///
/// KEYS[1] = liveness key. ARGV[1] = mode, ARGV[2] = token.
const FORGET: &str = r#"
local a = redis.call('GET', KEYS[1])
if ARGV[1] == 'deregister' and a == ARGV[2] then redis.call('DEL', KEYS[1]); a = false end
if a == false then return 1 end
return 0
"#;

/// A server's route cleanup: [`CLEANUP`] batches, the route sets, then
/// [`FORGET`] and the servers set.
#[derive(Debug)]
pub(crate) struct Cleanup {
    take: Script,
    forget: Script,
}

impl Cleanup {
    /// Removes up to `batch` routes of `server` in `mode`. Returns `(keys
    /// left, keys removed)`; `(-1, 0)` when the guard refused.
    ///
    /// Between taking the keys and removing the routes, a newer holder of
    /// the id (the guard held when the keys were taken) may have bound one
    /// of them again: it is back in the key set then (a bind records the
    /// key first), and its route is put back.
    pub(crate) async fn call(
        &self,
        inner: &Inner,
        server: &str,
        token: &str,
        mode: &str,
        batch: usize,
    ) -> Result<(i64, u64), BackendError> {
        let taken: Vec<Value> = invoke(
            inner,
            self.take
                .key(inner.keys.server_keys(server))
                .key(inner.keys.alive(server))
                .arg(mode)
                .arg(token)
                .arg(batch),
        )
        .await?;
        let left = match taken.first() {
            Some(Value::Int(n)) => *n,
            _ => return Err(BackendError::Unavailable("unexpected CLEANUP reply".into())),
        };
        if left < 0 {
            return Ok((-1, 0));
        }
        let keys: Vec<String> = taken[1..]
            .iter()
            .filter_map(|v| String::from_redis_value(v.clone()).ok())
            .collect();
        let route_of = |k: &str| format!("{}{}", inner.keys.route_prefix(), k);
        try_join_all(keys.iter().map(|k| {
            let mut conn = inner.conn();
            let route = route_of(k);
            async move {
                inner
                    .run(
                        redis::cmd("SREM")
                            .arg(route)
                            .arg(server)
                            .query_async::<()>(&mut conn),
                    )
                    .await
            }
        }))
        .await?;
        if !keys.is_empty() {
            let rebound: Vec<bool> = inner
                .query(
                    redis::cmd("SMISMEMBER")
                        .arg(inner.keys.server_keys(server))
                        .arg(&keys),
                )
                .await?;
            for (k, again) in keys.iter().zip(rebound) {
                if again {
                    inner
                        .query::<()>(redis::cmd("SADD").arg(route_of(k)).arg(server))
                        .await?;
                }
            }
        }
        if left == 0 {
            let gone: i64 = invoke(
                inner,
                self.forget
                    .key(inner.keys.alive(server))
                    .arg(mode)
                    .arg(token),
            )
            .await?;
            if gone == 1 {
                inner
                    .query::<()>(redis::cmd("SREM").arg(inner.keys.servers()).arg(server))
                    .await?;
            }
        }
        Ok((left, keys.len() as u64))
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

/// Makes this consumer's pending entries of one stream claimable at once
/// (see [`HANDOVER_FN`]).
///
/// KEYS[1] = stream. ARGV[1] = group, ARGV[2] = token, ARGV[3] = idle ms.
const HANDOVER_BODY: &str = r#"
handover(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
return 1
"#;

/// Deletes leases if this consumer holds them and, with a ZSET key first,
/// takes it out of the consumers.
///
/// KEYS = [consumers ZSET or nothing], then leases. ARGV[1] = token,
/// ARGV[2] = `leave` (KEYS[1] is the ZSET) or `release`. Returns how many
/// leases were ours.
const DROP_LEASES: &str = r#"
local first = 1
if ARGV[2] == 'leave' then redis.call('ZREM', KEYS[1], ARGV[1]); first = 2 end
local n = 0
for i = first, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]); n = n + 1 end
end
return n
"#;

/// Hand-overs: giving one partition back, or leaving the group. The pending
/// entries are handed over before the lease goes, so the next owner finds
/// them claimable; a crash between the two leaves a lease that expires.
#[derive(Debug)]
pub(crate) struct Handover {
    stream: Script,
    leases: Script,
}

impl Handover {
    async fn hand_over(&self, inner: &Inner, p: u32, token: &str) -> Result<(), BackendError> {
        invoke::<i64>(
            inner,
            self.stream
                .key(inner.keys.stream(p))
                .arg(GROUP)
                .arg(token)
                .arg(ms(inner.config.claim_idle)),
        )
        .await
        .map(drop)
    }

    /// Gives partition `p` back: hands over what is still pending
    /// (normally nothing: releases wait for the partition to drain) and
    /// deletes the lease if it is still ours. Returns 1 (released) or 0
    /// (the lease was no longer ours).
    pub(crate) async fn release(
        &self,
        inner: &Inner,
        p: u32,
        token: &str,
    ) -> Result<i64, BackendError> {
        self.hand_over(inner, p, token).await?;
        invoke(
            inner,
            self.leases
                .key(inner.keys.lease(p))
                .arg(token)
                .arg("release"),
        )
        .await
    }

    /// The consumer `token` leaves the group: every pending entry it holds
    /// handed over, then out of the consumers ZSET with every lease it holds
    /// deleted.
    pub(crate) async fn leave(&self, inner: &Inner, token: &str) -> Result<i64, BackendError> {
        try_join_all((0..inner.config.partitions).map(|p| self.hand_over(inner, p, token))).await?;
        let mut call = self.leases.key(inner.keys.consumers());
        for p in 0..inner.config.partitions {
            call.key(inner.keys.lease(p));
        }
        call.arg(token).arg("leave");
        invoke(inner, &call).await
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
/// KEYS[1] = stream. ARGV[1] = group, ARGV[2] = token, ARGV[3] = id,
/// ARGV[4] = `reject` or `dead`. Returns `requeue`, `gone`, or for `dead`
/// `{'dead', fields, delivery count}` (fields empty if the entry was
/// trimmed): the caller writes the dead letter, then acks the entry.
const SETTLE: &str = r#"
local pe = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pe == 0 or pe[1][2] ~= ARGV[2] then return 'gone' end
if ARGV[4] == 'reject' then return 'requeue' end
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
local fields = {}
if #e > 0 then fields = e[1][2] end
return {'dead', fields, pe[1][4]}
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

/// Settling by script: [`SETTLE`], and for a dead letter the XADD to the
/// dead-letter stream, then the XACK. The dead letter is written before
/// the ack: a crash between the two delivers the entry again, and a second
/// dead letter of it may follow (a duplicate an operator sees, never a
/// loss). The dead-letter stream is never trimmed: dead letters leave it
/// only by an operator's replay or drop.
#[derive(Debug)]
pub(crate) struct Settle(Script);

impl Settle {
    /// Settles entry `id` of partition `p` for the consumer `token`.
    pub(crate) async fn call(
        &self,
        inner: &Inner,
        p: u32,
        token: &str,
        id: EntryId,
        mode: SettleMode,
        reason: &str,
    ) -> Result<Settled, BackendError> {
        let raw: Value = invoke(
            inner,
            self.0
                .key(inner.keys.stream(p))
                .arg(GROUP)
                .arg(token)
                .arg(id.to_string())
                .arg(mode.as_arg()),
        )
        .await?;
        let (fields, attempts) = match raw {
            Value::Array(parts) if parts.len() == 3 => {
                let fields = match &parts[1] {
                    Value::Array(f) => f.clone(),
                    _ => Vec::new(),
                };
                let attempts = i64::from_redis_value(parts[2].clone()).unwrap_or(0);
                (fields, attempts)
            }
            other => {
                let outcome = String::from_redis_value(other).unwrap_or_default();
                return Ok(Settled::from_reply(outcome));
            }
        };
        let mut conn = inner.conn();
        if !fields.is_empty() {
            let mut add = redis::cmd("XADD");
            add.arg(inner.keys.dead()).arg("*");
            for f in &fields {
                add.arg(field_bytes(f));
            }
            add.arg("reason")
                .arg(reason)
                .arg("attempts")
                .arg(attempts.to_string())
                .arg("partition")
                .arg(p)
                .arg("entry")
                .arg(id.to_string());
            inner.run(add.query_async::<()>(&mut conn)).await?;
        }
        inner
            .run(
                redis::cmd("XACK")
                    .arg(inner.keys.stream(p))
                    .arg(GROUP)
                    .arg(id.to_string())
                    .query_async::<()>(&mut conn),
            )
            .await?;
        Ok(Settled::Dead)
    }
}

/// Replays one dead letter: appends its event to its partition stream, then
/// removes it from the dead-letter stream (two slots on a cluster). In that
/// order, so a crash between the two leaves the dead letter to replay again,
/// never lost; a dead letter two operators replay at the same moment can be
/// appended twice, which the store's event ids make harmless (a duplicate
/// is stored once).
#[derive(Debug)]
pub(crate) struct Replay;

impl Replay {
    /// The dead letter at `entry_id` back to partition `p`. Returns 1
    /// (replayed) or 0 (gone already).
    pub(crate) async fn call(
        &self,
        inner: &Inner,
        entry_id: &str,
        p: u32,
        event: &IncomingEvent,
    ) -> Result<i64, BackendError> {
        let still: Vec<Value> = inner
            .query(
                redis::cmd("XRANGE")
                    .arg(inner.keys.dead())
                    .arg(entry_id)
                    .arg(entry_id),
            )
            .await?;
        if still.is_empty() {
            return Ok(0);
        }
        crate::incoming::append(inner, p, event).await?;
        inner
            .query::<i64>(redis::cmd("XDEL").arg(inner.keys.dead()).arg(entry_id))
            .await
            .map(|_| 1)
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

/// Removes consumers of a stream's group that are gone: not among the live
/// consumers (read from the consumers ZSET just before, passed in ARGV),
/// nothing pending, idle for a while. Checked and deleted in one script so
/// a consumer cannot receive entries between the check and the delete
/// (XGROUP DELCONSUMER drops a consumer's pending entries). A consumer that
/// joined after the ZSET was read has not been idle long enough.
///
/// KEYS[1] = stream. ARGV[1] = group, ARGV[2] = min idle ms, ARGV[3..] =
/// live consumer tokens. Returns the number of consumers removed.
const GC_CONSUMERS: &str = r#"
local live = {}
for i = 3, #ARGV do live[ARGV[i]] = true end
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
     and not live[name] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
"#;

wrapper! {
    /// Calls [`GC_CONSUMERS`] on partition `p`'s stream. Returns the
    /// consumers removed.
    GcConsumers |script, inner, p: u32, min_idle: Duration, live: &[String]| -> u64 {
        script
            .key(inner.keys.stream(p))
            .arg(GROUP)
            .arg(ms(min_idle))
            .arg(live)
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

/// A stream field or value as the bytes it is (fields come back as bulk
/// strings; anything else is not ours and copies as nothing).
fn field_bytes(v: &Value) -> &[u8] {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.as_bytes(),
        _ => &[],
    }
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
    pub handover: Handover,
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
            cleanup: Cleanup {
                take: Script::new(CLEANUP),
                forget: Script::new(FORGET),
            },
            maintain: Maintain(Script::new(MAINTAIN)),
            handover: Handover {
                stream: Script::new(&format!("{HANDOVER_FN}{HANDOVER_BODY}")),
                leases: Script::new(DROP_LEASES),
            },
            claim: Claim(Script::new(CLAIM)),
            redeliver: Redeliver(Script::new(REDELIVER)),
            settle: Settle(Script::new(SETTLE)),
            replay: Replay,
            trim: Trim(Script::new(TRIM)),
            gc_consumers: GcConsumers(Script::new(GC_CONSUMERS)),
        }
    }
}
