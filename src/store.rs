//! Persistence through sqlx: one schema (`migrations/`) and one code path
//! for SQLite (the embedded default) and PostgreSQL, via sqlx's `Any`
//! driver. The schema sticks to portable types (TEXT, BIGINT) so that no
//! query needs a per-database variant.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::DatabaseError as _;
use sqlx::{AnyPool, Row};

use crate::protocol::{Message, Target};

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

/// Members written by one INSERT at channel creation.
pub const MEMBERS_PER_STATEMENT: usize = 10_000;

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

    /// Stores a batch in one round trip and returns, in input order, the
    /// one stored message for each input. Idempotent: a message whose id
    /// or `(sender, clientMsgId)` is already stored is not stored again;
    /// its stored version is returned with the [`Outcome`] that says which (one extra query
    /// per such duplicate, which only retries and redeliveries cause).
    pub async fn insert_messages(&self, messages: &[Message]) -> Result<Vec<Stored>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let _turn = self.write_turn().await;
        let sql = insert_sql(messages.len());
        let mut q = sqlx::query(&sql);
        for m in messages {
            q = bind_message(q, m);
        }
        let inserted: std::collections::HashSet<String> = q
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;

        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            if inserted.contains(&m.id) {
                out.push(Stored {
                    message: m.clone(),
                    outcome: Outcome::New,
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
            out.push(Stored { message, outcome });
        }
        Ok(out)
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

    /// Creates a channel with its creator and `members` as members, all
    /// from `now`. `Conflict` if the id is taken. Two statements in one
    /// transaction, whatever the number of members: the channel row, then
    /// every member in one multi-row INSERT (chunked only beyond
    /// [`MEMBERS_PER_STATEMENT`], far above `limits.max_initial_members`'
    /// default).
    pub async fn create_channel_old(
        &self,
        id: &str,
        name: &str,
        creator: &str,
        members: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
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
        let mut all: Vec<&str> = members.iter().map(String::as_str).collect();
        all.push(creator);
        all.sort_unstable();
        all.dedup();
        for chunk in all.chunks(MEMBERS_PER_STATEMENT) {
            // At most 3 values a row: 30,000, under SQLite's 32,766 and
            // PostgreSQL's 65,535.
            let mut sql = String::with_capacity(80 + chunk.len() * 16);
            sql.push_str("INSERT INTO channel_members (channel_id, user_id, added_at) VALUES ");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                if self.sqlite {
                    sql.push_str("(?,?,?)");
                } else {
                    // The channel and the time are shared by every row.
                    sql.push_str(&format!("($1,${},$2)", i + 3));
                }
            }
            sql.push_str(" ON CONFLICT DO NOTHING");
            let mut q = sqlx::query(&sql);
            if self.sqlite {
                for user in chunk {
                    q = q.bind(id.to_owned()).bind((*user).to_owned()).bind(now);
                }
            } else {
                q = q.bind(id.to_owned()).bind(now);
                for user in chunk {
                    q = q.bind((*user).to_owned());
                }
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
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

    /// Adds a member; `false` if they already were one.
    pub async fn add_member_old(
        &self,
        channel: &str,
        user: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let r = sqlx::query(
            "INSERT INTO channel_members (channel_id, user_id, added_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(channel.to_owned())
        .bind(user.to_owned())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Adds a member unless they already are one, in one statement, and
    /// returns when their membership started (now, or when they were first
    /// added): what their gateways' catch-up starts from.
    pub async fn add_member_since(
        &self,
        channel: &str,
        user: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        let _turn = self.write_turn().await;
        // The no-op update makes RETURNING yield the existing row too.
        let row = sqlx::query(
            "INSERT INTO channel_members (channel_id, user_id, added_at) VALUES ($1, $2, $3) \
             ON CONFLICT (channel_id, user_id) DO UPDATE SET added_at = channel_members.added_at \
             RETURNING added_at",
        )
        .bind(channel.to_owned())
        .bind(user.to_owned())
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("added_at")?)
    }

    /// Removes a member; `false` if they were not one.
    pub async fn remove_member_old(&self, channel: &str, user: &str) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let r = sqlx::query("DELETE FROM channel_members WHERE channel_id = $1 AND user_id = $2")
            .bind(channel.to_owned())
            .bind(user.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
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

    /// One page of a conversation's history (an ordering key's text),
    /// newest first, strictly older than `before` if given.
    pub async fn history(
        &self,
        conversation: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = match before {
            Some(b) => {
                sqlx::query(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
                ))
                .bind(conversation.to_owned())
                .bind(b.to_owned())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation = $1 ORDER BY id DESC LIMIT $2"
                ))
                .bind(conversation.to_owned())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        messages_from(&rows)
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

    // ---- STUB: replaced by the store branch ----
    /// stub
    pub async fn memberships(&self, _user: &str) -> Result<Vec<MemberOf>, StoreError> {
        Ok(Vec::new())
    }
    /// stub
    pub async fn create_channel(
        &self,
        _id: &str,
        _name: &str,
        _creator: &str,
        _members: &[String],
        _now: i64,
    ) -> Result<Vec<crate::stream::Entry>, StoreError> {
        Ok(Vec::new())
    }
    /// stub
    pub async fn add_member(
        &self,
        _channel: &str,
        _user: &str,
        _by: &str,
        _now: i64,
    ) -> Result<(bool, Vec<crate::stream::Entry>), StoreError> {
        Ok((false, Vec::new()))
    }
    /// stub
    pub async fn remove_member(
        &self,
        _channel: &str,
        _user: &str,
        _by: &str,
        _now: i64,
    ) -> Result<Option<Vec<crate::stream::Entry>>, StoreError> {
        Ok(None)
    }
    /// stub
    pub async fn entries_after(
        &self,
        _stream: &crate::stream::Stream,
        _after: i64,
        _limit: u32,
    ) -> Result<Vec<crate::stream::Entry>, StoreError> {
        Ok(Vec::new())
    }
    /// stub
    pub async fn heads(
        &self,
        _streams: &[crate::stream::Stream],
    ) -> Result<std::collections::HashMap<crate::stream::Stream, i64>, StoreError> {
        Ok(Default::default())
    }
    /// stub
    pub async fn removal_after(
        &self,
        _channel: &str,
        _user: &str,
        _after: i64,
    ) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }
    /// stub
    pub async fn channel_history(
        &self,
        _channel: &str,
        _before: Option<&str>,
        _limit: u32,
    ) -> Result<Vec<crate::stream::Entry>, StoreError> {
        Ok(Vec::new())
    }
    /// stub
    pub async fn personal_history(
        &self,
        _caller: &str,
        _other: &str,
        _before: Option<&str>,
        _limit: u32,
    ) -> Result<Vec<crate::stream::Entry>, StoreError> {
        Ok(Vec::new())
    }
}

/// stub
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberOf {
    pub channel_id: String,
    pub joined_seq: i64,
    pub inbox_seq: i64,
}
