//! N gateways and a worker in this process, linked by one memory backend
//! (the fake broker of socketioxide's `spawn_servers::<N>()` pattern), with
//! a SQLite store in a temporary directory.

use std::sync::Arc;
use std::time::Duration;

use fanout::app;
use fanout::auth::Tokens;
use fanout::config::{BackendKind, Config};
use fanout::metrics::Metrics;
use fanout::store::Store;
use fanout_backend::DynBackend;
use fanout_bench::client::Client;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "cluster-test-secret-0123456789abcdef";
pub const WAIT: Duration = Duration::from_secs(5);
pub const QUIET: Duration = Duration::from_millis(300);

pub struct Cluster {
    pub urls: Vec<String>,
    pub backend: DynBackend,
    pub store: Store,
    pub tokens: Tokens,
    stops: Vec<oneshot::Sender<()>>,
    gateways: Vec<tokio::task::JoinHandle<()>>,
    worker_stop: CancellationToken,
    /// The worker's metrics.
    pub worker_metrics: Arc<Metrics>,
    pub config: Config,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `gateways` gateways and a worker with `consumers` consumers.
    pub async fn start(gateways: usize, consumers: u32) -> Cluster {
        Self::start_on(BackendKind::Memory, gateways, consumers, |_| {}).await
    }

    /// The same on a real broker in a fresh namespace; `None` (after a
    /// loud skip, or a panic under CI) when the broker is unreachable.
    pub async fn start_broker(
        kind: BackendKind,
        gateways: usize,
        consumers: u32,
    ) -> Option<Cluster> {
        Self::start_broker_with(kind, gateways, consumers, |_| {}).await
    }

    /// [`Cluster::start_broker`] with the configuration changed by
    /// `configure` before anything starts (a database URL, limits).
    pub async fn start_broker_with(
        kind: BackendKind,
        gateways: usize,
        consumers: u32,
        configure: impl FnOnce(&mut Config),
    ) -> Option<Cluster> {
        let (name, port) = match kind {
            BackendKind::Rabbitmq => ("RabbitMQ", 5672),
            BackendKind::Redis => ("Redis", 6379),
            BackendKind::Memory => {
                return Some(Self::start_on(kind, gateways, consumers, configure).await)
            }
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            super::skip_or_fail(name, &e.to_string());
            return None;
        }
        Some(Self::start_on(kind, gateways, consumers, configure).await)
    }

