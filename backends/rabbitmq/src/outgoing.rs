//! The outgoing side: one exclusive, auto-delete queue per gateway, bound
//! to the outgoing exchange under each key the gateway holds. The broker's
//! bindings are the routing table; this module only remembers which keys it
//! bound so that deregistration can remove them in batches.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use fanout_backend::{
    BackendError, OutgoingMessage, RouteKey, RouteOutcome, ServerEvent, ServerId, ServerStream,
};
use futures::stream::{self, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Confirmation, Consumer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{bounded, is_resource_locked, map_err, within};
use crate::session::{hint_of, next_id, Session};
use crate::topology::{declare_private_queue, routing_key, ss};
use crate::{lock, Inner};

/// Items buffered between a gateway queue's consumer and its stream. The
/// broker-side prefetch (`server_prefetch`) bounds what is in flight; this
/// only decouples the two tasks.
const SERVER_BUFFER: usize = 256;
/// Keys unbound concurrently per batch when a gateway deregisters.
/// RabbitMQ issue #12926: deleting a queue that still has thousands of
/// bindings stalls publisher confirms on the exchange for tens of seconds,
/// so bindings go first, a batch at a time, and the queue after them.
pub(crate) const UNBIND_BATCH: usize = 256;

type ServerItem = (ServerEvent, Option<Acker>);

/// One registered gateway.
pub(crate) struct ServerEntry {
    pub(crate) generation: u64,
    /// Cleared when the stream is dropped or the server deregistered.
    live: Arc<AtomicBool>,
    /// Keys bound for this gateway (the broker holds the truth; this is
    /// what deregistration unbinds).
    pub(crate) keys: HashSet<String>,
    tx: mpsc::Sender<ServerItem>,
    /// Forwards the current queue consumer's deliveries into `tx`.
    pump: Option<JoinHandle<()>>,
}

impl Drop for ServerEntry {
    fn drop(&mut self) {
        if let Some(p) = self.pump.take() {
            p.abort();
        }
    }
}

pub(crate) async fn register(
    inner: &Arc<Inner>,
    server: &ServerId,
) -> Result<ServerStream, BackendError> {
    inner.current()?;
    let _registration = within(inner.timeout(), "register server", async {
        Ok(inner.registration.lock().await)
    })
    .await?;
    // Within this backend value, our own registry decides; across backend
    // values the exclusive queue does (RESOURCE_LOCKED below).
    let stale = match lock(&inner.servers).get(server) {
        Some(e) if e.live.load(Ordering::Acquire) => {
            return Err(BackendError::Conflict(server.to_string().into()))
        }
        Some(e) => Some(e.generation),
        None => None,
    };
    if let Some(g) = stale {
        // The previous stream was dropped and its clean-up has not run
        // yet: do it now, so the new registration starts with no routes.
        // A failure here is not fatal: `attach` deletes the queue anyway.
        if let Err(e) = remove_locked(inner, server, Some(g)).await {
            tracing::debug!(server = %server, error = %e, "clean-up before re-registration");
        }
    }
    let session = inner.current()?;
    let (tx, rx) = mpsc::channel(SERVER_BUFFER);
    let consumer = attach(inner, &session, server, true).await?;
    let generation = next_id(&inner.ids);
    let live = Arc::new(AtomicBool::new(true));
    let pump = tokio::spawn(pump(
        consumer,
        tx.clone(),
        false,
        Reattach {
            inner: Arc::downgrade(inner),
            server: server.clone(),
            generation,
            session: session.generation,
        },
    ));
    lock(&inner.servers).insert(
        server.clone(),
        ServerEntry {
            generation,
            live: live.clone(),
            keys: HashSet::new(),
            tx,
            pump: Some(pump),
        },
    );
    let guard = ServerGuard {
        inner: Arc::downgrade(inner),
        id: server.clone(),
        generation,
        live,
    };
    let state = StreamState {
        rx,
        prev: None,
        unacked: 0,
        limit: inner.timeout(),
        _guard: guard,
    };
    Ok(stream::unfold(state, |mut st| async move {
        // Taking the next item means the gateway handled the previous one
        // (had it crashed instead, the exclusive queue would be gone with
        // its connection: nothing to redeliver to). One `multiple` ack of
        // the latest handled delivery covers every earlier one on its
        // channel, so while more deliveries are already waiting the ack is
        // deferred, up to ACK_BATCH of them: one frame instead of one per
        // message, for the broker and the gateway alike.
        let next = match st.rx.try_recv() {
            Ok(item) if st.unacked < ACK_BATCH => item,
            Ok(item) => {
                st.flush().await;
                item
            }
            Err(mpsc::error::TryRecvError::Empty) => {
                st.flush().await;
                st.rx.recv().await?
            }
            Err(mpsc::error::TryRecvError::Disconnected) => {
                st.flush().await;
                return None;
            }
        };
        let (event, acker) = next;
        if let Some(acker) = acker {
            // An acker of a channel lost meanwhile is dropped unacked: its
            // deliveries went with the channel.
            st.prev = Some(acker);
            st.unacked += 1;
        }
        Some((event, st))
    })
    .boxed())
}

/// Most handled deliveries one `multiple` ack covers.
const ACK_BATCH: usize = 64;

struct StreamState {
    rx: mpsc::Receiver<ServerItem>,
    /// The latest delivery handed out, not yet acked.
    prev: Option<Acker>,
    /// Deliveries handed out since the last ack.
    unacked: usize,
    limit: std::time::Duration,
    _guard: ServerGuard,
}

impl StreamState {
    /// Acks every delivery handed out so far (they are all handled: this
    /// runs when the stream is asked for more).
    async fn flush(&mut self) {
        if let Some(acker) = self.prev.take() {
            let all = BasicAckOptions { multiple: true };
            let _ = tokio::time::timeout(self.limit, acker.ack(all)).await;
        }
        self.unacked = 0;
    }
}

/// Deregisters the server when its stream is dropped, unless the id was
/// registered anew since (generation).
struct ServerGuard {
    inner: Weak<Inner>,
    id: ServerId,
    generation: u64,
    live: Arc<AtomicBool>,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.live.store(false, Ordering::Release);
        let (weak, id, generation) = (self.inner.clone(), self.id.clone(), self.generation);
        // Without a runtime (process exit) there is nothing to do: the
        // connection closes and the exclusive queue goes with it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let Some(inner) = weak.upgrade() else { return };
                let _registration = inner.registration.lock().await;
                if let Err(e) = remove_locked(&inner, &id, Some(generation)).await {
                    tracing::warn!(server = %id, error = %e, "clean-up of a dropped gateway stream failed; its queue goes with the connection");
                }
            });
        }
    }
}

