//! Every key and channel name the backend uses, in one place. All of them
//! start with `{namespace}:`, so two namespaces on one Redis never share a
//! name, and `SCAN MATCH {namespace}:*` finds everything a namespace owns.
//!
//! On Redis Cluster a command (and a script) may touch keys of one hash
//! slot only, so the names carry hash tags (`{...}`: only that part is
//! hashed) that put together what is used together:
//!
//! - the control keys (consumers, leases, janitor lock, servers set, dead
//!   letters): tag `{ns}`, one slot, small and rarely written;
//! - a server's key set, liveness key and sharded channel: tag `{ns.id}`,
//!   so the claim can count the channel's subscribers next to its key;
//! - partition `p`'s stream: a tag of its own, chosen so that partition `p`
//!   of `P` lands in the `p`-th `P`-th of the slot space. A cluster created
//!   with even slot ranges per primary then gives every primary its share of
//!   the incoming traffic;
//! - a route set: no tag, hashed whole, spread over every primary.
//!
//! On a standalone Redis the names stay as they always were (no tags), so an
//! existing namespace keeps its streams and routes.

use fanout_backend::{RouteKey, ServerId};

/// Slots of a Redis Cluster.
const SLOTS: u32 = 16_384;

/// The hash slot of a key or channel name, as Redis Cluster computes it:
/// CRC16 (XMODEM) of the hash tag (the text between the first `{` and the
/// next `}`, if not empty), else of the whole name. redis-rs computes the
/// same but does not expose it.
pub(crate) fn slot_of(name: &str) -> u16 {
    let b = name.as_bytes();
    let hashed = b
        .iter()
        .position(|&c| c == b'{')
        .and_then(|open| {
            let rest = &b[open + 1..];
            rest.iter()
                .position(|&c| c == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(b);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % (SLOTS as u16)
}

/// The consumer group of every incoming stream.
pub(crate) const GROUP: &str = "workers";

/// Key names of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    ns: String,
    /// Prefix of the control keys: `{ns}:` standalone, `{ns}:{{ns}}:` on a
    /// cluster.
    control: String,
    /// Per partition, what follows `{ns}:in:` in its stream's name.
    streams: Vec<String>,
    cluster: bool,
}

impl Keys {
    pub(crate) fn new(namespace: &str, partitions: u32, cluster: bool) -> Self {
        let control = if cluster {
            format!("{namespace}:{{{namespace}}}:")
        } else {
            format!("{namespace}:")
        };
        let streams = (0..partitions)
            .map(|p| {
                if cluster {
                    format!("{p}:{{{}}}", spread_tag(p, partitions))
                } else {
                    p.to_string()
                }
            })
            .collect();
        Self {
            ns: namespace.to_owned(),
            control,
            streams,
            cluster,
        }
    }

    /// What a server's keys and channel share: on a cluster, the hash tag
    /// `{ns.id}` (`.` never occurs in an id or a namespace).
    fn server_part(&self, server: &str) -> String {
        if self.cluster {
            format!("{{{}.{}}}", self.ns, server)
        } else {
            server.to_owned()
        }
    }

    /// SET of server ids bound to one route key: `{ns}:route:{routing key}`.
    pub(crate) fn route(&self, key: &RouteKey) -> String {
        format!("{}:route:{}", self.ns, key.as_routing_key())
    }

    /// Prefix of every route set, for scripts that build the names.
    pub(crate) fn route_prefix(&self) -> String {
        format!("{}:route:", self.ns)
    }

    /// SET of the routing keys one server has bound (for cleanup):
    /// `{ns}:server:{id}:keys`.
    pub(crate) fn server_keys(&self, server: &str) -> String {
        format!("{}:server:{}:keys", self.ns, self.server_part(server))
    }

    /// STRING holding the current holder's token, with a TTL:
    /// `{ns}:server:{id}:alive`.
    pub(crate) fn alive(&self, server: &str) -> String {
        format!("{}:server:{}:alive", self.ns, self.server_part(server))
    }

    /// SET of server ids that may have routes: `{ns}:servers`. The janitor
    /// walks it to find servers whose liveness key expired.
    pub(crate) fn servers(&self) -> String {
        format!("{}servers", self.control)
    }

    /// Pub/Sub channel of one server: `{ns}:out:{id}`.
    pub(crate) fn out_channel(&self, server: &ServerId) -> String {
        format!("{}:out:{}", self.ns, self.server_part(server.as_str()))
    }

    /// Prefix of every server channel, for the publish script (standalone
    /// only: on a cluster the channel names carry a tag).
    pub(crate) fn out_prefix(&self) -> String {
        format!("{}:out:", self.ns)
    }

    /// Incoming stream of one partition: `{ns}:in:{p}`.
    pub(crate) fn stream(&self, partition: u32) -> String {
        match self.streams.get(partition as usize) {
            Some(name) => format!("{}:in:{}", self.ns, name),
            // Only a partition beyond the configured count gets here (a
            // replayed dead letter of a larger deployment); its plain name
            // still works on a standalone Redis.
            None => format!("{}:in:{}", self.ns, partition),
        }
    }

    /// Lease of one partition, holding the owner's consumer token:
    /// `{ns}:lease:{p}`.
    pub(crate) fn lease(&self, partition: u32) -> String {
        format!("{}lease:{}", self.control, partition)
    }

    /// ZSET of live consumers scored by their last heartbeat (ms, Redis
    /// clock): `{ns}:consumers`.
    pub(crate) fn consumers(&self) -> String {
        format!("{}consumers", self.control)
    }

    /// Dead-letter stream: `{ns}:dead`.
    pub(crate) fn dead(&self) -> String {
        format!("{}dead", self.control)
    }

    /// Lock that lets one backend instance per period run the janitor:
    /// `{ns}:janitor`.
    pub(crate) fn janitor_lock(&self) -> String {
        format!("{}janitor", self.control)
    }

    /// Name given (CLIENT SETNAME) to a server's subscriber connection, so
    /// operators and tests can find it in `CLIENT LIST`.
    pub(crate) fn subscriber_client_name(&self, server: &ServerId) -> String {
        format!("{}:sub:{}", self.ns, server)
    }
}

/// A hash tag for partition `p` of `partitions` whose slot falls in the
/// `p`-th equal share of the slot space: `p{n}` for the smallest `n` that
/// does. About `partitions` tries per partition; a share too small to hit
/// (more partitions than slots) takes `p0`.
fn spread_tag(p: u32, partitions: u32) -> String {
    let share = |slot: u32| slot * partitions / SLOTS;
    for n in 0..(64 * partitions.max(1)) {
        let tag = format!("p{p}n{n}");
        if share(u32::from(slot_of(&tag))) == p {
            return tag;
        }
    }
    format!("p{p}n0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Reference values from `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("foo{}{bar}"), slot_of("foo{}{bar}"));
        assert_eq!(slot_of("123456789"), 12739);
    }

    #[test]
    fn standalone_names_do_not_change() {
        let k = Keys::new("ns", 4, false);
        assert_eq!(k.stream(3), "ns:in:3");
        assert_eq!(k.lease(3), "ns:lease:3");
        assert_eq!(k.consumers(), "ns:consumers");
        assert_eq!(k.servers(), "ns:servers");
        assert_eq!(k.dead(), "ns:dead");
        assert_eq!(k.alive("g1"), "ns:server:g1:alive");
        let g1 = ServerId::new("g1").expect("valid");
        assert_eq!(k.out_channel(&g1), "ns:out:g1");
    }

    #[test]
    fn cluster_names_put_together_what_scripts_use_together() {
        let k = Keys::new("ns", 16, true);
        let slot = slot_of;
        // Control keys: one slot.
        let control = slot(&k.consumers());
        for name in [
            k.lease(0),
            k.lease(15),
            k.dead(),
            k.servers(),
            k.janitor_lock(),
        ] {
            assert_eq!(slot(&name), control, "{name}");
        }
        // A server's keys and channel: one slot.
        let g1 = ServerId::new("g1").expect("valid");
        assert_eq!(slot(&k.alive("g1")), slot(&k.server_keys("g1")));
        assert_eq!(slot(&k.alive("g1")), slot(&k.out_channel(&g1)));
        // Every name stays under the namespace.
        assert!(k.stream(7).starts_with("ns:in:7:{"), "{}", k.stream(7));
    }

    #[test]
    fn partitions_spread_evenly_over_the_slot_space() {
        for partitions in [1u32, 3, 16, 100] {
            let k = Keys::new("fanout", partitions, true);
            for p in 0..partitions {
                let s = u32::from(slot_of(&k.stream(p)));
                assert_eq!(s * partitions / SLOTS, p, "partition {p} of {partitions}");
            }
        }
    }
}
