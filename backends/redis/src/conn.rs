//! The command connection, standalone or Redis Cluster, behind one type, so
//! every call site stays the same in both modes; and what only a cluster
//! needs: the node of a slot, the primaries.

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// The command connection: redis-rs' reconnecting `ConnectionManager` on a
/// standalone Redis, its `ClusterConnection` (routing by slot, following
/// MOVED, refreshing the slot map after a failover) on a cluster. Both are
/// multiplexed, so clones are cheap. A subscriber's own connection is a
/// plain one (`Plain`: it must not reconnect behind our back, see
/// `outgoing.rs`) or a cluster connection of its own.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Plain(MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Plain(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
        }
    }
}

/// The `host:port` of every primary that serves slots, from `CLUSTER
/// NODES` (a line per node: id, address `host:port@bus`, flags, ..., then
/// slot ranges). A primary flagged `fail` or without slots is left out.
pub(crate) fn primaries(cluster_nodes: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in cluster_nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        let serves_slots = fields.len() > 8;
        if flags.contains(&"master") && !flags.iter().any(|f| f.starts_with("fail")) && serves_slots
        {
            let addr = addr.split('@').next().unwrap_or(addr);
            out.push(addr.to_owned());
        }
    }
    out
}

/// The URL of a node at `host:port`, with the scheme, credentials and
/// options of a seed URL (every node of a cluster takes the same ones).
pub(crate) fn node_url(seed: &str, addr: &str) -> String {
    let (scheme, rest) = seed.split_once("://").unwrap_or(("redis", seed));
    let (userinfo, hostpart) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    // Drop the seed's host:port, keep a `/db` or `?options` tail.
    let tail = hostpart.find(['/', '?']).map_or("", |i| &hostpart[i..]);
    match userinfo {
        Some(u) => format!("{scheme}://{u}@{addr}{tail}"),
        None => format!("{scheme}://{addr}{tail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_come_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7101@17101 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7102@17102 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7103@17103 master,fail - 0 0 3 connected 10923-16383
d4 127.0.0.1:7104@17104 slave b2 0 0 2 connected
e5 127.0.0.1:7105@17105 master - 0 0 5 connected
";
        assert_eq!(primaries(nodes), ["127.0.0.1:7101", "127.0.0.1:7102"]);
    }

    #[test]
    fn node_urls_keep_the_seed_credentials() {
        assert_eq!(
            node_url("redis://u:p@10.0.0.1:6379/0", "10.0.0.2:7000"),
            "redis://u:p@10.0.0.2:7000/0"
        );
        assert_eq!(
            node_url("redis://127.0.0.1:7101", "127.0.0.1:7102"),
            "redis://127.0.0.1:7102"
        );
    }
}
