//! `audotics-trainer bench-load`: how fast, and in how much memory, the platform's data loads.
//! One measurement per process (peak memory is per process): `--mode copy` is the trainer's loader
//! (binary COPY, ids interned as they stream), `--mode naive` selects every row into owned strings,
//! the way a straightforward ORM query would. `bench/load.sh` adds psql's `\copy` ceiling.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, ValueEnum};
use futures::TryStreamExt;
use serde::Serialize;

use crate::data::source::LoadOptions;
use crate::db::load::load;
use crate::system::procstat;
use crate::training::pairs::DEFAULT_POSITIVE_KINDS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    Copy,
    Naive,
}

#[derive(Debug, Args)]
pub struct LoadBenchArgs {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(long, value_enum, default_value = "copy")]
    pub mode: LoadMode,
}

#[derive(Debug, Serialize)]
struct LoadResult {
    mode: LoadMode,
    tracks: usize,
    interactions: usize,
    seconds: f64,
    interactions_per_second: f64,
    peak_rss_mib: f64,
    /// (peak RSS − RSS before the load) / interactions.
    bytes_per_interaction: f64,
}

pub async fn run(args: LoadBenchArgs) -> anyhow::Result<ExitCode> {
    let pool = crate::db::connect(&args.database_url).await?;
    let before = procstat::rss_bytes().unwrap_or(0);
    let started = Instant::now();
    let (tracks, interactions) = match args.mode {
        LoadMode::Copy => {
            let options = LoadOptions {
                playlists: false,
                positive_kinds: DEFAULT_POSITIVE_KINDS.map(String::from).to_vec(),
                interactions_until_ms: None,
                tracks_until_ms: None,
            };
            let dataset = load(&pool, &options, "bench").await?;
            (dataset.catalogue.len(), dataset.interactions.len())
        }
        LoadMode::Naive => naive(&pool).await?,
    };
    let seconds = started.elapsed().as_secs_f64();
    let peak = procstat::peak_rss_bytes().unwrap_or(0);
    let result = LoadResult {
        mode: args.mode,
        tracks,
        interactions,
        seconds,
        interactions_per_second: interactions as f64 / seconds,
        peak_rss_mib: peak as f64 / (1 << 20) as f64,
        bytes_per_interaction: peak.saturating_sub(before) as f64 / interactions.max(1) as f64,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(ExitCode::SUCCESS)
}

/// Every row into owned strings, as `SELECT` with an ORM would.
#[allow(clippy::type_complexity)]
async fn naive(pool: &sqlx::PgPool) -> anyhow::Result<(usize, usize)> {
    let tracks: Vec<(String, Option<f64>, Option<f64>, Option<f64>, Option<f64>, Option<i32>, Option<f64>)> =
        sqlx::query_as(
            r#"SELECT t."id", f."acousticness", f."danceability", f."energy", f."loudness", f."key", f."tempo"
           FROM "Track" t LEFT JOIN "TrackFeatures" f ON f."trackId" = t."id" ORDER BY t."id""#,
        )
        .fetch_all(pool)
        .await?;
    let rows: Vec<(String, String, String, chrono::NaiveDateTime)> =
        sqlx::query_as(r#"SELECT "userId", "trackId", "type", "timestamp" FROM "TrackInteraction""#)
            .fetch(pool)
            .try_collect()
            .await?;
    Ok((tracks.len(), rows.len()))
}
