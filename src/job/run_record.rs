//! `run.json`: a run's identity, settings and data specification, written before training starts so
//! that `--resume <run-id>` rebuilds exactly the same run. It never holds a secret nor where the
//! database is: it stores the database's label, and the URL comes from the flag or `DATABASE_URL`
//! again on resume.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use anyhow::Context;

use crate::data::source::SyntheticSpec;
use crate::publish::artifacts::TRAINER_VERSION;
use crate::publish::{layout, store::ModelStore};
use crate::system::device::DeviceChoice;
use crate::training::trainer::TrainConfig;

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
    /// The database's label (`--data-source-label`; `postgres` unless configured): never its URL.
    pub database: String,
    /// Playlist co-membership as a second co-occurrence source.
    pub playlists: bool,
    /// Set from the first load's watermark: a resumed run reads interactions up to here only, so it
    /// trains on the same history it started with.
    pub interactions_until_ms: Option<i64>,
    /// Set from the first load's catalogue: a resumed run reads tracks created up to here only, so
    /// a track added since is not in its catalogue.
    #[serde(default)]
    pub tracks_until_ms: Option<i64>,
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
pub struct RunRecord {
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
    /// Full retrain or warm start, decided once the data is loaded and kept for a resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<crate::publish::lineage::LineagePlan>,
}

impl RunRecord {
    /// A new run of `model`: a fresh time-ordered id, and a version name fixed now so that a resumed
    /// run publishes under the same one.
    pub fn new(model: &str, config: TrainConfig, data: DataSpec, minimums: MinimumSizes, device: DeviceChoice) -> Self {
        Self::started_at(uuid::Uuid::now_v7(), Utc::now(), model, config, data, minimums, device)
    }

    /// A new run with a given id (the worker's scheduler assigns run ids) that started at `now`, by
    /// the clock that orders versions (the database's, for worker runs): the version is named after it.
    pub fn started_at(
        run_id: uuid::Uuid,
        now: DateTime<Utc>,
        model: &str,
        config: TrainConfig,
        data: DataSpec,
        minimums: MinimumSizes,
        device: DeviceChoice,
    ) -> Self {
        let version = version_name(now, run_id);
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
            lineage: None,
        }
    }

    pub fn run_uuid(&self) -> anyhow::Result<uuid::Uuid> {
        self.run_id.parse().map_err(|e| anyhow::anyhow!("run id {} is not a UUID: {e}", self.run_id))
    }
}

/// `YYYYMMDDTHHMMSSZ-xxxxxx`: the start time to the second, then six hex digits holding the
/// milliseconds (10 bits) and 14 random bits of the run id. Versions sort as text in the order runs
/// started, within a second too: `latest.json` only moves to a version that sorts after its own, and
/// with a random suffix a run that started later in the same second could sort first (training
/// became fast enough for two runs of one model to start within a second).
fn version_name(start: DateTime<Utc>, run_id: uuid::Uuid) -> String {
    let random = (run_id.as_u128() & 0x3fff) as u32;
    let millis = start.timestamp_subsec_millis().min(999);
    format!("{}-{:06x}", start.format("%Y%m%dT%H%M%SZ"), (millis << 14) | random)
}

/// Writes `run.json` only if it is as this worker last read it (`read`: `None` when it must not
/// exist yet, else its entity tag): the fence that keeps a worker whose lease was taken over from
/// overwriting the new owner's record. `None` when someone else wrote it in between, else the
/// new entity tag.
pub async fn save_run_record(
    store: &ModelStore,
    record: &RunRecord,
    read: Option<Option<String>>,
) -> anyhow::Result<Option<Option<String>>> {
    let key = layout::run_record(&record.model, &record.run_id);
    let bytes = serde_json::to_vec_pretty(record)?.into();
    store.put_if_unchanged_tagged(&key, bytes, read).await.with_context(|| format!("writing {key}"))
}

/// Reads `run.json` with its entity tag (for [`save_run_record`]).
pub async fn load_run_record(
    store: &ModelStore,
    model: &str,
    run_id: &str,
) -> anyhow::Result<(RunRecord, Option<String>)> {
    let key = layout::run_record(model, run_id);
    let (bytes, tag) = store
        .get_versioned(&key)
        .await
        .with_context(|| format!("cannot resume run {run_id}: no {key} in {}", store.root_url()))?;
    let record = serde_json::from_slice(&bytes).with_context(|| format!("{key} is not a valid run record"))?;
    Ok((record, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_in_start_order_within_a_second() {
        let at = |ms: i64| DateTime::from_timestamp_millis(1_796_000_000_000 + ms).unwrap();
        // The random bits at their most unfavourable: all ones for the earlier run, zero for the later.
        let (early, late) = (uuid::Uuid::from_u128(0x3fff), uuid::Uuid::from_u128(0));
        let versions: Vec<String> = [(0, early), (1, late), (998, early), (999, late), (1_000, early)]
            .iter()
            .map(|&(ms, id)| version_name(at(ms), id))
            .collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        // ^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$
        let pattern = |v: &str| {
            let digits = |r: std::ops::Range<usize>| v[r].bytes().all(|b| b.is_ascii_digit());
            let hex = v[17..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            v.len() == 23 && digits(0..8) && &v[8..9] == "T" && digits(9..15) && &v[15..17] == "Z-" && hex
        };
        assert!(versions.iter().all(|v| pattern(v)), "the published format (docs/asyncapi.yaml): {versions:?}");
        assert_ne!(version_name(at(5), early), version_name(at(5), late), "two runs in one millisecond");
    }

    #[test]
    fn shortfall_names_every_missing_size() {
        let m = MinimumSizes::default();
        assert_eq!(m.shortfall(500, 20, 2_000), None);
        let why = m.shortfall(499, 3, 2_000).unwrap();
        assert!(why.contains("499 tracks") && why.contains("3 users") && !why.contains("interactions"), "{why}");
    }
}
