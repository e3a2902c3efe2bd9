use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::{Connection, PgConnection, PgPool};

pub const BIN: &str = env!("CARGO_BIN_EXE_audotics-trainer");

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database of its own for one test, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let admin = admin_url();
        let name = format!("audotics_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL is required for these tests ({admin}): {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&name);
        let url = url.to_string();
        let pool = PgPool::connect(&url).await.unwrap();
        Self { name, url, pool }
    }

    /// Seeds the platform's tables with a synthetic dataset through the real `seed` command.
    pub fn seed_synthetic(&self, sizes: &[&str]) -> serde_json::Value {
        let mut args = vec!["seed", "--database-url", &self.url];
        args.extend_from_slice(sizes);
        let out = run(&args);
        assert!(out.status.success(), "seed failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(out.stdout.trim_ascii()).unwrap()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(&self.pool).await.unwrap()
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // The test's runtime is blocked in this drop, so the pool (bound to it) cannot be closed
        // gracefully; a thread with its own runtime drops the database WITH (FORCE), which ends the
        // pool's connections server-side.
        let (admin, name) = (admin_url(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await;
                }
            })
        })
        .join();
    }
}

/// SQL inserting a track with typical features; `feature` = a column to override with `value` (a
/// SQL literal: `'NaN'`, `NULL`, `14`). The `TrackFeatures` row is left out when `feature` is
/// `Some(("none", _))`.
pub fn track_sql(id: &str, feature: Option<(&str, &str)>) -> String {
    let track = format!(
        r#"INSERT INTO "Track" (id, "spotifyId", name, album, "updatedAt") VALUES ('{id}', 'sp-{id}', 'n', 'a', now());"#
    );
    if matches!(feature, Some(("none", _))) {
        return track;
    }
    let mut values = [
        ("acousticness", "0.5"),
        ("danceability", "0.5"),
        ("energy", "0.5"),
        ("instrumentalness", "0.1"),
        ("key", "3"),
        ("liveness", "0.1"),
        ("loudness", "-8"),
        ("mode", "1"),
        ("speechiness", "0.05"),
        ("tempo", "120"),
        ("valence", "0.5"),
    ];
    if let Some((name, value)) = feature {
        values.iter_mut().find(|(n, _)| *n == name).unwrap().1 = value;
    }
    let cols: Vec<String> = values.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    let vals: Vec<&str> = values.iter().map(|(_, v)| *v).collect();
    format!(
        r#"{track} INSERT INTO "TrackFeatures" (id, "trackId", {}, "updatedAt") VALUES ('f-{id}', '{id}', {}, now());"#,
        cols.join(","),
        vals.join(",")
    )
}

/// SQL inserting an interaction of `kind` at `at` (a SQL timestamp expression).
pub fn interaction_sql(user: &str, track: &str, kind: &str, at: &str) -> String {
    format!(
        r#"INSERT INTO "TrackInteraction" (id, "userId", "trackId", type, timestamp)
           VALUES (gen_random_uuid()::text, '{user}', '{track}', '{kind}', {at});"#
    )
}

pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("DATABASE_URL").env_remove("RUST_LOG").env("AUDOTICS_LOG_FORMAT", "json");
    // Models trained for seconds test the machinery: the quality floors are recorded, not enforced
    // (tests/train_cli.rs and the worker suite test the floors themselves).
    cmd.env("AUDOTICS_QUALITY_FLOORS", "false");
    cmd
}

pub fn run(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

/// Small training settings: seconds per run (epochs are set by each test).
pub const FAST: &[&str] = &["--batch-size", "32", "--embedding-size", "16", "--no-progress"];

pub fn only_version(dir: &Path) -> PathBuf {
    let versions: Vec<PathBuf> =
        std::fs::read_dir(dir.join("content-based/versions")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(versions.len(), 1, "{versions:?}");
    versions.into_iter().next().unwrap()
}

pub fn metadata(version_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(version_dir.join("content-based-model-metadata.json")).unwrap()).unwrap()
}

/// A retrain request for model `m` with no parameters.
pub fn retrain_request(event_id: impl Into<String>) -> audotics_trainer::contract::request::RetrainRequest {
    audotics_trainer::contract::request::RetrainRequest {
        event_id: event_id.into(),
        model: "m".into(),
        requested_at: None,
        interactions_until: None,
        reason: None,
        params: None,
    }
}