/// Declares the gateway's queue on `session` and starts consuming it.
/// `fresh` first deletes a leftover queue of the same name (ours: another
/// connection's exclusive queue refuses with RESOURCE_LOCKED, which means
/// the id is live elsewhere), so a new registration never inherits routes.
async fn attach(
    inner: &Inner,
    session: &Session,
    server: &ServerId,
    fresh: bool,
) -> Result<Consumer, BackendError> {
    let queue = inner.names.server_queue(server.as_str());
    let conflict = |e: &lapin::Error, what: &str| {
        if is_resource_locked(e) {
            BackendError::Conflict(
                format!("{server} (its queue is held by another connection)").into(),
            )
        } else {
            map_err(what, e)
        }
    };
    within(inner.timeout(), "register server", async {
        if fresh {
            let ch = session
                .consume
                .create_channel()
                .await
                .map_err(|e| map_err("open channel", &e))?;
            ch.queue_delete(ss(&queue), QueueDeleteOptions::default())
                .await
                .map_err(|e| conflict(&e, "delete leftover gateway queue"))?;
            let _ = ch.close(200, "ok".into()).await;
        }
        let ch = session
            .consume
            .create_channel()
            .await
            .map_err(|e| map_err("open channel", &e))?;
        // Deleted with the connection, so a gateway that dies without
        // deregistering leaves no queue and no bindings behind.
        declare_private_queue(&ch, &queue)
            .await
            .map_err(|e| conflict(&e, "declare gateway queue"))?;
        ch.basic_qos(inner.config.server_prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| map_err("set gateway prefetch", &e))?;
        ch.basic_consume(
            ss(&queue),
            ss(&format!("gw.{server}")),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_err("consume gateway queue", &e))
    })
    .await
}

/// Who to re-attach when a gateway queue's consumer ends on its own.
struct Reattach {
    inner: Weak<Inner>,
    server: ServerId,
    /// The registration.
    generation: u64,
    /// The session the consumer lived on.
    session: u64,
}

