//! Names of everything the backend creates on the broker, and the
//! declarations of the shared topology. Every name starts with the
//! namespace, so two namespaces on one broker share nothing.

use std::sync::atomic::{AtomicBool, Ordering};

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind, Queue};

use crate::session::ChannelPool;
use crate::{QueueType, RabbitMqConfig};

/// Routing key of the dead-letter queue's binding on the dead-letter exchange.
pub(crate) const DEAD_KEY: &str = "dead";
/// Routing key of the presence queues on the members exchange.
pub(crate) const MEMBERS_KEY: &str = "m";
/// Routing key that keeps auto-delete exchanges of an ephemeral namespace
/// alive while its dead-letter queue lives. No route key can take this
/// value: ids cannot contain `~`.
pub(crate) const ANCHOR_KEY: &str = "~anchor";

/// Header carrying the ordering key of an incoming event.
pub(crate) const H_ORDERING_KEY: &str = "x-fanout-ordering-key";
/// Header carrying the worker's dead-letter reason.
pub(crate) const H_REASON: &str = "x-fanout-reason";
/// Header carrying the number of deliveries before dead-lettering.
pub(crate) const H_ATTEMPTS: &str = "x-fanout-attempts";
/// Header carrying the partition an event was dead-lettered from.
pub(crate) const H_PARTITION: &str = "x-fanout-partition";

/// The names of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    ns: String,
}

impl Names {
    pub(crate) fn new(ns: &str) -> Self {
        Self { ns: ns.to_owned() }
    }

    pub(crate) fn incoming_exchange(&self) -> String {
        format!("{}.incoming", self.ns)
    }
    pub(crate) fn outgoing_exchange(&self) -> String {
        format!("{}.outgoing", self.ns)
    }
    pub(crate) fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.ns)
    }
    pub(crate) fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }
    pub(crate) fn members_exchange(&self) -> String {
        format!("{}.members", self.ns)
    }
    pub(crate) fn partition_queue(&self, p: u32) -> String {
        format!("{}.in.{p}", self.ns)
    }
    pub(crate) fn member_queue(&self, member: &str) -> String {
        format!("{}.member.{member}", self.ns)
    }
    pub(crate) fn server_queue(&self, server: &str) -> String {
        format!("{}.gw.{server}", self.ns)
    }
}

/// The routing key of partition `p` on the incoming exchange.
pub(crate) fn partition_key(p: u32) -> String {
    p.to_string()
}

/// A short string that the caller has already bounded (names are at most
/// namespace (100) + a fixed suffix + an id (64) bytes).
pub(crate) fn ss(s: &str) -> ShortString {
    ShortString::from(s)
}

