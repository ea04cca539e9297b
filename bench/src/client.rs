//! A small Socket.IO v4 client over WebSocket, for the Rust tests and the
//! load generator.
//!
//! Why not a client crate: `rust_socketio` spawns a thread-backed runtime
//! per connection and buffers through callbacks, which costs far more per
//! connection than a load generator with thousands of virtual users can
//! afford, and hides the receive time we need for latency. The subset of
//! the protocol a chat client needs over WebSocket (open, connect with
//! auth, events, acks, ping/pong) is a few dozen lines of framing. The
//! official JavaScript client remains the reference: the end-to-end suite
//! in `tests/js` runs it against the same gateway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    Ws(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// The server refused the namespace connection (`connect_error`).
    #[error("connect_error: {0}")]
    Refused(String),
    /// The server said something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
}

/// An event the server emitted, with when it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event name.
    pub name: String,
    /// First argument.
    pub data: Value,
    /// Arrival time.
    pub at: Instant,
}

type Acks = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A connected client.
#[derive(Debug)]
pub struct Client {
    out: mpsc::UnboundedSender<WsMessage>,
    acks: Acks,
    next_ack: AtomicU64,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    reset: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects to `base` (`http://host:port`) on namespace `/` with
    /// `auth` as the handshake payload.
    pub async fn connect(base: &str, auth: Value) -> Result<Client, ClientError> {
        let ws_url = format!(
            "{}/socket.io/?EIO=4&transport=websocket",
            base.replacen("http", "ws", 1)
        );
        // Nagle off: small frames must not wait for the peer's delayed ACK.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(ws_url, None, true)
            .await
            .map_err(Box::new)?;
        let (mut sink, mut stream) = ws.split();

        // Engine.IO open packet: "0{...}".
        match next_text(&mut stream).await? {
            t if t.starts_with('0') => {}
            t => {
                return Err(ClientError::Protocol(format!(
                    "expected open packet, got {t:?}"
                )))
            }
        }
        sink.send(WsMessage::text(format!("40{auth}")))
            .await
            .map_err(Box::new)?;
        loop {
            let t = next_text(&mut stream).await?;
            if t == "2" {
                sink.send(WsMessage::text("3")).await.map_err(Box::new)?;
            } else if t.starts_with("40") {
                break;
            } else if let Some(rest) = t.strip_prefix("44") {
                let msg = serde_json::from_str::<Value>(rest)
                    .ok()
                    .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_else(|| rest.to_owned());
                return Err(ClientError::Refused(msg));
            } else {
                return Err(ClientError::Protocol(format!(
                    "expected connect, got {t:?}"
                )));
            }
        }

        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<WsMessage>();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (reset_tx, mut reset_rx) = oneshot::channel::<()>();
        let acks: Acks = Arc::default();
        let task_acks = acks.clone();
        let pong = out_tx.clone();
        let task = tokio::spawn(async move {
            let reset = loop {
                tokio::select! {
                    r = &mut reset_rx => break r.is_ok(),
                    msg = out_rx.recv() => match msg {
                        Some(m) => if sink.send(m).await.is_err() { break false },
                        None => break false,
                    },
                    frame = stream.next() => {
                        let Some(Ok(WsMessage::Text(t))) = frame else {
                            match frame {
                                Some(Ok(_)) => continue,
                                _ => break false,
                            }
                        };
                        let at = Instant::now();
                        if t.as_str() == "2" {
                            let _ = pong.send(WsMessage::text("3"));
                        } else if let Some(rest) = t.strip_prefix("42") {
                            if let Some((name, data)) = parse_event(rest) {
                                let _ = ev_tx.send(Event { name, data, at });
                            }
                        } else if let Some(rest) = t.strip_prefix("43") {
                            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                            if let (Ok(id), Ok(Value::Array(mut args))) =
                                (rest[..digits].parse::<u64>(), serde_json::from_str::<Value>(&rest[digits..]))
                            {
                                let tx = task_acks.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                                if let Some(tx) = tx {
                                    let _ = tx.send(if args.is_empty() { Value::Null } else { args.swap_remove(0) });
                                }
                            }
                        } else if t.starts_with('1') || t.starts_with("41") {
                            break false;
                        }
                    }
                }
            };
            if reset {
                // SO_LINGER 0, then close: the kernel sends a RST and
                // drops what is queued, as when a phone loses its network
                // or a process dies. No WebSocket close, no FIN.
                if let Ok(ws) = stream.reunite(sink) {
                    if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_ref() {
                        let _ = tcp.set_zero_linger();
                    }
                }
            }
        });
        Ok(Client {
            out: out_tx,
            acks,
            next_ack: AtomicU64::new(0),
            events: tokio::sync::Mutex::new(ev_rx),
            reset: Some(reset_tx),
            task,
        })
    }

