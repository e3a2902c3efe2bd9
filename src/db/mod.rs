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
pub mod seed;

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// The trainer's own schema. Nothing of the trainer's is ever created elsewhere.
pub const SCHEMA: &str = "audotics_trainer";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a connection pool to `url`. The error names the (redacted) URL and the cause.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions =
        url.parse().with_context(|| format!("invalid database URL {}", crate::system::telemetry::redact_url(url)))?;
    let options = options.application_name("audotics-trainer").log_statements(tracing::log::LevelFilter::Debug);
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to the database at {}", crate::system::telemetry::redact_url(url)))
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
