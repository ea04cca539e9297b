//! Every key and channel name the backend uses, in one place. All of them
//! start with `{namespace}:`, so two namespaces on one Redis never share a
//! name, and `SCAN MATCH {namespace}:*` finds everything a namespace owns.

use fanout_backend::{RouteKey, ServerId};

/// The consumer group of every incoming stream.
pub(crate) const GROUP: &str = "workers";

/// Key names of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    ns: String,
}

impl Keys {
    pub(crate) fn new(namespace: &str) -> Self {
        Self {
            ns: namespace.to_owned(),
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
        format!("{}:server:{}:keys", self.ns, server)
    }

    /// STRING holding the current holder's token, with a TTL:
    /// `{ns}:server:{id}:alive`.
    pub(crate) fn alive(&self, server: &str) -> String {
        format!("{}:server:{}:alive", self.ns, server)
    }

    /// SET of server ids that may have routes: `{ns}:servers`. The janitor
    /// walks it to find servers whose liveness key expired.
    pub(crate) fn servers(&self) -> String {
        format!("{}:servers", self.ns)
    }

    /// Pub/Sub channel of one server: `{ns}:out:{id}`.
    pub(crate) fn out_channel(&self, server: &ServerId) -> String {
        format!("{}:out:{}", self.ns, server)
    }

    /// Prefix of every server channel, for the publish script.
    pub(crate) fn out_prefix(&self) -> String {
        format!("{}:out:", self.ns)
    }

    /// Incoming stream of one partition: `{ns}:in:{p}`.
    pub(crate) fn stream(&self, partition: u32) -> String {
        format!("{}:in:{}", self.ns, partition)
    }

    /// Lease of one partition, holding the owner's consumer token:
    /// `{ns}:lease:{p}`.
    pub(crate) fn lease(&self, partition: u32) -> String {
        format!("{}:lease:{}", self.ns, partition)
    }

    /// ZSET of live consumers scored by their last heartbeat (ms, Redis
    /// clock): `{ns}:consumers`.
    pub(crate) fn consumers(&self) -> String {
        format!("{}:consumers", self.ns)
    }

    /// Dead-letter stream: `{ns}:dead`.
    pub(crate) fn dead(&self) -> String {
        format!("{}:dead", self.ns)
    }

    /// Lock that lets one backend instance per period run the janitor:
    /// `{ns}:janitor`.
    pub(crate) fn janitor_lock(&self) -> String {
        format!("{}:janitor", self.ns)
    }

    /// Name given (CLIENT SETNAME) to a server's subscriber connection, so
    /// operators and tests can find it in `CLIENT LIST`.
    pub(crate) fn subscriber_client_name(&self, server: &ServerId) -> String {
        format!("{}:sub:{}", self.ns, server)
    }

    /// `SCAN MATCH` pattern of everything the namespace owns. Safe because a
    /// namespace cannot contain glob characters (checked at connect).
    pub(crate) fn all_pattern(&self) -> String {
        format!("{}:*", self.ns)
    }
}
