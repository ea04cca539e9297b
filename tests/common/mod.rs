//! Shared by the integration tests: finding the real services on this
//! machine, and skipping loudly (or failing, under CI) when they are absent.
#![allow(dead_code)]

use std::time::Duration;

pub mod cluster;

use sqlx::{Connection, PgConnection};

/// Set by `.ci/run`: an unreachable service is then a failure, never a skip.
pub const REQUIRE_ENV: &str = "FANOUT_TEST_REQUIRE_SERVICES";

/// Whether this run must have every service.
pub fn services_required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1" || v == "true")
}

/// Skips the calling test with a loud line, or panics when services are
/// required.
pub fn skip_or_fail(service: &str, why: &str) {
    if services_required() {
        panic!("{service} is required ({REQUIRE_ENV}=1) but unreachable: {why}");
    }
    eprintln!("\n*** SKIPPED: {service} unreachable ({why}); set {REQUIRE_ENV}=1 to make this a failure ***\n");
}

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
