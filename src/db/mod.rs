//! PostgreSQL: the platform's data (read only) and the trainer's own tables (schema
//! `audotics_trainer`, created by migrations at start-up).
//!
//! - [`connect`] opens a pool and fails with one clear message when the server is unreachable.
//! - [`migrate`] creates the trainer's schema and runs `migrations/` under advisory locks, so any
//!   number of workers may start at once.
//! - [`load`] streams the platform's tables with binary COPY into the compact [`crate::data`] form.
//! - [`ledger`] records every training run; [`platform`] holds the platform's DDL for `seed`.
//! - [`prune`] keeps the worker's state tables to a horizon.

pub mod coord;
pub mod copy_binary;
pub mod ledger;
pub mod load;
pub mod platform;
pub mod prune;

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// The trainer's own schema. Nothing of the trainer's is ever created elsewhere.
pub const SCHEMA: &str = "audotics_trainer";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a connection pool to `url`. The error names the (redacted) URL and the cause.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse().with_context(|| format!("invalid database URL {}", redact_url(url)))?;
    let options = options.application_name("audotics-trainer").log_statements(tracing::log::LevelFilter::Debug);
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to the database at {}", redact_url(url)))
}

/// Creates the trainer's schema and applies pending migrations. Safe to run from many processes at
/// once: schema creation is serialised by an advisory lock (concurrent `CREATE SCHEMA IF NOT EXISTS`
/// can still fail on the catalogue's unique index), and sqlx's migrator takes its own lock.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await.context("cannot get a database connection for migrations")?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('audotics_trainer.schema'))").execute(&mut *tx).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))).execute(&mut *tx).await?;
    tx.commit().await?;
    // The migrator's bookkeeping table goes where the search path points: our schema, not the
    // platform's. A one-connection pool with that search path keeps the setting off the shared pool
    // (and, unlike running on a `&mut PgConnection`, keeps callers' futures `Send` for any lifetime,
    // which spawned tasks need: rust-lang/rust#100013).
    let options = (*pool.connect_options()).clone().options([("search_path", SCHEMA)]);
    let migrations_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("cannot open a connection for migrations")?;
    let result = MIGRATOR.run(&migrations_pool).await.context("database migrations failed");
    migrations_pool.close().await;
    result
}

/// `url` with any password replaced by `***`, for logs, errors and stored settings.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<unparseable URL>".to_string();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    // libpq and sqlx also take secrets as query parameters (`?password=`, `sslpassword=`, …).
    if parsed.query_pairs().any(|(k, _)| is_secret_parameter(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_parameter(&k) { "***".to_string() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "passwd", "secret", "token", "credential"].iter().any(|s| name.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_passwords_even_with_special_characters() {
        assert_eq!(redact_url("postgres://app:s3cr%3At@db:5432/audotics"), "postgres://app:***@db:5432/audotics");
        assert_eq!(redact_url("postgres://postgres@127.0.0.1/test"), "postgres://postgres@127.0.0.1/test");
        assert_eq!(redact_url("not a url with secret"), "<unparseable URL>");
        assert_eq!(
            redact_url("postgres://app@db/audotics?sslmode=require&password=hunter2&sslpassword=k3y"),
            "postgres://app@db/audotics?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("amqp://u@h/%2f?auth_token=abc&heartbeat=10"),
            "amqp://u@h/%2f?auth_token=***&heartbeat=10"
        );
    }
}
