//! Persistence through sqlx: one schema (`migrations/`) and one code path
//! for SQLite (the embedded default) and PostgreSQL, via sqlx's `Any`
//! driver. The schema sticks to portable types (TEXT, BIGINT) so that no
//! query needs a per-database variant.
//!
//! Every stored message and membership change is an [`Entry`] of one or two
//! streams (see [`crate::stream`]), with its position given in the
//! transaction that stores it: the writer raises each touched stream's head
//! in `streams` with one upsert (rows sorted by stream, so two writers lock
//! heads in one order and never deadlock), then writes the entries. The
//! head rows stay locked until the commit, so one stream's positions are
//! committed in order; a rollback returns them: no gap, no duplicate,
//! whichever process writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use fanout_backend::OrderingKey;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::DatabaseError as _;
use sqlx::{AnyPool, Row};

use crate::protocol::{Message, Target};
use crate::stream::{Body, Change, Entry, Membership, Stream};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be reached or timed out; worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused a statement (constraint, bad value).
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// Applying migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row that exists already (channel id taken).
    #[error("already exists")]
    Conflict,
    /// The URL is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL {0:?}: use sqlite:PATH or postgres://...")]
    Url(String),
}

impl StoreError {
    /// Whether the same call may succeed later without any change.
    pub fn is_temporary(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// Whether the error may be about the rows the statement carried
    /// rather than about the database: a constraint the row breaks, a value
    /// the column cannot take, a value that cannot be encoded. Only these
    /// can make a message bad by its content; everything else (read-only,
    /// disk full, out of memory, permissions, a missing table, lost
    /// connections) is the database's trouble, whatever its code.
    pub fn blames_data(&self) -> bool {
        let e = match self {
            StoreError::Database(e) => e,
            _ => return false,
        };
        match e {
            sqlx::Error::Encode(_) => true,
            sqlx::Error::Database(db) => {
                if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    // Class 22: data exception; class 23: integrity
                    // constraint violation.
                    let code = pg.code();
                    code.starts_with("22") || code.starts_with("23")
                } else if let Some(lite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                    // Primary result codes (the low byte of the extended
                    // one): TOOBIG, CONSTRAINT, MISMATCH, RANGE.
                    let code = lite.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(0);
                    matches!(code & 0xff, 18 | 19 | 20 | 25)
                } else {
                    false
                }
            }
            _ => false,
        }
    }
}

fn is_transient(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        let c = pg.code();
        return c.starts_with("57") || c.starts_with("08") || c.starts_with("40");
    }
    if let Some(lite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
        let code = lite.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(0);
        return matches!(code & 0xff, 5 | 6);
    }
    false
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => StoreError::Unavailable(e),
            // PostgreSQL shutting down or restarting (class 57), connection
            // exceptions (class 08) and transaction rollbacks (class 40:
            // serialization failure, deadlock) are transient too; so are
            // SQLite's BUSY and LOCKED (another writer holds the file).
            sqlx::Error::Database(ref db) if is_transient(db.as_ref()) => {
                StoreError::Unavailable(e)
            }
            other => StoreError::Database(other),
        }
    }
}

/// The batch insert of `n` messages; [`bind_message`] binds each.
fn insert_sql(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO messages (id, conversation, sender_id, receiver_id, channel_id, content, client_msg_id, created_at) VALUES ",
    );
    for i in 0..n {
        let b = i * 8;
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&format!(
            "(${},${},${},${},${},${},${},${})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            b + 6,
            b + 7,
            b + 8
        ));
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING id");
    sql
}

fn bind_message<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    m: &Message,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let (receiver, channel) = match &m.target {
        Target::User(r) => (Some(r.clone()), None),
        Target::Channel(c) => (None, Some(c.clone())),
    };
    q.bind(m.id.clone())
        .bind(m.ordering_key().as_str().to_owned())
        .bind(m.sender_id.clone())
        .bind(receiver)
        .bind(channel)
        .bind(m.content.clone())
        .bind(m.client_msg_id.clone())
        .bind(m.created_at)
}

