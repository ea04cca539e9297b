//! Shared by the Redis backend's test files: where Redis is, whether it is
//! reachable, and cleanup of the namespaces the tests create.

#![allow(dead_code)] // each test file uses a different part

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fanout_backend::{
    BackendError, Capabilities, ConsumeOptions, DeadLetter, FanoutBackend, IncomingDelivery,
    IncomingEvent, RouteKey, RouteOutcome, ServerId, ServerStream,
};
use fanout_redis::{RedisBackend, RedisConfig};
use futures::stream::BoxStream;

/// The Redis the tests use: `FANOUT_REDIS_URL`, else the local one.
pub fn url() -> String {
    std::env::var("FANOUT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Whether Redis answers a PING within 5 s; if not, skips loudly (or fails
/// under `FANOUT_TEST_REQUIRE_SERVICES=1`).
pub async fn available() -> bool {
    let probe = async {
        let client = redis::Client::open(url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            fanout_backend::conformance::skip_or_fail("Redis", &format!("{}: {e}", url()));
            false
        }
        Err(_) => {
            fanout_backend::conformance::skip_or_fail(
                "Redis",
                &format!("{}: no answer in 5 s", url()),
            );
            false
        }
    }
}

/// A configuration for tests in `namespace`.
pub fn config(namespace: &str) -> RedisConfig {
    RedisConfig {
        url: url(),
        namespace: namespace.to_owned(),
        ..RedisConfig::default()
    }
}

/// A namespace no other run uses.
pub fn namespace() -> String {
    fanout_backend::conformance::fresh_namespace()
}

/// Deletes every key of a namespace.
pub async fn purge(namespace: &str) {
    if let Err(e) = RedisBackend::purge(&url(), namespace, Duration::from_secs(5)).await {
        eprintln!("could not purge test namespace {namespace}: {e}");
    }
}

/// Deletes every key of a namespace without a runtime (from `Drop`).
pub fn purge_blocking(namespace: &str) {
    let run = || -> redis::RedisResult<()> {
        let client = redis::Client::open(url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{namespace}:*"))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)?;
            if !keys.is_empty() {
                redis::cmd("UNLINK").arg(keys).query::<()>(&mut conn)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    };
    if let Err(e) = run() {
        eprintln!("could not purge test namespace {namespace}: {e}");
    }
}

/// Deletes a namespace's keys when dropped, so a test that panics does not
/// leave its keys on the shared Redis. Declare it before the backend: it
/// drops last.
#[derive(Debug)]
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        purge_blocking(&self.0);
    }
}

/// Keys of a namespace that exist now (by SCAN: the Redis is shared).
pub async fn keys_of(namespace: &str) -> Vec<String> {
    let mut conn = raw().await;
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        out.extend(keys);
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// A raw connection for assertions on Redis state.
pub async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// The backend as the conformance suite sees it, which deletes its
/// namespace's keys when shut down (or dropped, if a check panicked).
#[derive(Debug)]
pub struct Purging {
    pub backend: RedisBackend,
    namespace: String,
    purged: AtomicBool,
}

impl Purging {
    pub fn new(backend: RedisBackend) -> Arc<Self> {
        let namespace = backend.namespace().to_owned();
        Arc::new(Self {
            backend,
            namespace,
            purged: AtomicBool::new(false),
        })
    }
}

impl Drop for Purging {
    fn drop(&mut self) {
        if !self.purged.load(Ordering::Acquire) {
            purge_blocking(&self.namespace);
        }
    }
}

#[async_trait]
impl FanoutBackend for Purging {
    fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }
    async fn health(&self) -> Result<(), BackendError> {
        self.backend.health().await
    }
    async fn publish_incoming(&self, event: IncomingEvent) -> Result<(), BackendError> {
        self.backend.publish_incoming(event).await
    }
    async fn consume_incoming(
        &self,
        options: ConsumeOptions,
    ) -> Result<BoxStream<'static, Result<IncomingDelivery, BackendError>>, BackendError> {
        self.backend.consume_incoming(options).await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BackendError> {
        self.backend.dead_letters(limit).await
    }
    async fn resolve_dead_letters(
        &self,
        selection: &fanout_backend::DeadLetterSelection,
        action: fanout_backend::DeadLetterAction,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        self.backend.resolve_dead_letters(selection, action).await
    }
    async fn register_server(&self, server: &ServerId) -> Result<ServerStream, BackendError> {
        self.backend.register_server(server).await
    }
    async fn deregister_server(&self, server: &ServerId) -> Result<(), BackendError> {
        self.backend.deregister_server(server).await
    }
    async fn bind(&self, server: &ServerId, key: &RouteKey) -> Result<(), BackendError> {
        self.backend.bind(server, key).await
    }
    async fn unbind(&self, server: &ServerId, key: &RouteKey) -> Result<(), BackendError> {
        self.backend.unbind(server, key).await
    }
    async fn publish_outgoing(
        &self,
        key: &RouteKey,
        payload: Bytes,
    ) -> Result<RouteOutcome, BackendError> {
        self.backend.publish_outgoing(key, payload).await
    }
    async fn shutdown(&self) -> Result<(), BackendError> {
        self.backend.shutdown().await?;
        self.backend.purge_namespace().await?;
        self.purged.store(true, Ordering::Release);
        Ok(())
    }
}