/// Forwards a gateway queue's deliveries to its stream; first a
/// `RoutesLost` when this attachment replaces one that was lost.
async fn pump(
    mut consumer: Consumer,
    tx: mpsc::Sender<ServerItem>,
    routes_lost: bool,
    reattach: Reattach,
) {
    if routes_lost && tx.send((ServerEvent::RoutesLost, None)).await.is_err() {
        return;
    }
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "gateway queue consumer ended");
                break;
            }
        };
        let Some(key) = RouteKey::parse(delivery.routing_key.as_str()) else {
            // Not a key this system publishes (someone else's publish on
            // our exchange): drop it rather than stall the queue.
            tracing::warn!(routing_key = %delivery.routing_key, "dropping outgoing message with a foreign routing key");
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            continue;
        };
        let msg = ServerEvent::Message(OutgoingMessage {
            key,
            payload: Bytes::from(delivery.data),
        });
        if tx.send((msg, Some(delivery.acker))).await.is_err() {
            return;
        }
    }
    // The consumer ended without us stopping it (we abort the task for
    // that): its channel or queue is gone. After a connection loss the
    // supervisor re-attaches every gateway; otherwise (the queue was
    // deleted by hand, a channel error) this gateway is re-attached alone.
    if let Some(inner) = reattach.inner.upgrade() {
        inner.queues_lost.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(reattach_one(inner, reattach));
    }
}

/// A registered gateway whose queue consumer is gone and not yet
/// re-attached (its routes deliver nothing meanwhile), if any.
pub(crate) fn detached(inner: &Inner) -> Option<ServerId> {
    lock(&inner.servers)
        .iter()
        .find(|(_, e)| {
            e.live.load(Ordering::Acquire) && e.pump.as_ref().is_none_or(JoinHandle::is_finished)
        })
        .map(|(id, _)| id.clone())
}

/// Another connection holds this gateway's exclusive queue: its server id
/// was registered by another process while this one could not renew its
/// queue (a partition, a paused process). This registration ends: its
/// stream closes, and the gateway stops being ready.
fn taken_over(inner: &Inner, server: &ServerId, generation: u64) {
    let entry = {
        let mut servers = lock(&inner.servers);
        match servers.get(server) {
            Some(e) if e.generation == generation => servers.remove(server),
            _ => None,
        }
    };
    if let Some(e) = entry {
        e.live.store(false, Ordering::Release);
        tracing::error!(
            server = %server,
            "server id registered by another process (its queue is held by another connection); this registration ends"
        );
    }
}

/// Re-declares one gateway's queue on the current session and sends it
/// `RoutesLost`, unless the supervisor does it (new session) or the
/// registration is gone.
///
/// Boxed: it spawns `pump`, which spawns it (a recursive async type).
fn reattach_one(inner: Arc<Inner>, r: Reattach) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(reattach_one_inner(inner, r))
}

/// First pause before re-declaring a lost gateway queue (gives a
/// connection loss the time to be noticed first); doubles up to the cap.
const REATTACH_FIRST: std::time::Duration = std::time::Duration::from_millis(200);
const REATTACH_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The pause after `delay`: doubled, capped. Never gives up: a gateway
/// whose queue cannot be declared delivers nothing, so it keeps trying for
/// as long as the registration lives (and `health` says not ready).
fn next_reattach_delay(delay: std::time::Duration) -> std::time::Duration {
    (delay * 2).min(REATTACH_MAX)
}

async fn reattach_one_inner(inner: Arc<Inner>, r: Reattach) {
    // Held weakly while waiting, so that dropping the backend ends this.
    let weak = Arc::downgrade(&inner);
    drop(inner);
    let mut delay = REATTACH_FIRST;
    let mut failures = 0u64;
    loop {
        let Some(mut stopping) = weak.upgrade().map(|i| i.stopping.subscribe()) else {
            return;
        };
        if *stopping.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopping.changed() => return,
        }
        delay = next_reattach_delay(delay);
        let Some(inner) = weak.upgrade() else { return };
        let _registration = inner.registration.lock().await;
        let Ok(session) = inner.current() else {
            return;
        };
        let tx = {
            let servers = lock(&inner.servers);
            match servers.get(&r.server) {
                Some(e)
                    if e.generation == r.generation
                        && e.live.load(Ordering::Acquire)
                        && e.pump.as_ref().is_none_or(JoinHandle::is_finished) =>
                {
                    e.tx.clone()
                }
                _ => return,
            }
        };
        if session.generation != r.session {
            return;
        }
        match attach(&inner, &session, &r.server, false).await {
            Ok(consumer) => {
                let mut servers = lock(&inner.servers);
                if let Some(e) = servers.get_mut(&r.server) {
                    e.keys.clear();
                    e.pump = Some(tokio::spawn(pump(
                        consumer,
                        tx,
                        true,
                        Reattach {
                            inner: Arc::downgrade(&inner),
                            server: r.server.clone(),
                            generation: r.generation,
                            session: session.generation,
                        },
                    )));
                }
                tracing::warn!(server = %r.server, failures, "gateway queue was lost; declared it again");
                return;
            }
            Err(BackendError::Conflict(_)) => {
                taken_over(&inner, &r.server, r.generation);
                return;
            }
            Err(e) => {
                failures += 1;
                // Every try at first, then one line in ten: the state is
                // also visible as `/readyz` 503.
                if failures <= 3 || failures.is_multiple_of(10) {
                    tracing::warn!(server = %r.server, error = %e, failures, "cannot declare the gateway queue again yet; retrying");
                }
            }
        }
    }
}