    /// Emits an event without an ack.
    pub fn emit(&self, event: &str, data: &Value) -> Result<(), ClientError> {
        let frame = format!("42{}", Value::Array(vec![Value::from(event), data.clone()]));
        self.out
            .send(WsMessage::text(frame))
            .map_err(|_| ClientError::Closed)
    }

    /// Emits an event and returns a future of its ack. The frame is queued
    /// before this returns, so calls made one after another are sent in
    /// that order even if their acks are awaited later.
    pub fn emit_with_ack(
        &self,
        event: &str,
        data: &Value,
    ) -> Result<oneshot::Receiver<Value>, ClientError> {
        let id = self.next_ack.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let frame = format!(
            "42{id}{}",
            Value::Array(vec![Value::from(event), data.clone()])
        );
        self.out
            .send(WsMessage::text(frame))
            .map_err(|_| ClientError::Closed)?;
        Ok(rx)
    }

    /// Emits and waits up to `timeout` for the ack.
    pub async fn call(
        &self,
        event: &str,
        data: &Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let rx = self.emit_with_ack(event, data)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// The next event the server emitted, waiting up to `timeout`.
    pub async fn next_event(&self, timeout: Duration) -> Result<Event, ClientError> {
        let mut rx = self.events.lock().await;
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Drops the connection the hard way: `SO_LINGER` 0 on the TCP socket
    /// and close, so the server sees a TCP reset, with no Socket.IO
    /// disconnect and no WebSocket close before it. Returns once the
    /// socket is closed.
    pub async fn reset(mut self) {
        if let Some(tx) = self.reset.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Closes the connection (a Socket.IO disconnect, then the socket).
    pub async fn close(self) {
        let _ = self.out.send(WsMessage::text("41"));
        let _ = self.out.send(WsMessage::Close(None));
        // Give the writer a moment to flush before the task is aborted.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_text<S>(stream: &mut S) -> Result<String, ClientError>
where
    S: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Err(_) => return Err(ClientError::Timeout),
            Ok(None) => return Err(ClientError::Closed),
            Ok(Some(Err(e))) => return Err(Box::new(e).into()),
            Ok(Some(Ok(WsMessage::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(WsMessage::Close(_)))) => return Err(ClientError::Closed),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

fn parse_event(rest: &str) -> Option<(String, Value)> {
    // An event may carry an ack id before its array; server events to us
    // here never ask for one, but skip it if present.
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let Value::Array(mut args) = serde_json::from_str::<Value>(&rest[digits..]).ok()? else {
        return None;
    };
    if args.is_empty() {
        return None;
    }
    let name = args.remove(0).as_str()?.to_owned();
    let data = if args.is_empty() {
        Value::Null
    } else {
        args.swap_remove(0)
    };
    Some((name, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that speaks just enough Engine.IO/Socket.IO to let a client
    /// connect, then reports how its TCP connection ended.
    async fn one_connection_server() -> (String, oneshot::Receiver<std::io::ErrorKind>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("ws");
            ws.send(WsMessage::text(r#"0{"sid":"s","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#))
                .await
                .expect("open");
            let _connect = ws.next().await;
            ws.send(WsMessage::text(r#"40{"sid":"x"}"#))
                .await
                .expect("connect");
            let end = loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Close(_))) | None => {
                        break std::io::ErrorKind::UnexpectedEof
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(tokio_tungstenite::tungstenite::Error::Io(e))) => break e.kind(),
                    Some(Err(_)) => break std::io::ErrorKind::Other,
                }
            };
            let _ = tx.send(end);
        });
        (format!("http://{addr}"), rx)
    }

    #[tokio::test]
    async fn reset_is_a_tcp_reset_and_close_is_not() {
        let (url, ended) = one_connection_server().await;
        let c = Client::connect(&url, serde_json::json!({}))
            .await
            .expect("connect");
        c.reset().await;
        assert_eq!(
            ended.await.expect("server saw the end"),
            std::io::ErrorKind::ConnectionReset
        );

        let (url, ended) = one_connection_server().await;
        let c = Client::connect(&url, serde_json::json!({}))
            .await
            .expect("connect");
        c.close().await;
        assert_eq!(
            ended.await.expect("server saw the end"),
            std::io::ErrorKind::UnexpectedEof
        );
    }
}