/// The PostgreSQL batch insert of `n` messages with `wants` entries: the
/// messages, the reservation of their positions and their entries in one
/// statement, so in a transaction of its own (autocommit). A head row is
/// then locked from the reservation to the commit only, never across a
/// round trip to the worker: the writers of a busy inbox queue behind one
/// statement's execution, not behind each other's turns at the network and
/// the scheduler (four statements in a transaction cost the personal ramp
/// more than half its rate, `docs/architecture.md`, "Invariants").
///
/// Binds, per message (`batch`): its index in the batch, then the
/// [`bind_message`] columns; then per entry wanted (`wants`): the message's
/// index and the stream. Returns one row per entry written: `stream`,
/// `seq`, `message_id`. A message already stored (by id or by
/// `(sender, clientMsgId)`) is not inserted and gets no entry; an id given
/// twice is new once, with the positions of its first place in the batch.
/// Positions follow the batch's order within each stream, and the heads
/// are raised in stream order, as [`reserve`] does, so writers lock them in
/// one order.
fn positioned_insert_sql(n: usize, wants: usize) -> String {
    const CASTS: [&str; 9] = [
        "bigint", "text", "text", "text", "text", "text", "text", "text", "bigint",
    ];
    let mut sql = String::with_capacity(900 + n * 120 + wants * 30);
    sql.push_str(
        "WITH batch (ord, id, conversation, sender_id, receiver_id, channel_id, content, client_msg_id, created_at) AS (VALUES ",
    );
    let mut p = 0;
    for r in 0..n {
        sql.push_str(if r == 0 { "(" } else { ",(" });
        for (c, cast) in CASTS.iter().enumerate() {
            p += 1;
            if c > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("${p}::{cast}"));
        }
        sql.push(')');
    }
    sql.push_str("), wants (ord, stream) AS (VALUES ");
    for r in 0..wants {
        p += 2;
        if r > 0 {
            sql.push(',');
        }
        sql.push_str(&format!("(${}::bigint,${}::text)", p - 1, p));
    }
    sql.push_str(
        "), new AS (\
           INSERT INTO messages (id, conversation, sender_id, receiver_id, channel_id, content, client_msg_id, created_at) \
           SELECT id, conversation, sender_id, receiver_id, channel_id, content, client_msg_id, created_at FROM batch ORDER BY ord \
           ON CONFLICT DO NOTHING RETURNING id), \
         firsts AS (SELECT DISTINCT ON (b.id) b.ord, b.id, b.created_at FROM batch b JOIN new ON new.id = b.id ORDER BY b.id, b.ord), \
         wanted AS (SELECT w.stream, f.ord, f.id, f.created_at FROM wants w JOIN firsts f ON f.ord = w.ord), \
         counts AS (SELECT stream, count(*) AS n FROM wanted GROUP BY stream), \
         heads AS (\
           INSERT INTO streams (stream, head) SELECT stream, n FROM counts ORDER BY stream \
           ON CONFLICT (stream) DO UPDATE SET head = streams.head + excluded.head RETURNING stream, head), \
         entries AS (\
           INSERT INTO stream_entries (stream, seq, message_id, created_at) \
           SELECT w.stream, h.head - c.n + ROW_NUMBER() OVER (PARTITION BY w.stream ORDER BY w.ord), w.id, w.created_at \
           FROM wanted w JOIN counts c ON c.stream = w.stream JOIN heads h ON h.stream = w.stream \
           RETURNING stream, seq, message_id) \
         SELECT stream, seq, message_id FROM entries",
    );
    sql
}

/// What storing one message found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now.
    New,
    /// This very event (same id) was stored before: a broker redelivery.
    /// Its routing may not have finished, so it is routed again.
    Redelivered,
    /// Another message with the same `(sender, clientMsgId)` was stored
    /// before: a client's retry. The first one's own event is routed (or
    /// redelivered until it is), so a retry is not routed again.
    Retry,
}

/// The result of storing one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The one stored message: the given one, or the one stored before with
    /// the same id or the same `(sender, clientMsgId)`.
    pub message: Message,
    /// What this call found.
    pub outcome: Outcome,
    /// The stored message's entries with their positions: a personal
    /// message's in the receiver's inbox then the sender's (one entry for a
    /// message to oneself), a channel message's in the channel's stream.
    /// Written now for [`Outcome::New`], read back otherwise (for
    /// [`Outcome::Retry`], the first message's, which are not routed).
    pub entries: Vec<Entry>,
}

/// One of a user's memberships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberOf {
    /// The channel.
    pub channel_id: String,
    /// The channel-stream position of the entry that added the user (0 for
    /// a membership from before positions existed).
    pub joined_seq: i64,
    /// That entry's position in the user's inbox (0 likewise).
    pub inbox_seq: i64,
}

/// A channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Its id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Who created it (may remove anyone).
    pub creator_id: String,
}

/// The database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// SQLite resolves each `$N` by a linear search of the statement's
    /// parameter names, so statements with many values use `?` there.
    sqlite: bool,
    /// SQLite has one writer at a time, and a writer that finds the file
    /// locked polls with sleeps of up to 100 ms: a long write (a channel of
    /// 1,000 members) would stall the worker's inserts in steps of that.
    /// Writers of this process take turns here instead; `None` on
    /// PostgreSQL.
    writer: Option<std::sync::Arc<Writer>>,
}

/// Turns at SQLite's one writer. Short writes (messages, one member) go in
/// order; a bulk write (a channel creation) waits until no short write is
/// waiting, so a flood of creations delays chat inserts by at most the one
/// creation already writing.
#[derive(Debug, Default)]
struct Writer {
    turn: tokio::sync::Mutex<()>,
    /// Short writes waiting for the turn.
    short_waiting: std::sync::atomic::AtomicUsize,
    /// Woken when no short write waits any more.
    no_short_waiting: tokio::sync::Notify,
}

impl Writer {
    async fn short(&self) -> tokio::sync::MutexGuard<'_, ()> {
        use std::sync::atomic::Ordering;
        self.short_waiting.fetch_add(1, Ordering::SeqCst);
        let turn = self.turn.lock().await;
        if self.short_waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.no_short_waiting.notify_waiters();
        }
        turn
    }

    async fn bulk(&self) -> tokio::sync::MutexGuard<'_, ()> {
        use std::sync::atomic::Ordering;
        loop {
            let wake = self.no_short_waiting.notified();
            tokio::pin!(wake);
            // Registered before the check, so a wake-up between the check
            // and the wait is not missed.
            wake.as_mut().enable();
            if self.short_waiting.load(Ordering::SeqCst) == 0 {
                let turn = self.turn.lock().await;
                if self.short_waiting.load(Ordering::SeqCst) == 0 {
                    return turn;
                }
                // A short write queued while we waited: it goes first.
                drop(turn);
                continue;
            }
            wake.await;
        }
    }
}

/// Members written by one INSERT at channel creation (5 values a row on
/// SQLite: 30,000, under its 32,766 parameters).
pub const MEMBERS_PER_STATEMENT: usize = 6_000;
/// Entries written by one INSERT (at most 8 values a row: 24,000).
const ENTRIES_PER_STATEMENT: usize = 3_000;
/// Streams whose heads one statement raises (2 values a row).
const STREAMS_PER_STATEMENT: usize = 10_000;

