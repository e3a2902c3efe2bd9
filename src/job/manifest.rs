//! `run.json`: a run's identity, settings and data specification, written before training starts so
//! that `--resume <run-id>` rebuilds exactly the same run. It never holds a secret: the database URL
//! is stored redacted, and the real one comes from the flag or `DATABASE_URL` again on resume.

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::artifacts::TRAINER_VERSION;
use crate::data::synthetic::SyntheticSpec;
use crate::device::DeviceChoice;
use crate::train::TrainConfig;

/// Where a run's data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSpec {
    /// Generated in-process: the embedded default when no database is configured.
    Synthetic(SyntheticSpec),
    /// The platform's Postgres.
    Postgres(PostgresSpec),
}

/// What a run reads from Postgres.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostgresSpec {
    /// The database URL, password redacted (for the record only).
    pub database: String,
    /// Playlist co-membership as a second co-occurrence source.
    pub playlists: bool,
    /// Set from the first load's watermark: a resumed run reads interactions up to here only, so it
    /// trains on the same history it started with.
    pub interactions_until_ms: Option<i64>,
}

/// Below these sizes (after dirty data is dropped) a run ends as "insufficient data" rather than
/// training a meaningless model. Defaults are the platform's own thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinimumSizes {
    /// Tracks with usable features.
    pub tracks: usize,
    /// Users (or playlists) with at least two distinct positive tracks.
    pub users: usize,
    /// Interactions read and kept.
    pub interactions: usize,
}

impl Default for MinimumSizes {
    fn default() -> Self {
        Self { tracks: 500, users: 20, interactions: 2_000 }
    }
}

impl MinimumSizes {
    /// `None` when the data is large enough, else why not.
    pub fn shortfall(&self, tracks: usize, users: usize, interactions: usize) -> Option<String> {
        let mut short = Vec::new();
        if tracks < self.tracks {
            short.push(format!("{tracks} tracks with usable features (minimum {})", self.tracks));
        }
        if users < self.users {
            short.push(format!("{users} users with two or more positive tracks (minimum {})", self.users));
        }
        if interactions < self.interactions {
            short.push(format!("{interactions} usable interactions (minimum {})", self.interactions));
        }
        (!short.is_empty()).then(|| short.join(", "))
    }
}

/// `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    pub run_id: String,
    pub model: String,
    pub version: String,
    pub created_at: String,
    pub config: TrainConfig,
    pub data: DataSpec,
    #[serde(default)]
    pub minimums: MinimumSizes,
    pub device: DeviceChoice,
    pub trainer_version: String,
}

impl RunManifest {
    /// A new run of `model`: a fresh time-ordered id, and a version name fixed now so that a resumed
    /// run publishes under the same one.
    pub fn new(model: &str, config: TrainConfig, data: DataSpec, minimums: MinimumSizes, device: DeviceChoice) -> Self {
        Self::with_id(uuid::Uuid::now_v7(), model, config, data, minimums, device)
    }

    /// A new run with a given id (the worker's scheduler assigns run ids).
    pub fn with_id(
        run_id: uuid::Uuid,
        model: &str,
        config: TrainConfig,
        data: DataSpec,
        minimums: MinimumSizes,
        device: DeviceChoice,
    ) -> Self {
        let now = Utc::now();
        // Sortable by time; the uuid's random tail keeps two runs in one second apart.
        let version = format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), &run_id.simple().to_string()[26..]);
        Self {
            run_id: run_id.to_string(),
            model: model.to_string(),
            version,
            created_at: now.to_rfc3339_opts(SecondsFormat::Millis, true),
            config,
            data,
            minimums,
            device,
            trainer_version: TRAINER_VERSION.to_string(),
        }
    }

    pub fn run_uuid(&self) -> anyhow::Result<uuid::Uuid> {
        self.run_id.parse().map_err(|e| anyhow::anyhow!("run id {} is not a UUID: {e}", self.run_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortfall_names_every_missing_size() {
        let m = MinimumSizes::default();
        assert_eq!(m.shortfall(500, 20, 2_000), None);
        let why = m.shortfall(499, 3, 2_000).unwrap();
        assert!(why.contains("499 tracks") && why.contains("3 users") && !why.contains("interactions"), "{why}");
    }
}
