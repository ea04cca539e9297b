//! Helpers shared by the RabbitMQ backend's own tests: configuration,
//! broker availability, `rabbitmqctl` (killing our own connections, listing
//! bindings) and a TCP proxy that can cut the connection to the broker.

#![allow(dead_code)]

pub mod cluster;
/// The conformance harness, on the broker or on that cluster.
pub mod harness;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fanout_backend::conformance::skip_or_fail;
use fanout_backend::{IncomingEvent, OrderingKey, RouteKey, ServerId};
use fanout_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub fn url() -> String {
    std::env::var("FANOUT_RABBITMQ_URL").unwrap_or_else(|_| RabbitMqConfig::default().url)
}

pub fn fresh_namespace() -> String {
    fanout_backend::conformance::fresh_namespace()
}

/// Settings of a test backend: an ephemeral namespace (queues expire,
/// exchanges go with them) and deadlines generous enough for a broker that
/// shares two cores with builds.
pub fn config(namespace: &str) -> RabbitMqConfig {
    RabbitMqConfig {
        url: url(),
        namespace: namespace.to_owned(),
        partitions: 4,
        queue_expiry: Some(Duration::from_secs(60)),
        operation_timeout: Duration::from_secs(15),
        ..RabbitMqConfig::default()
    }
}

pub async fn connect(config: RabbitMqConfig) -> RabbitMqBackend {
    RabbitMqBackend::connect(config)
        .await
        .expect("connect to RabbitMQ")
}

/// A backend on a namespace no other run uses, with settings `tweak`ed from
/// [`config`], and that namespace; `None` when the broker is unreachable
/// (the test is skipped).
pub async fn fresh(
    tweak: impl FnOnce(RabbitMqConfig) -> RabbitMqConfig,
) -> Option<(String, RabbitMqBackend)> {
    if !broker_available().await {
        return None;
    }
    let ns = fresh_namespace();
    let b = connect(tweak(config(&ns))).await;
    Some((ns, b))
}

/// Whether the broker is reachable (skips loudly or fails under CI).
pub async fn broker_available() -> bool {
    let probe = RabbitMqConfig {
        url: url(),
        namespace: "fanout-probe".into(),
        partitions: 1,
        queue_expiry: Some(Duration::from_secs(10)),
        ..RabbitMqConfig::default()
    };
    match RabbitMqBackend::connect(probe).await {
        Ok(b) => {
            use fanout_backend::FanoutBackend;
            let _ = b.shutdown().await;
            true
        }
        Err(e) => {
            skip_or_fail("RabbitMQ", &e.to_string());
            false
        }
    }
}

/// Whether `rabbitmqctl` can talk to the broker (tests that kill
/// connections or list bindings need it).
pub fn rabbitmqctl_available() -> bool {
    match Command::new("rabbitmqctl").args(["-q", "status"]).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            skip_or_fail("rabbitmqctl", &String::from_utf8_lossy(&o.stderr));
            false
        }
        Err(e) => {
            skip_or_fail("rabbitmqctl", &e.to_string());
            false
        }
    }
}

/// Runs `rabbitmqctl` with `args`, which must succeed; its stdout.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes, on the broker, exactly the connections whose `connection_name`
/// is one of `names` (so concurrent test runs are not disturbed). Returns
/// how many were closed.
pub fn kill_connections(names: &[String]) -> usize {
    kill_connections_where(|line| names.iter().any(|n| line.contains(&format!("\"{n}\""))))
}

/// Closes, on the broker, the connections whose `connection_name` starts
/// with `prefix` (for example every connection of one namespace). Returns
/// how many were closed.
pub fn kill_connections_named(prefix: &str) -> usize {
    kill_connections_where(|line| line.contains(&format!("\"{prefix}")))
}

fn kill_connections_where(matches: impl Fn(&str) -> bool) -> usize {
    let listing = rabbitmqctl(&["list_connections", "pid", "client_properties", "-q"]);
    let mut closed = 0;
    for line in listing.lines() {
        if !matches(line) {
            continue;
        }
        let Some(pid) = line.split('\t').next().filter(|p| p.starts_with('<')) else {
            continue;
        };
        rabbitmqctl(&[
            "close_connection",
            pid,
            "fanout test: simulated connection loss",
        ]);
        closed += 1;
    }
    closed
}

/// Routing keys bound from `exchange` to `queue`, as the broker lists them.
pub fn bindings(exchange: &str, queue: &str) -> Vec<String> {
    let listing = rabbitmqctl(&[
        "list_bindings",
        "source_name",
        "destination_name",
        "routing_key",
        "-q",
    ]);
    listing
        .lines()
        .filter_map(|l| {
            let mut cols = l.split('\t');
            let (s, d, k) = (cols.next()?, cols.next()?, cols.next()?);
            (s == exchange && d == queue).then(|| k.to_owned())
        })
        .collect()
}

/// A TCP proxy in front of the broker whose connections the test can cut
/// (and keep refusing) to simulate a network outage, without touching the
/// broker or anyone else's connections.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c, l, f) = (cut.clone(), links.clone(), frozen.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let f = f.clone();
                let link = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(forward(cr, sw, f.clone()));
                    forward(sr, cw, f).await;
                    up.abort();
                });
                l.lock().expect("lock").push(link);
            }
        });
        Proxy {
            port,
            cut,
            frozen,
            links,
            accept,
        }
    }

    /// Stops forwarding bytes, without closing anything: a network that
    /// silently drops packets.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Forwards bytes again.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().expect("lock").drain(..) {
            link.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies bytes from `from` to `to`, holding them while `frozen`.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in self.links.lock().expect("lock").drain(..) {
            link.abort();
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server id the tests know to be valid.
pub fn sid(s: &str) -> ServerId {
    ServerId::new(s).expect("valid id")
}

/// A routing key the tests know to be valid (`alice`, `channel:general`).
pub fn key(s: &str) -> RouteKey {
    RouteKey::parse(s).expect("valid key")
}

/// An event on channel `k` whose payload is its id.
pub fn event(id: &str, k: &str) -> IncomingEvent {
    IncomingEvent {
        id: id.to_owned(),
        ordering_key: OrderingKey::channel(k),
        payload: Bytes::from(id.to_owned()),
    }
}