/// Declares a queue private to one owner (a gateway, a group member):
/// exclusive and auto-delete, so it goes with the owner's connection or
/// channel and an owner that dies leaves no queue and no bindings behind.
pub(crate) async fn declare_private_queue(ch: &Channel, queue: &str) -> lapin::Result<Queue> {
    ch.queue_declare(
        ss(queue),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
}

/// A routing key from a [`fanout_backend::RouteKey`]. Its variants are
/// public, so an unvalidated (too long) one is refused here rather than
/// trusted.
pub(crate) fn routing_key(rk: &str) -> Result<ShortString, fanout_backend::BackendError> {
    ShortString::try_new(rk).map_err(|_| {
        fanout_backend::BackendError::Invalid(
            format!(
                "routing key longer than 255 bytes: {}...",
                rk.chars().take(32).collect::<String>()
            )
            .into(),
        )
    })
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The quorum partition queues' delivery limit: high enough that no event
/// reaches it (a billion hand-overs), present for the ordering it brings.
pub(crate) const UNREACHED_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// Where a quorum queue's leader is placed when it is declared.
pub(crate) const LEADER_LOCATOR: &str = "x-queue-leader-locator";

/// Arguments of a partition queue. They must stay identical across
/// versions: RabbitMQ refuses (PRECONDITION_FAILED) a re-declaration with
/// other arguments.
/// `leader_locator`: with the quorum leader locator (see [`declare`]).
pub(crate) fn partition_queue_args(
    config: &RabbitMqConfig,
    names: &Names,
    leader_locator: bool,
) -> FieldTable {
    let mut t = FieldTable::default();
    // One consumer at a time receives from a partition; the others wait.
    // This is what keeps per-partition order with several workers.
    t.insert(ss("x-single-active-consumer"), AMQPValue::Boolean(true));
    t.insert(
        ss("x-dead-letter-exchange"),
        long(&names.dead_letter_exchange()),
    );
    t.insert(ss("x-dead-letter-routing-key"), long(DEAD_KEY));
    match config.queue_type {
        QueueType::Quorum => {
            t.insert(ss("x-queue-type"), long("quorum"));
            // A delivery limit never reached in practice. The broker's count
            // includes hand-overs and lost channels, which say nothing
            // about the event, so it must never dead-letter on it (the
            // worker decides). Not "no limit": without one, 3.10+ puts a
            // requeued message at the back of the queue, behind later
            // events of its partition (rabbitmq-server#10499; checked on
            // 3.10.8), and 4.x would apply its default of 20.
            t.insert(
                ss("x-delivery-limit"),
                AMQPValue::LongLongInt(UNREACHED_DELIVERY_LIMIT),
            );
            // At-least-once dead-lettering (3.10+): the broker keeps the
            // message until the dead-letter queue confirmed it. It requires
            // reject-publish overflow.
            t.insert(ss("x-dead-letter-strategy"), long("at-least-once"));
            t.insert(ss("x-overflow"), long("reject-publish"));
            // On a cluster, each partition's leader goes to the node with
            // the fewest quorum leaders at declaration (3.10+; the default,
            // client-local, would put all of them on the node of whichever
            // process declared first). On one node it changes nothing.
            // Queues declared before it was added are declared again
            // without it ([`declare`]).
            if leader_locator {
                t.insert(ss(LEADER_LOCATOR), long("balanced"));
            }
        }
        QueueType::Classic => {
            t.insert(ss("x-queue-type"), long("classic"));
        }
    }
    if let Some(ms) = expiry_ms(config) {
        t.insert(ss("x-expires"), AMQPValue::LongLongInt(ms));
    }
    t
}

/// What this process found declared by earlier versions, so that later
/// declarations go straight to what the broker accepts.
#[derive(Debug, Default)]
pub(crate) struct Legacy {
    /// Partition queues without the leader locator.
    pub(crate) no_locator: AtomicBool,
    /// A classic dead-letter queue in a quorum namespace.
    pub(crate) classic_dead: AtomicBool,
}

/// Whether `e` is the broker refusing a re-declaration with other
/// arguments (PRECONDITION_FAILED).
fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// Whether `e` is the broker refusing a re-declaration because the queue
/// exists without the leader locator argument.
fn refuses_leader_locator(e: &lapin::Error) -> bool {
    is_precondition_failed(e)
        && matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
            if amqp.get_message().as_str().contains(LEADER_LOCATOR))
}

/// Arguments of the dead-letter queue: quorum or, as before clusters,
/// classic with no type argument at all. The quorum one has the
/// partitions' unreached delivery limit: every scan of it gives every
/// message back, which counts as a delivery, and RabbitMQ 4's default
/// limit of 20 would drop each dead letter after 20 scans.
fn dead_letter_queue_args(config: &RabbitMqConfig, quorum: bool) -> FieldTable {
    let mut t = expiry_args(config);
    if quorum {
        t.insert(ss("x-queue-type"), long("quorum"));
        t.insert(
            ss("x-delivery-limit"),
            AMQPValue::LongLongInt(UNREACHED_DELIVERY_LIMIT),
        );
    }
    t
}

fn expiry_ms(config: &RabbitMqConfig) -> Option<i64> {
    config
        .queue_expiry
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1))
}

fn expiry_args(config: &RabbitMqConfig) -> FieldTable {
    let mut t = FieldTable::default();
    if let Some(ms) = expiry_ms(config) {
        t.insert(ss("x-expires"), AMQPValue::LongLongInt(ms));
    }
    t
}

