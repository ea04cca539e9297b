//! A TCP proxy the fault runs put between the fleet and PostgreSQL. The
//! machine's PostgreSQL is shared with other work, so an outage is made
//! here: [`TcpProxy::cut`] drops every open connection and refuses new ones
//! until [`TcpProxy::restore`], which is what a database crash or a network
//! partition looks like from the processes' side.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
struct State {
    up: AtomicBool,
    /// Bumped by every cut: each connection watches it and closes itself.
    cuts: watch::Sender<u64>,
    /// Added before a chunk from the upstream is passed on...
    delay_us: AtomicU64,
    /// ...if it contains this (every chunk if empty).
    marker: Mutex<&'static [u8]>,
    /// Connections accepted while up (a sign the processes really use it).
    connections: AtomicU64,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Connections hold a receiver; a final cut closes them too.
        self.state.cuts.send_modify(|g| *g += 1);
    }
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (cuts, _) = watch::channel(0);
        let state = Arc::new(State {
            up: AtomicBool::new(true),
            cuts,
            delay_us: AtomicU64::new(0),
            marker: Mutex::new(b""),
            connections: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, upstream, state.clone()));
        Ok(TcpProxy { addr, state, task })
    }

    /// Drops every open connection and refuses new ones (accepted, then
    /// closed at once) until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        self.state.cuts.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }

    /// Holds each chunk coming back from the upstream that contains
    /// `marker` (every chunk if `marker` is empty) for `delay` before
    /// passing it on. With PostgreSQL's `INSERT 0 ` (the tag of an
    /// insert's CommandComplete) the rows are committed and the client does
    /// not know yet: work caught in the middle.
    pub fn set_delay(&self, delay: Duration, marker: &'static [u8]) {
        *self.state.marker.lock().unwrap_or_else(|p| p.into_inner()) = marker;
        self.state
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or similar: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !state.up.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        state.connections.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        tokio::spawn(async move {
            let mut cut = state.cuts.subscribe();
            cut.borrow_and_update();
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = async {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            };
            let down = async {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let delay = state.delay_us.load(Ordering::Relaxed);
                    let held = delay > 0 && {
                        let marker = *state.marker.lock().unwrap_or_else(|p| p.into_inner());
                        marker.is_empty() || buf[..n].windows(marker.len()).any(|w| w == marker)
                    };
                    if held {
                        tokio::time::sleep(Duration::from_micros(delay)).await;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = cw.shutdown().await;
            };
            // Either direction ending, or a cut, ends the connection: the
            // halves are dropped here, which closes both sockets.
            tokio::select! {
                _ = async { tokio::join!(up, down) } => {}
                _ = cut.changed() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_cuts_and_restores() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = TcpProxy::start(echo_addr).await.expect("proxy");
        let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
        c.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.expect("echo");
        assert_eq!(&got, b"ping");

        proxy.cut();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut rest))
            .await
            .expect("closed by the cut")
            .unwrap_or(0);
        assert_eq!(n, 0, "a cut connection carries nothing more");
        let mut refused = TcpStream::connect(proxy.addr).await.expect("accepted");
        let n = tokio::time::timeout(Duration::from_secs(2), refused.read(&mut got))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "refused while cut");

        proxy.restore();
        let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
        c.write_all(b"pong").await.expect("write");
        c.read_exact(&mut got).await.expect("echo");
        assert_eq!(&got, b"pong");
    }
}