/// After a reconnect (registration lock held): every live gateway gets a
/// new queue on the new session and a `RoutesLost`; its bound keys are
/// forgotten, since the gateway binds them again.
pub(crate) async fn reattach_all(
    inner: &Arc<Inner>,
    session: &Arc<Session>,
) -> Result<(), BackendError> {
    let targets: Vec<(ServerId, u64)> = {
        let mut servers = lock(&inner.servers);
        // Streams dropped while disconnected: their queue went with the
        // old connection; nothing is left to clean.
        servers.retain(|_, e| e.live.load(Ordering::Acquire));
        servers
            .iter()
            .map(|(id, e)| (id.clone(), e.generation))
            .collect()
    };
    for (id, generation) in targets {
        let consumer = match attach(inner, session, &id, false).await {
            Ok(c) => c,
            // Another process took the id while we were disconnected: that
            // gateway's registration ends; the others go on.
            Err(BackendError::Conflict(_)) => {
                taken_over(inner, &id, generation);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut servers = lock(&inner.servers);
        if let Some(e) = servers.get_mut(&id).filter(|e| e.generation == generation) {
            e.keys.clear();
            if let Some(old) = e.pump.take() {
                old.abort();
            }
            e.pump = Some(tokio::spawn(pump(
                consumer,
                e.tx.clone(),
                true,
                Reattach {
                    inner: Arc::downgrade(inner),
                    server: id.clone(),
                    generation,
                    session: session.generation,
                },
            )));
        }
    }
    Ok(())
}

/// On shutdown: stop every gateway's pump and forget the gateways, which
/// ends their streams once the buffered messages are taken.
pub(crate) fn detach_all(inner: &Inner) {
    let entries: Vec<ServerEntry> = lock(&inner.servers).drain().map(|(_, e)| e).collect();
    for e in &entries {
        e.live.store(false, Ordering::Release);
    }
    drop(entries);
}

pub(crate) async fn deregister(inner: &Arc<Inner>, server: &ServerId) -> Result<(), BackendError> {
    if inner.is_closed() {
        return Err(BackendError::Closed);
    }
    let _registration = within(inner.timeout(), "deregister server", async {
        Ok(inner.registration.lock().await)
    })
    .await?;
    remove_locked(inner, server, None).await
}

/// Removes a gateway (the registration lock is held): stops its stream,
/// unbinds its keys in batches, then deletes its queue. `generation`
/// restricts it to one registration.
async fn remove_locked(
    inner: &Arc<Inner>,
    server: &ServerId,
    generation: Option<u64>,
) -> Result<(), BackendError> {
    let entry = {
        let mut servers = lock(&inner.servers);
        match servers.get(server) {
            Some(e) if generation.is_none_or(|g| g == e.generation) => servers.remove(server),
            _ => None,
        }
    };
    let Some(mut entry) = entry else {
        return Ok(());
    };
    entry.live.store(false, Ordering::Release);
    // Dropping the pump's consumer closes its channel: no more deliveries.
    if let Some(p) = entry.pump.take() {
        p.abort();
    }
    let keys: Vec<String> = entry.keys.drain().collect();
    drop(entry);
    let Ok(session) = inner.current() else {
        // No connection: the exclusive queue and its bindings are gone.
        return Ok(());
    };
    let queue = inner.names.server_queue(server.as_str());
    let unbound = unbind_batched(inner, &session, &queue, &keys).await;
    let deleted = bounded(inner.timeout(), "delete gateway queue", async {
        let ch = session.binders.get(hint_of(&[&queue])).await?;
        ch.queue_delete(ss(&queue), QueueDeleteOptions::default())
            .await
    })
    .await;
    unbound.and(deleted.map(|_| ()))
}

/// Unbinds `keys` from `queue`, `UNBIND_BATCH` at a time, each batch
/// spread over the binding channels and bounded by the operation timeout.
async fn unbind_batched(
    inner: &Inner,
    session: &Session,
    queue: &str,
    keys: &[String],
) -> Result<(), BackendError> {
    let exchange = inner.names.outgoing_exchange();
    let mut first_error = None;
    for batch in keys.chunks(UNBIND_BATCH) {
        let results = futures::future::join_all(batch.iter().map(|rk| {
            bounded(inner.timeout(), "unbind", async {
                let ch = session.binders.get(hint_of(&[queue, rk])).await?;
                ch.queue_unbind(ss(queue), ss(&exchange), ss(rk), FieldTable::default())
                    .await
            })
        }))
        .await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

pub(crate) async fn bind(
    inner: &Arc<Inner>,
    server: &ServerId,
    key: &RouteKey,
) -> Result<(), BackendError> {
    // queue.bind-ok means the binding is in place: a publish that starts
    // after this returns is routed by it. Binding twice is a no-op on the
    // broker, which makes bind idempotent.
    set_binding(inner, server, key, true).await
}

pub(crate) async fn unbind(
    inner: &Arc<Inner>,
    server: &ServerId,
    key: &RouteKey,
) -> Result<(), BackendError> {
    // Unbinding a binding that does not exist is unbind-ok in RabbitMQ.
    set_binding(inner, server, key, false).await
}

/// Records `key` as bound (`bound`) or not in `server`'s entry, then sends
/// queue.bind or queue.unbind of the server's queue under it, on the binder
/// channel that the queue and key hash to. A failure hints that the session
/// is lost.
async fn set_binding(
    inner: &Arc<Inner>,
    server: &ServerId,
    key: &RouteKey,
    bound: bool,
) -> Result<(), BackendError> {
    let rk = key.as_routing_key();
    let rk_ss = routing_key(&rk)?;
    {
        let mut servers = lock(&inner.servers);
        match servers.get_mut(server) {
            Some(e) if e.live.load(Ordering::Acquire) => {
                if bound {
                    e.keys.insert(rk.clone());
                } else {
                    e.keys.remove(&rk);
                }
            }
            _ if bound => return Err(BackendError::NotRegistered(server.to_string().into())),
            // Not registered (or being cleaned up): there is no queue to
            // route to, so nothing is bound.
            _ => return Ok(()),
        }
    }
    let session = inner.current()?;
    let queue = inner.names.server_queue(server.as_str());
    let exchange = inner.names.outgoing_exchange();
    let what = if bound { "bind" } else { "unbind" };
    let r = bounded(inner.timeout(), what, async {
        let ch = session.binders.get(hint_of(&[&queue, &rk])).await?;
        if bound {
            ch.queue_bind(
                ss(&queue),
                ss(&exchange),
                rk_ss,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        } else {
            ch.queue_unbind(ss(&queue), ss(&exchange), rk_ss, FieldTable::default())
                .await
        }
    })
    .await;
    if r.is_err() {
        inner.hint_lost();
    }
    r
}

pub(crate) async fn publish(
    inner: &Arc<Inner>,
    key: &RouteKey,
    payload: Bytes,
) -> Result<RouteOutcome, BackendError> {
    let rk = key.as_routing_key();
    let rk_ss = routing_key(&rk)?;
    let session = inner.current()?;
    let exchange = inner.names.outgoing_exchange();
    // Transient: gateway queues are not durable anyway. Mandatory: the
    // broker returns what no binding routes, which is how we know a key
    // has nobody online. The confirm comes once the message is in every
    // bound queue, so anything published later is queued behind it.
    let confirmation = bounded(inner.timeout(), "publish outgoing", async {
        let ch = session.outgoing_pub.get(hint_of(&[&rk])).await?;
        ch.basic_publish(
            ss(&exchange),
            rk_ss,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &payload,
            BasicProperties::default().with_delivery_mode(1),
        )
        .await?
        .await
    })
    .await;
    match confirmation {
        Ok(Confirmation::Ack(None)) => Ok(RouteOutcome::Routed { servers: None }),
        Ok(Confirmation::Ack(Some(_returned))) => {
            inner.unroutable.fetch_add(1, Ordering::Relaxed);
            Ok(RouteOutcome::Unroutable)
        }
        Ok(Confirmation::Nack(_)) => Err(BackendError::Unavailable(
            "the broker refused the outgoing message (nack)".into(),
        )),
        Ok(Confirmation::NotRequested) => Ok(RouteOutcome::Unknown),
        Err(e) => {
            inner.hint_lost();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reattach_backoff_is_capped_and_never_ends() {
        let mut delay = REATTACH_FIRST;
        let mut waited = std::time::Duration::ZERO;
        // An hour of failures: the pause stays at the cap; the loop that
        // uses it has no bound on tries.
        for _ in 0..1000 {
            waited += delay;
            delay = next_reattach_delay(delay);
            assert!(delay <= REATTACH_MAX);
        }
        assert_eq!(delay, REATTACH_MAX);
        assert!(waited > std::time::Duration::from_secs(3600));
    }
}
