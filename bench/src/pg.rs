//! A PostgreSQL database of its own for one benchmark or fault run, so no
//! run reads what an earlier one left behind.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

/// Why the database could not be made.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL at {url}: {source} (is it running? set --postgres-url or FANOUT_BENCH_POSTGRES_URL)")]
pub struct PgError {
    url: String,
    source: sqlx::Error,
}

/// A database created for one run; [`TempDatabase::drop_db`] removes it.
#[derive(Debug)]
pub struct TempDatabase {
    /// URL of the new database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TempDatabase {
    /// Creates `{prefix}_{random}` through the server-level `admin_url`
    /// (`postgres://user@host:port/postgres`).
    pub async fn create(admin_url: &str, prefix: &str) -> Result<TempDatabase, PgError> {
        let err = |source| PgError {
            url: admin_url.to_owned(),
            source,
        };
        let mut conn =
            tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(admin_url))
                .await
                .map_err(|_| err(sqlx::Error::PoolTimedOut))?
                .map_err(err)?;
        // The prefix comes from our own code; the suffix is hex.
        let name = format!(
            "{prefix}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .map_err(err)?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(b, _)| b)
            .to_owned();
        Ok(TempDatabase {
            url: format!("{base}/{name}"),
            name,
            admin_url: admin_url.to_owned(),
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets `default_transaction_read_only` on the database (or resets it)
    /// and terminates every session on it, as a failover to a read-only
    /// node (or back) does to its clients: the sessions opened next get the
    /// new default.
    pub async fn set_read_only(&self, read_only: bool) -> Result<(), PgError> {
        let err = |source| PgError {
            url: self.admin_url.clone(),
            source,
        };
        let mut conn = PgConnection::connect(&self.admin_url).await.map_err(err)?;
        let setting = if read_only { "on" } else { "off" };
        sqlx::query(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = {setting}",
            self.name
        ))
        .execute(&mut conn)
        .await
        .map_err(err)?;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .execute(&mut conn)
        .await
        .map_err(err)?;
        Ok(())
    }

    /// Drops the database, closing any connection still open to it.
    pub async fn drop_db(self) {
        match PgConnection::connect(&self.admin_url).await {
            Ok(mut conn) => {
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                    tracing::warn!(database = %self.name, error = %e, "cannot drop the run's database");
                }
            }
            Err(e) => {
                tracing::warn!(database = %self.name, error = %e, "cannot drop the run's database")
            }
        }
    }
}