/// Appends the placeholder of the `n`th value (from 1) of a statement: `?`
/// on SQLite (values bound in order; SQLite resolves each `$N` by a linear
/// search of the statement's names), `$n` on PostgreSQL.
fn placeholder(sql: &mut String, sqlite: bool, n: usize) {
    if sqlite {
        sql.push('?');
    } else {
        sql.push('$');
        sql.push_str(&n.to_string());
    }
}

/// `rows` groups of `width` placeholders, comma separated.
fn values_sql(sql: &mut String, sqlite: bool, rows: usize, width: usize) {
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push(',');
            }
            placeholder(sql, sqlite, r * width + c + 1);
        }
        sql.push(')');
    }
}

/// The streams a message is an entry of, in the order of [`Stored::entries`].
fn message_streams(m: &Message) -> Vec<Stream> {
    match &m.target {
        Target::User(r) if *r == m.sender_id => vec![Stream::Inbox(r.clone())],
        Target::User(r) => vec![Stream::Inbox(r.clone()), Stream::Inbox(m.sender_id.clone())],
        Target::Channel(c) => vec![Stream::Channel(c.clone())],
    }
}

/// Reserves `n` positions in each given stream (`counts` is sorted by
/// stream: two transactions lock the head rows in one order and never
/// deadlock) and returns each stream's first reserved position. The head
/// rows stay locked until the transaction ends, so one stream's positions
/// are committed in order, and a rollback gives them back.
async fn reserve(
    conn: &mut sqlx::AnyConnection,
    sqlite: bool,
    counts: &BTreeMap<String, i64>,
) -> Result<HashMap<String, i64>, StoreError> {
    let rows: Vec<(&String, &i64)> = counts.iter().collect();
    let mut first = HashMap::with_capacity(rows.len());
    for chunk in rows.chunks(STREAMS_PER_STATEMENT) {
        let mut sql = String::with_capacity(120 + chunk.len() * 12);
        sql.push_str("INSERT INTO streams (stream, head) VALUES ");
        values_sql(&mut sql, sqlite, chunk.len(), 2);
        sql.push_str(
            " ON CONFLICT (stream) DO UPDATE SET head = streams.head + excluded.head RETURNING stream, head",
        );
        let mut q = sqlx::query(&sql);
        for (stream, n) in chunk {
            q = q.bind((*stream).clone()).bind(**n);
        }
        for row in q.fetch_all(&mut *conn).await? {
            let stream: String = row.try_get("stream")?;
            let head: i64 = row.try_get("head")?;
            let n = counts.get(&stream).copied().ok_or_else(|| {
                StoreError::Database(sqlx::Error::Protocol(format!(
                    "reserved positions in a stream not asked for: {stream}"
                )))
            })?;
            first.insert(stream, head - n + 1);
        }
    }
    if first.len() != counts.len() {
        return Err(StoreError::Database(sqlx::Error::Protocol(
            "a stream's head was not returned".into(),
        )));
    }
    Ok(first)
}