    async fn start_on(
        kind: BackendKind,
        gateways: usize,
        consumers: u32,
        configure: impl FnOnce(&mut Config),
    ) -> Cluster {
        // The database in memory where the machine has a tmpfs: tests
        // measure gateways and brokers, not the disk's fsync stalls.
        let dir = tempfile::Builder::new()
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir");
        let mut config = Config {
            backend: kind,
            namespace: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            broker_timeout_ms: 15_000,
            jwt_secret: Some(SECRET.to_owned()),
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        config.worker.consumers = consumers;
        config.limits.messages_per_second = 10_000;
        config.limits.message_burst = 10_000;
        config.limits.send_queue = 10_000;
        configure(&mut config);
        let backend = app::connect_backend(&config).await.expect("backend");
        let store = app::connect_store(&config).await.expect("store");
        let tokens = Tokens::new(SECRET.as_bytes());
        let worker_stop = CancellationToken::new();
        let worker_metrics = Arc::new(Metrics::new());
        tokio::spawn(fanout::worker::run(
            backend.clone(),
            store.clone(),
            worker_metrics.clone(),
            config.worker.clone(),
            config.incoming.max_attempts,
            worker_stop.clone(),
        ));
        let config_out = config.clone();
        let mut urls = Vec::new();
        let mut stops = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..gateways {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            urls.push(format!("http://{}", listener.local_addr().expect("addr")));
            let (tx, handle) = spawn_gateway(
                config.clone(),
                listener,
                backend.clone(),
                store.clone(),
                tokens.clone(),
            );
            stops.push(tx);
            handles.push(handle);
        }
        Cluster {
            urls,
            backend,
            store,
            tokens,
            stops,
            gateways: handles,
            worker_stop,
            worker_metrics,
            config: config_out,
            _dir: dir,
        }
    }

    pub fn token(&self, user: &str) -> String {
        self.tokens.mint(user, 600).expect("mint")
    }

    /// A session of `user` on gateway `gw`.
    pub async fn connect(&self, gw: usize, user: &str) -> Client {
        Client::connect(&self.urls[gw], json!({ "token": self.token(user) }))
            .await
            .expect("connect")
    }

    /// An authenticated REST call on gateway `gw`.
    pub async fn api(
        &self,
        gw: usize,
        user: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        api_call(&self.urls[gw], &self.token(user), method, path, body).await
    }

    /// Live sessions on gateway `gw`, from its `fanout_sessions` metric.
    pub async fn sessions(&self, gw: usize) -> u64 {
        metric(&self.urls[gw], "fanout_sessions").await as u64
    }

    /// An authenticated `GET` on gateway `gw`.
    pub async fn get(&self, gw: usize, user: &str, path: &str) -> (u16, Value) {
        self.api(gw, user, reqwest::Method::GET, path, None).await
    }

    /// Creates a channel (`body`, as `POST /api/channels` takes it) as
    /// `owner` through gateway `gw`; panics unless it is created.
    pub async fn create_channel(&self, gw: usize, owner: &str, body: Value) {
        let (status, resp) = self
            .api(
                gw,
                owner,
                reqwest::Method::POST,
                "/api/channels",
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "{resp}");
    }

    /// Waits until gateway `gw` counts `n` live sessions (a closed
    /// client's session is ended by the server a moment later), or panics
    /// after [`WAIT`].
    pub async fn wait_sessions(&self, gw: usize, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.sessions(gw).await;
            if now == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway {gw} has {now} sessions, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        for h in self.gateways {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        self.worker_stop.cancel();
        let _ = self.backend.shutdown().await;
        if let Err(e) = app::purge_namespace(&self.config).await {
            eprintln!("cannot purge test namespace {}: {e}", self.config.namespace);
        }
    }
}

/// Runs a gateway on `listener` in this process until the returned sender
/// fires (or is dropped).
/// A REST call on the gateway at `url` with a bearer `token`: the status
/// and the JSON body (`Null` when it is not JSON).
pub async fn api_call(
    url: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{url}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One sample of `/metrics` (a full name with labels, as printed), 0 when
/// absent.
pub async fn metric(url: &str, sample: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .filter_map(|l| l.strip_prefix(sample))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

pub fn spawn_gateway(
    config: Config,
    listener: tokio::net::TcpListener,
    backend: DynBackend,
    store: Store,
    tokens: Tokens,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        app::run_gateway(
            config,
            listener,
            backend,
            store,
            tokens,
            Arc::new(Metrics::new()),
            shutdown,
        )
        .await
        .expect("gateway runs");
    });
    (tx, handle)
}

/// Sends and expects an `ok` ack; returns the message id.
pub async fn send_ok(c: &Client, payload: Value) -> String {
    let ack = c.call("sendMessage", &payload, WAIT).await.expect("ack");
    assert_eq!(ack["ok"], json!(true), "send refused: {ack}");
    ack["id"].as_str().expect("id").to_owned()
}

/// The next event's name and payload.
pub async fn next(c: &Client) -> (String, Value) {
    let e = c.next_event(WAIT).await.expect("an event in time");
    (e.name, e.data)
}

/// The next chat message event, skipping membership changes (which every
/// member now receives in its inbox and in the channel's stream).
#[allow(dead_code)]
pub async fn next_chat(c: &Client) -> (String, Value) {
    loop {
        let (name, data) = next(c).await;
        if name != "MEMBERSHIP_CHANGE" {
            return (name, data);
        }
    }
}

/// Asserts no chat message arrives for a moment (membership changes may).
#[allow(dead_code)]
pub async fn quiet_chat(c: &Client, what: &str) {
    let until = tokio::time::Instant::now() + QUIET;
    while let Some(left) = until.checked_duration_since(tokio::time::Instant::now()) {
        match c.next_event(left).await {
            Ok(e) if e.name == "MEMBERSHIP_CHANGE" => continue,
            Ok(e) => panic!("{what}: unexpected {} {}", e.name, e.data),
            Err(_) => return,
        }
    }
}

/// Asserts nothing arrives for a moment.
pub async fn quiet(c: &Client, what: &str) {
    if let Ok(e) = c.next_event(QUIET).await {
        panic!("{what}: unexpected {} {}", e.name, e.data);
    }
}
