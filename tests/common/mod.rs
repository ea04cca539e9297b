//! Shared by the integration tests: finding the real services on this
//! machine, and skipping loudly (or failing, under CI) when they are absent.
#![allow(dead_code)]

use std::time::Duration;

pub mod cluster;

use sqlx::{Connection, PgConnection};

/// The same rule as every backend's tests: skip loudly, or fail under CI
/// (`FANOUT_TEST_REQUIRE_SERVICES=1`).
pub use fanout_backend::conformance::skip_or_fail;

/// One `#[tokio::test]` per listed backend, each named as given and
/// running `$check(BackendKind::<kind>)`: a suite over several backends
/// keeps one test per backend, so a failure names the broker.
#[allow(unused_macros)]
macro_rules! backend_tests {
    ($check:ident { $($name:ident: $kind:ident),+ $(,)? }) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $check(fanout::config::BackendKind::$kind).await;
            }
        )+
    };
}
#[allow(unused_imports)]
pub(crate) use backend_tests;

/// The server-level PostgreSQL URL tests create their databases from.
pub fn postgres_admin_url() -> String {
    std::env::var("FANOUT_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A PostgreSQL database of its own for one test; dropped by [`TestDb::drop_db`].
#[derive(Debug)]
pub struct TestDb {
    /// URL of the new database.
    pub url: String,
    name: String,
}

impl TestDb {
    /// Creates a fresh database, or `None` (after [`skip_or_fail`]) when
    /// PostgreSQL is unreachable.
    pub async fn create() -> Option<TestDb> {
        let admin = postgres_admin_url();
        let mut conn =
            match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&admin)).await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    skip_or_fail("PostgreSQL", &e.to_string());
                    return None;
                }
                Err(_) => {
                    skip_or_fail("PostgreSQL", "connect timed out");
                    return None;
                }
            };
        let name = format!("fanout_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap_or(admin.clone());
        Some(TestDb {
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// Drops the database (best effort).
    pub async fn drop_db(self) {
        if let Ok(mut conn) = PgConnection::connect(&postgres_admin_url()).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}