/// Writes entries: messages' and membership changes' each in multi-row
/// INSERTs of [`ENTRIES_PER_STATEMENT`] (a batch of messages is one
/// statement of 4 values an entry).
async fn insert_entries(
    conn: &mut sqlx::AnyConnection,
    sqlite: bool,
    entries: &[Entry],
) -> Result<(), StoreError> {
    let (messages, changes): (Vec<&Entry>, Vec<&Entry>) = entries
        .iter()
        .partition(|e| matches!(e.body, Body::Message(_)));
    for chunk in messages.chunks(ENTRIES_PER_STATEMENT) {
        let mut sql = String::with_capacity(100 + chunk.len() * 20);
        sql.push_str("INSERT INTO stream_entries (stream, seq, message_id, created_at) VALUES ");
        values_sql(&mut sql, sqlite, chunk.len(), 4);
        let mut q = sqlx::query(&sql);
        for e in chunk {
            if let Body::Message(m) = &e.body {
                q = q
                    .bind(e.stream.key())
                    .bind(e.seq)
                    .bind(m.id.clone())
                    .bind(m.created_at);
            }
        }
        q.execute(&mut *conn).await?;
    }
    for chunk in changes.chunks(ENTRIES_PER_STATEMENT) {
        let mut sql = String::with_capacity(160 + chunk.len() * 40);
        sql.push_str(
            "INSERT INTO stream_entries (stream, seq, channel_id, user_id, change, by_user_id, channel_seq, created_at) VALUES ",
        );
        values_sql(&mut sql, sqlite, chunk.len(), 8);
        let mut q = sqlx::query(&sql);
        for e in chunk {
            if let Body::Membership(c) = &e.body {
                q = q
                    .bind(e.stream.key())
                    .bind(e.seq)
                    .bind(c.channel_id.clone())
                    .bind(c.user_id.clone())
                    .bind(c.change.as_str().to_owned())
                    .bind(c.by_user_id.clone())
                    .bind(c.channel_seq)
                    .bind(c.created_at);
            }
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// An entry with its message, if it is a message's: what [`entry_from_row`]
/// reads.
const ENTRY_SELECT: &str = "SELECT e.stream AS e_stream, e.seq AS e_seq, e.message_id AS e_message_id, \
     e.channel_id AS e_channel_id, e.user_id AS e_user_id, e.change AS e_change, \
     e.by_user_id AS e_by_user_id, e.channel_seq AS e_channel_seq, e.created_at AS e_created_at, \
     m.id AS id, m.sender_id AS sender_id, m.receiver_id AS receiver_id, m.channel_id AS channel_id, \
     m.content AS content, m.client_msg_id AS client_msg_id, m.created_at AS created_at \
     FROM stream_entries e LEFT JOIN messages m ON m.id = e.message_id";

fn entry_from_row(row: &AnyRow) -> Result<Entry, sqlx::Error> {
    let missing = |what: &str| sqlx::Error::Decode(format!("entry row without {what}").into());
    let stream: String = row.try_get("e_stream")?;
    let stream = Stream::parse_key(&stream)
        .ok_or_else(|| sqlx::Error::Decode(format!("not a stream name: {stream:?}").into()))?;
    let seq: i64 = row.try_get("e_seq")?;
    let message_id: Option<String> = row.try_get("e_message_id")?;
    let body = if message_id.is_some() {
        Body::Message(message_from_row(row)?)
    } else {
        let change: Option<String> = row.try_get("e_change")?;
        let change = change
            .as_deref()
            .and_then(Change::parse)
            .ok_or_else(|| missing("a change"))?;
        Body::Membership(Membership {
            channel_id: row
                .try_get::<Option<String>, _>("e_channel_id")?
                .ok_or_else(|| missing("a channel"))?,
            user_id: row
                .try_get::<Option<String>, _>("e_user_id")?
                .ok_or_else(|| missing("a user"))?,
            change,
            by_user_id: row
                .try_get::<Option<String>, _>("e_by_user_id")?
                .ok_or_else(|| missing("by whom"))?,
            created_at: row.try_get("e_created_at")?,
            channel_seq: row
                .try_get::<Option<i64>, _>("e_channel_seq")?
                .ok_or_else(|| missing("a channel position"))?,
        })
    };
    Ok(Entry { stream, seq, body })
}

fn entries_from(rows: &[AnyRow]) -> Result<Vec<Entry>, StoreError> {
    Ok(rows.iter().map(entry_from_row).collect::<Result<_, _>>()?)
}

/// A membership change's two entries: in the channel's stream at
/// `channel_seq`, and its twin in the user's inbox at `inbox_seq`.
fn membership_entries(
    channel: &str,
    user: &str,
    change: Change,
    by: &str,
    now: i64,
    channel_seq: i64,
    inbox_seq: i64,
) -> [Entry; 2] {
    let body = Body::Membership(Membership {
        channel_id: channel.to_owned(),
        user_id: user.to_owned(),
        change,
        by_user_id: by.to_owned(),
        created_at: now,
        channel_seq,
    });
    [
        Entry {
            stream: Stream::Channel(channel.to_owned()),
            seq: channel_seq,
            body: body.clone(),
        },
        Entry {
            stream: Stream::Inbox(user.to_owned()),
            seq: inbox_seq,
            body,
        },
    ]
}

const MESSAGE_COLUMNS: &str =
    "id, sender_id, receiver_id, channel_id, content, client_msg_id, created_at";

fn message_from_row(row: &AnyRow) -> Result<Message, sqlx::Error> {
    let receiver: Option<String> = row.try_get("receiver_id")?;
    let channel: Option<String> = row.try_get("channel_id")?;
    let target = match (receiver, channel) {
        (Some(r), _) => Target::User(r),
        (None, Some(c)) => Target::Channel(c),
        (None, None) => {
            return Err(sqlx::Error::Decode(
                "message row has neither receiver nor channel".into(),
            ))
        }
    };
    Ok(Message {
        id: row.try_get("id")?,
        sender_id: row.try_get("sender_id")?,
        target,
        content: row.try_get("content")?,
        client_msg_id: row.try_get("client_msg_id")?,
        created_at: row.try_get("created_at")?,
    })
}

fn messages_from(rows: &[AnyRow]) -> Result<Vec<Message>, StoreError> {
    Ok(rows
        .iter()
        .map(message_from_row)
        .collect::<Result<_, _>>()?)
}

impl Store {
    /// Connects and applies migrations. A `sqlite:` URL creates its file
    /// (and directory) if missing.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        if !is_sqlite && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(StoreError::Url(url.to_owned()));
        }
        if is_sqlite {
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
            if let Some(dir) = opts.get_filename().parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
                }
            }
        }
        let pool = AnyPoolOptions::new()
            // SQLite allows one writer at a time; a large pool only makes
            // writers wait on the file lock instead of on the pool.
            .max_connections(if is_sqlite {
                max_connections.min(4)
            } else {
                max_connections
            })
            .acquire_timeout(acquire_timeout)
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self {
            pool,
            sqlite: is_sqlite,
            writer: is_sqlite.then(Default::default),
        })
    }

    /// Waits for this process's turn to write a few rows (SQLite only).
    async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.writer {
            Some(w) => Some(w.short().await),
            None => None,
        }
    }

    /// Waits for a turn to write many rows, after every short write that
    /// waits (SQLite only).
    async fn bulk_write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.writer {
            Some(w) => Some(w.bulk().await),
            None => None,
        }
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores a batch and gives each new message its positions, in one
    /// transaction: on PostgreSQL one statement
    /// ([`positioned_insert_sql`]); on SQLite the messages, the reservation
    /// of every position (one statement for every stream the batch
    /// touches) and the entries. Returns, in input order, the one stored
    /// message for each input with its entries. Idempotent: a message whose
    /// id or `(sender, clientMsgId)` is already stored is not stored again
    /// and gets no position; its stored version and its entries are returned
    /// with the [`Outcome`] that says which (two extra queries per such
    /// duplicate, which only retries and redeliveries cause). Positions
    /// follow the batch's order within each stream.
    pub async fn insert_messages(&self, messages: &[Message]) -> Result<Vec<Stored>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let entries = if self.sqlite {
            self.store_new_in_steps(messages).await?
        } else {
            self.store_new_in_one_statement(messages).await?
        };
        let new: Vec<bool> = entries.iter().map(|e| !e.is_empty()).collect();

        let mut out = Vec::with_capacity(messages.len());
        for ((m, is_new), entries) in messages.iter().zip(new).zip(entries) {
            if is_new {
                out.push(Stored {
                    message: m.clone(),
                    outcome: Outcome::New,
                    entries,
                });
                continue;
            }
            let existing = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1 OR (sender_id = $2 AND client_msg_id = $3) ORDER BY id LIMIT 1"
            ))
            .bind(m.id.clone())
            .bind(m.sender_id.clone())
            .bind(m.client_msg_id.clone())
            .fetch_optional(&self.pool)
            .await?;
            let row = existing.ok_or_else(|| {
                StoreError::Database(sqlx::Error::Protocol(format!(
                    "message {} conflicted on insert but no stored row matches it",
                    m.id
                )))
            })?;
            let message = message_from_row(&row)?;
            let outcome = if message.id == m.id {
                Outcome::Redelivered
            } else {
                Outcome::Retry
            };
            let entries = self.message_entries(&message).await?;
            out.push(Stored {
                message,
                outcome,
                entries,
            });
        }
        Ok(out)
    }

    /// Stores the messages not stored yet and gives them positions, in one
    /// statement ([`positioned_insert_sql`]). Returns each input's entries,
    /// in input order: none for a message stored before.
    async fn store_new_in_one_statement(
        &self,
        messages: &[Message],
    ) -> Result<Vec<Vec<Entry>>, StoreError> {
        let wants: Vec<(i64, Stream)> = messages
            .iter()
            .enumerate()
            .flat_map(|(i, m)| message_streams(m).into_iter().map(move |s| (i as i64, s)))
            .collect();
        let sql = positioned_insert_sql(messages.len(), wants.len());
        let mut q = sqlx::query(&sql);
        for (i, m) in messages.iter().enumerate() {
            q = bind_message(q.bind(i as i64), m);
        }
        for (i, stream) in &wants {
            q = q.bind(*i).bind(stream.key());
        }
        let mut seqs: HashMap<(String, String), i64> = HashMap::with_capacity(wants.len());
        for row in q.fetch_all(&self.pool).await? {
            let stream: String = row.try_get("stream")?;
            let message: String = row.try_get("message_id")?;
            seqs.insert((message, stream), row.try_get("seq")?);
        }
        let mut seen = HashSet::with_capacity(messages.len());
        let mut entries = Vec::with_capacity(messages.len());
        for m in messages {
            // An id given twice is new at its first place only.
            if !seen.insert(m.id.as_str()) {
                entries.push(Vec::new());
                continue;
            }
            let mine: Vec<Entry> = message_streams(m)
                .into_iter()
                .filter_map(|stream| {
                    seqs.remove(&(m.id.clone(), stream.key())).map(|seq| Entry {
                        stream,
                        seq,
                        body: Body::Message(m.clone()),
                    })
                })
                .collect();
            entries.push(mine);
        }
        if !seqs.is_empty() {
            return Err(StoreError::Database(sqlx::Error::Protocol(
                "the positioned insert returned an entry not asked for".into(),
            )));
        }
        Ok(entries)
    }

    /// As [`Store::store_new_in_one_statement`], in a transaction of
    /// steps: the messages, the reservation of their positions, the entries.
    /// For SQLite, whose one writer makes the steps' round trips in-process
    /// and uncontended, and which has no data-modifying `WITH`.
    async fn store_new_in_steps(
        &self,
        messages: &[Message],
    ) -> Result<Vec<Vec<Entry>>, StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        let sql = insert_sql(messages.len());
        let mut q = sqlx::query(&sql);
        for m in messages {
            q = bind_message(q, m);
        }
        let mut inserted: HashSet<String> = q
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        // The new ones, in batch order (an id given twice is new once).
        let new: Vec<bool> = messages.iter().map(|m| inserted.remove(&m.id)).collect();
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for (m, _) in messages.iter().zip(&new).filter(|(_, n)| **n) {
            for s in message_streams(m) {
                *counts.entry(s.key()).or_default() += 1;
            }
        }
        let mut entries: Vec<Vec<Entry>> = vec![Vec::new(); messages.len()];
        if !counts.is_empty() {
            let mut next = reserve(&mut tx, self.sqlite, &counts).await?;
            for ((m, is_new), out) in messages.iter().zip(&new).zip(&mut entries) {
                if !*is_new {
                    continue;
                }
                for stream in message_streams(m) {
                    let seq = next.get_mut(&stream.key()).ok_or_else(|| {
                        StoreError::Database(sqlx::Error::Protocol(format!(
                            "no position reserved in {stream}"
                        )))
                    })?;
                    out.push(Entry {
                        stream,
                        seq: *seq,
                        body: Body::Message(m.clone()),
                    });
                    *seq += 1;
                }
            }
            let all: Vec<Entry> = entries.iter().flatten().cloned().collect();
            insert_entries(&mut tx, self.sqlite, &all).await?;
        }
        tx.commit().await?;
        Ok(entries)
    }

    /// A stored message's entries, in the order of [`Stored::entries`].
    async fn message_entries(&self, message: &Message) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query("SELECT stream, seq FROM stream_entries WHERE message_id = $1")
            .bind(message.id.clone())
            .fetch_all(&self.pool)
            .await?;
        let mut found: HashMap<String, i64> = HashMap::with_capacity(rows.len());
        for r in &rows {
            found.insert(r.try_get("stream")?, r.try_get("seq")?);
        }
        Ok(message_streams(message)
            .into_iter()
            .filter_map(|stream| {
                found.get(&stream.key()).map(|seq| Entry {
                    seq: *seq,
                    stream,
                    body: Body::Message(message.clone()),
                })
            })
            .collect())
    }

    /// Inserts a made-up message in a transaction and rolls it back: whether
    /// the database takes a message now. When a message fails alone, this
    /// tells a message the database refuses (the probe passes) from a
    /// database that refuses everything (the probe fails too).
    pub async fn probe_insert(&self) -> Result<(), StoreError> {
        let probe = Message {
            id: uuid::Uuid::now_v7().to_string(),
            sender_id: "fanout-probe".into(),
            target: Target::User("fanout-probe".into()),
            content: "probe".into(),
            client_msg_id: None,
            created_at: 0,
        };
        let sql = insert_sql(1);
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        bind_message(sqlx::query(&sql), &probe)
            .fetch_all(&mut *tx)
            .await?;
        tx.rollback().await?;
        Ok(())
    }

    /// The message `sender` sent with `client_msg_id`, if stored.
    pub async fn find_by_client_msg_id(
        &self,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = $1 AND client_msg_id = $2"
        ))
        .bind(sender.to_owned())
        .bind(client_msg_id.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(message_from_row(&r)?),
            None => None,
        })
    }

    /// Creates a channel with the creator and `members`: one "added" entry
    /// per member in the channel's stream, the creator first (seq 1, by the
    /// creator), then the others sorted (duplicates and the creator among
    /// `members` once); and each member's inbox twin. Returns every entry
    /// written, for each member the channel entry then its inbox twin.
    /// `Conflict` if the id is taken. One transaction of a few statements
    /// whatever the number of members: the channel row, the reservation,
    /// the members, the entries (each chunked only beyond
    /// [`MEMBERS_PER_STATEMENT`] members or 1,500 entries' pairs).
    pub async fn create_channel(
        &self,
        id: &str,
        name: &str,
        creator: &str,
        members: &[String],
        now: i64,
    ) -> Result<Vec<Entry>, StoreError> {
        let _turn = self.bulk_write_turn().await;
        let mut tx = self.pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO channels (id, name, creator_id, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(id.to_owned())
        .bind(name.to_owned())
        .bind(creator.to_owned())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if created.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        let mut others: Vec<&str> = members
            .iter()
            .map(String::as_str)
            .filter(|m| *m != creator)
            .collect();
        others.sort_unstable();
        others.dedup();
        let all: Vec<&str> = std::iter::once(creator).chain(others).collect();

        let channel_key = Stream::Channel(id.to_owned()).key();
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        counts.insert(channel_key.clone(), all.len() as i64);
        for u in &all {
            counts.insert(Stream::Inbox((*u).to_owned()).key(), 1);
        }
        let first = reserve(&mut tx, self.sqlite, &counts).await?;
        let channel_first = first[&channel_key];
        let mut entries = Vec::with_capacity(all.len() * 2);
        for (i, u) in all.iter().enumerate() {
            let inbox_seq = first[&Stream::Inbox((*u).to_owned()).key()];
            entries.extend(membership_entries(
                id,
                u,
                Change::Added,
                creator,
                now,
                channel_first + i as i64,
                inbox_seq,
            ));
        }

        for chunk in entries.chunks(2 * MEMBERS_PER_STATEMENT) {
            let rows = chunk.len() / 2;
            let mut sql = String::with_capacity(120 + rows * 24);
            sql.push_str(
                "INSERT INTO channel_members (channel_id, user_id, added_at, joined_seq, inbox_seq) VALUES ",
            );
            for i in 0..rows {
                if i > 0 {
                    sql.push(',');
                }
                if self.sqlite {
                    sql.push_str("(?,?,?,?,?)");
                } else {
                    // The channel and the time are shared by every row.
                    let b = 3 + i * 3;
                    sql.push_str(&format!("($1,${b},$2,${},${})", b + 1, b + 2));
                }
            }
            let mut q = sqlx::query(&sql);
            if !self.sqlite {
                q = q.bind(id.to_owned()).bind(now);
            }
            for pair in chunk.chunks(2) {
                let (user, joined) = match pair[0].membership() {
                    Some(c) => (c.user_id.clone(), c.channel_seq),
                    None => continue,
                };
                if self.sqlite {
                    q = q.bind(id.to_owned()).bind(user).bind(now);
                } else {
                    q = q.bind(user);
                }
                q = q.bind(joined).bind(pair[1].seq);
            }
            q.execute(&mut *tx).await?;
        }
        insert_entries(&mut tx, self.sqlite, &entries).await?;
        tx.commit().await?;
        Ok(entries)
    }

    /// A channel by id.
    pub async fn channel(&self, id: &str) -> Result<Option<Channel>, StoreError> {
        let row = sqlx::query("SELECT id, name, creator_id FROM channels WHERE id = $1")
            .bind(id.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => None,
            Some(r) => Some(Channel {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                creator_id: r.try_get("creator_id")?,
            }),
        })
    }

    /// When `user` joined `channel`, if they are a member.
    pub async fn member_since(&self, channel: &str, user: &str) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "SELECT added_at FROM channel_members WHERE channel_id = $1 AND user_id = $2",
        )
        .bind(channel.to_owned())
        .bind(user.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("added_at")?),
            None => None,
        })
    }

    /// Adds `user` (by `by`): the membership, an "added" entry in the
    /// channel's stream and its twin in the user's inbox, in one
    /// transaction; returns `(true, [channel entry, inbox twin])`. If
    /// `user` is already a member nothing is written: `(false, the two
    /// entries that added them)`, read back (empty for a membership from
    /// before positions existed).
    pub async fn add_member(
        &self,
        channel: &str,
        user: &str,
        by: &str,
        now: i64,
    ) -> Result<(bool, Vec<Entry>), StoreError> {
        let turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        let added = sqlx::query(
            "INSERT INTO channel_members (channel_id, user_id, added_at, joined_seq, inbox_seq) VALUES ($1, $2, $3, 0, 0) ON CONFLICT DO NOTHING",
        )
        .bind(channel.to_owned())
        .bind(user.to_owned())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if added.rows_affected() == 0 {
            tx.rollback().await?;
            drop(turn);
            return Ok((false, self.joining_entries(channel, user).await?));
        }
        let entries = self
            .write_membership(&mut tx, channel, user, Change::Added, by, now)
            .await?;
        sqlx::query(
            "UPDATE channel_members SET joined_seq = $1, inbox_seq = $2 WHERE channel_id = $3 AND user_id = $4",
        )
        .bind(entries[0].seq)
        .bind(entries[1].seq)
        .bind(channel.to_owned())
        .bind(user.to_owned())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((true, entries))
    }

    /// The two entries that added a current member (empty if they are not
    /// one, or joined before positions existed).
    async fn joining_entries(&self, channel: &str, user: &str) -> Result<Vec<Entry>, StoreError> {
        let row = sqlx::query(
            "SELECT joined_seq, inbox_seq FROM channel_members WHERE channel_id = $1 AND user_id = $2",
        )
        .bind(channel.to_owned())
        .bind(user.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Vec::new());
        };
        let (joined, inbox): (i64, i64) = (row.try_get("joined_seq")?, row.try_get("inbox_seq")?);
        if joined == 0 {
            return Ok(Vec::new());
        }
        let channel_key = Stream::Channel(channel.to_owned()).key();
        let rows = sqlx::query(&format!(
            "{ENTRY_SELECT} WHERE (e.stream = $1 AND e.seq = $2) OR (e.stream = $3 AND e.seq = $4)"
        ))
        .bind(channel_key.clone())
        .bind(joined)
        .bind(Stream::Inbox(user.to_owned()).key())
        .bind(inbox)
        .fetch_all(&self.pool)
        .await?;
        let mut entries = entries_from(&rows)?;
        // The channel's entry first.
        entries.sort_by_key(|e| e.stream.channel().is_none());
        Ok(entries)
    }

    /// Reserves a position in the channel's stream and one in the user's
    /// inbox and writes the change there: `[channel entry, inbox twin]`.
    async fn write_membership(
        &self,
        conn: &mut sqlx::AnyConnection,
        channel: &str,
        user: &str,
        change: Change,
        by: &str,
        now: i64,
    ) -> Result<Vec<Entry>, StoreError> {
        let channel_key = Stream::Channel(channel.to_owned()).key();
        let inbox_key = Stream::Inbox(user.to_owned()).key();
        let counts: BTreeMap<String, i64> =
            [(channel_key.clone(), 1), (inbox_key.clone(), 1)].into();
        let first = reserve(&mut *conn, self.sqlite, &counts).await?;
        let entries = membership_entries(
            channel,
            user,
            change,
            by,
            now,
            first[&channel_key],
            first[&inbox_key],
        );
        insert_entries(&mut *conn, self.sqlite, &entries).await?;
        Ok(entries.to_vec())
    }

    /// Removes `user` (by `by`): deletes the membership and writes a
    /// "removed" entry in the channel's stream and its twin in the user's
    /// inbox, in one transaction; returns them, the channel's first.
    /// `None` (nothing written) if they were not a member.
    pub async fn remove_member(
        &self,
        channel: &str,
        user: &str,
        by: &str,
        now: i64,
    ) -> Result<Option<Vec<Entry>>, StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("DELETE FROM channel_members WHERE channel_id = $1 AND user_id = $2")
            .bind(channel.to_owned())
            .bind(user.to_owned())
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        let entries = self
            .write_membership(&mut tx, channel, user, Change::Removed, by, now)
            .await?;
        tx.commit().await?;
        Ok(Some(entries))
    }

    /// The channels `user` belongs to, ordered by channel id, with where
    /// each membership starts.
    pub async fn memberships(&self, user: &str) -> Result<Vec<MemberOf>, StoreError> {
        let rows = sqlx::query(
            "SELECT channel_id, joined_seq, inbox_seq FROM channel_members WHERE user_id = $1 ORDER BY channel_id",
        )
        .bind(user.to_owned())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok(MemberOf {
                    channel_id: r.try_get("channel_id")?,
                    joined_seq: r.try_get("joined_seq")?,
                    inbox_seq: r.try_get("inbox_seq")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?)
    }

    /// The channels `user` belongs to, with when each membership started.
    pub async fn memberships_of(&self, user: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT channel_id, added_at FROM channel_members WHERE user_id = $1 ORDER BY channel_id",
        )
        .bind(user.to_owned())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.try_get("channel_id")?, r.try_get("added_at")?)))
            .collect::<Result<_, sqlx::Error>>()?)
    }

    /// The channels `user` belongs to.
    pub async fn channels_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT channel_id FROM channel_members WHERE user_id = $1 ORDER BY channel_id",
        )
        .bind(user.to_owned())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get("channel_id"))
            .collect::<Result<_, _>>()?)
    }

    /// Entries of `stream` after position `after`, ascending, at most
    /// `limit`; a message's entry carries the stored message (one query).
    pub async fn entries_after(
        &self,
        stream: &Stream,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query(&format!(
            "{ENTRY_SELECT} WHERE e.stream = $1 AND e.seq > $2 ORDER BY e.seq ASC LIMIT $3"
        ))
        .bind(stream.key())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        entries_from(&rows)
    }

    /// Each given stream's head: its last position, 0 for a stream with no
    /// entry (one query).
    pub async fn heads(&self, streams: &[Stream]) -> Result<HashMap<Stream, i64>, StoreError> {
        let mut heads: HashMap<Stream, i64> = streams.iter().map(|s| (s.clone(), 0)).collect();
        if streams.is_empty() {
            return Ok(heads);
        }
        let mut sql = String::from("SELECT stream, head FROM streams WHERE stream IN (");
        for i in 0..streams.len() {
            if i > 0 {
                sql.push(',');
            }
            placeholder(&mut sql, self.sqlite, i + 1);
        }
        sql.push(')');
        let mut q = sqlx::query(&sql);
        for s in streams {
            q = q.bind(s.key());
        }
        for row in q.fetch_all(&self.pool).await? {
            let name: String = row.try_get("stream")?;
            if let Some(s) = Stream::parse_key(&name) {
                heads.insert(s, row.try_get("head")?);
            }
        }
        Ok(heads)
    }

    /// The position of the first "removed" entry of `user` in `channel`'s
    /// stream after `after`, if any: where the resume of a channel the user
    /// was removed from ends.
    pub async fn removal_after(
        &self,
        channel: &str,
        user: &str,
        after: i64,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "SELECT seq FROM stream_entries WHERE stream = $1 AND seq > $2 AND user_id = $3 AND change = 'removed' ORDER BY seq ASC LIMIT 1",
        )
        .bind(Stream::Channel(channel.to_owned()).key())
        .bind(after)
        .bind(user.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("seq")?),
            None => None,
        })
    }

    /// One page of a channel's messages, newest first (by message id),
    /// strictly older than `before` if given, as entries of the channel's
    /// stream.
    pub async fn channel_history(
        &self,
        channel: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        self.history_of(
            &Stream::Channel(channel.to_owned()),
            &OrderingKey::channel(channel),
            before,
            limit,
        )
        .await
    }

    /// One page of the personal conversation of `caller` and `other`,
    /// newest first (by message id), strictly older than `before` if given,
    /// as entries of the CALLER's inbox.
    pub async fn personal_history(
        &self,
        caller: &str,
        other: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        self.history_of(
            &Stream::Inbox(caller.to_owned()),
            &OrderingKey::direct(caller, other),
            before,
            limit,
        )
        .await
    }

    async fn history_of(
        &self,
        stream: &Stream,
        conversation: &OrderingKey,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        let rows = match before {
            Some(b) => {
                sqlx::query(&format!(
                    "{ENTRY_SELECT} WHERE e.stream = $1 AND m.conversation = $2 AND m.id < $3 ORDER BY m.id DESC LIMIT $4"
                ))
                .bind(stream.key())
                .bind(conversation.as_str().to_owned())
                .bind(b.to_owned())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "{ENTRY_SELECT} WHERE e.stream = $1 AND m.conversation = $2 ORDER BY m.id DESC LIMIT $3"
                ))
                .bind(stream.key())
                .bind(conversation.as_str().to_owned())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        entries_from(&rows)
    }

    /// A conversation's messages created at or after `since` (ms), oldest
    /// first: the catch-up of a newly added member.
    pub async fn messages_since(
        &self,
        conversation: &str,
        since: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation = $1 AND created_at >= $2 ORDER BY id ASC LIMIT $3"
        ))
        .bind(conversation.to_owned())
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        messages_from(&rows)
    }

    /// Personal messages to or from `user` created at `since` or later,
    /// oldest first, at most `limit` (a gateway's catch-up after it lost
    /// its routes).
    pub async fn personal_messages_since(
        &self,
        user: &str,
        since: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        // Two indexed halves rather than one OR, which neither index serves.
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE receiver_id = $1 AND created_at >= $2 \
             UNION \
             SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = $3 AND receiver_id IS NOT NULL AND created_at >= $4 \
             ORDER BY id ASC LIMIT $5"
        ))
        .bind(user.to_owned())
        .bind(since)
        .bind(user.to_owned())
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        messages_from(&rows)
    }

    /// How many messages are stored (tests and operators).
    pub async fn count_messages(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM messages")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rolled_back_reservation_leaves_no_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}?mode=rwc", dir.path().join("r.db").display());
        let store = Store::connect(&url, 2, Duration::from_secs(5))
            .await
            .expect("connect");
        let counts: BTreeMap<String, i64> = [("inbox:bob".to_owned(), 3)].into();
        {
            let mut tx = store.pool.begin().await.expect("begin");
            let first = reserve(&mut tx, store.sqlite, &counts)
                .await
                .expect("reserve");
            assert_eq!(first["inbox:bob"], 1);
            // Dropped without a commit: a crash between the reservation
            // and the commit.
        }
        let m = Message {
            id: uuid::Uuid::now_v7().to_string(),
            sender_id: "alice".into(),
            target: Target::User("bob".into()),
            content: "hi".into(),
            client_msg_id: None,
            created_at: 0,
        };
        let out = store.insert_messages(&[m]).await.expect("insert");
        assert_eq!(
            out[0]
                .entries
                .iter()
                .map(|e| (e.stream.key(), e.seq))
                .collect::<Vec<_>>(),
            [("inbox:bob".to_owned(), 1), ("inbox:alice".to_owned(), 1)],
            "the positions the rollback gave back"
        );
        store.close().await;
    }
}