/// Declares the namespace's shared topology (idempotent): exchanges, the
/// dead-letter queue, the partition queues and their bindings.
///
/// With `queue_expiry` set the namespace is ephemeral: queues carry
/// `x-expires`, and exchanges are auto-delete, held alive by an anchor
/// binding to the dead-letter queue; when that queue expires, the exchanges
/// go with it and nothing is left on the broker.
///
/// Partition queues declared before the quorum leader locator was added
/// have no `x-queue-leader-locator`, and RabbitMQ (3.10.8, checked)
/// refuses a re-declaration that adds it (PRECONDITION_FAILED, which also
/// closes the channel). The locator only matters when a queue is created,
/// so such a queue is declared again without it, on a fresh channel of
/// `pool`, and `legacy` remembers that for the next declarations. Every
/// other argument stays checked. Likewise a classic dead-letter queue
/// declared before it became quorum is kept as it is.
pub(crate) async fn declare(
    pool: &ChannelPool,
    config: &RabbitMqConfig,
    names: &Names,
    legacy: &Legacy,
) -> lapin::Result<()> {
    let mut ch = pool.get(0).await?;
    let ephemeral = config.queue_expiry.is_some();
    let ex = |durable: bool| ExchangeDeclareOptions {
        durable,
        auto_delete: ephemeral,
        ..ExchangeDeclareOptions::default()
    };
    let incoming = names.incoming_exchange();
    let outgoing = names.outgoing_exchange();
    let dlx = names.dead_letter_exchange();
    let members = names.members_exchange();
    let dead = names.dead_letter_queue();
    for (name, durable) in [
        (&incoming, true),
        (&outgoing, true),
        (&dlx, true),
        (&members, true),
    ] {
        ch.exchange_declare(
            ss(name),
            ExchangeKind::Direct,
            ex(durable),
            FieldTable::default(),
        )
        .await?;
    }
    // The dead-letter queue is of the partitions' type: quorum, so that
    // dead letters survive the loss of a node like the events they were,
    // and so that no single node's loss makes this declaration fail (a
    // classic durable queue whose node is down is NOT_FOUND for everyone,
    // which would keep every process of the cluster from connecting).
    // `dead_letters()` reads it with basic.get and gives the messages back
    // by closing its channel: a classic queue puts them back where they
    // were, a quorum queue behind the rest, so a scan of a quorum queue
    // takes all of it (`incoming/dead_letter.rs`); the conformance suite
    // checks the order on both.
    let declared = if legacy.classic_dead.load(Ordering::Relaxed) {
        None
    } else {
        Some(
            ch.queue_declare(
                ss(&dead),
                QueueDeclareOptions::durable(),
                dead_letter_queue_args(config, config.queue_type == QueueType::Quorum),
            )
            .await,
        )
    };
    match declared {
        Some(Err(e)) if is_precondition_failed(&e) => {
            // Declared classic by a version before this one: keep it
            // (moving it would need its dead letters resolved first). It
            // lives on one node: see docs/backends/rabbitmq.md.
            tracing::warn!(
                queue = %dead,
                "the dead-letter queue is an older classic queue (one node, not replicated); keeping it"
            );
            legacy.classic_dead.store(true, Ordering::Relaxed);
            ch = pool.get(0).await?;
            ch.queue_declare(
                ss(&dead),
                QueueDeclareOptions::durable(),
                dead_letter_queue_args(config, false),
            )
            .await?;
        }
        Some(r) => {
            r?;
        }
        None => {
            ch.queue_declare(
                ss(&dead),
                QueueDeclareOptions::durable(),
                dead_letter_queue_args(config, false),
            )
            .await?;
        }
    }
    ch.queue_bind(
        ss(&dead),
        ss(&dlx),
        ss(DEAD_KEY),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    if ephemeral {
        for exchange in [&incoming, &outgoing, &members] {
            ch.queue_bind(
                ss(&dead),
                ss(exchange),
                ss(ANCHOR_KEY),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
    }
    let args = partition_queue_args(config, names, true);
    let without_locator = partition_queue_args(config, names, false);
    for p in 0..config.partitions.max(1) {
        let q = names.partition_queue(p);
        let first = if legacy.no_locator.load(Ordering::Relaxed) {
            &without_locator
        } else {
            &args
        };
        let declared = ch
            .queue_declare(ss(&q), QueueDeclareOptions::durable(), first.clone())
            .await;
        match declared {
            Err(e) if refuses_leader_locator(&e) => {
                legacy.no_locator.store(true, Ordering::Relaxed);
                ch = pool.get(0).await?;
                ch.queue_declare(
                    ss(&q),
                    QueueDeclareOptions::durable(),
                    without_locator.clone(),
                )
                .await?;
            }
            r => {
                r?;
            }
        }
        ch.queue_bind(
            ss(&q),
            ss(&incoming),
            ss(&partition_key(p)),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}
