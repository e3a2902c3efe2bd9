//! Where a dataset came from: the synthetic generator or the platform's Postgres (what was asked of
//! the loader, and what dirty data it dropped). Recorded in logs, the run record and the metadata.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tracing::warn;

/// Sizes and seed of a synthetic dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    pub tracks: usize,
    pub users: usize,
    pub interactions: usize,
    pub genres: usize,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self { tracks: 5_000, users: 1_000, interactions: 50_000, genres: 16, seed: 42 }
    }
}

/// Where a dataset came from; recorded in logs and in the model metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // one per run
pub enum DataSource {
    /// Generated in-process (the embedded default when no database is configured).
    Synthetic(SyntheticSpec),
    /// Read from the platform's Postgres.
    Postgres {
        /// The database's label (`--data-source-label`), never its URL.
        database: String,
        options: LoadOptions,
        quality: DataQuality,
    },
}

impl DataSource {
    pub fn is_synthetic(&self) -> bool {
        matches!(self, DataSource::Synthetic(_))
    }

    /// Dirty-data counts, for data read from the platform.
    pub fn quality(&self) -> Option<&DataQuality> {
        match self {
            DataSource::Postgres { quality, .. } => Some(quality),
            DataSource::Synthetic(_) => None,
        }
    }
}

/// What to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Also read playlist co-membership (`"Playlist"` / `"_PlaylistToTrack"`): each playlist becomes a
    /// co-occurrence group of its own, like a user.
    pub playlists: bool,
    /// Configured positive types: never counted as unknown.
    pub positive_kinds: Vec<String>,
    /// Read only interactions at or before this instant (ms since the Unix epoch): a resumed run
    /// re-reads exactly the history it started with.
    pub interactions_until_ms: Option<i64>,
    /// Read only tracks created at or before this instant (`"Track"."createdAt"`, ms since the Unix
    /// epoch); `None` pins it to the newest track there is now (see [`super::Watermark`]'s
    /// `newest_track_created_ms`), so a resumed run's catalogue is the one it started with.
    #[serde(default)]
    pub tracks_until_ms: Option<i64>,
}

/// Dirty-data counts of one load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataQuality {
    pub tracks_read: u64,
    pub tracks_without_features: u64,
    pub tracks_with_null_features: u64,
    pub tracks_with_non_finite_features: u64,
    pub tracks_with_invalid_key_or_mode: u64,
    /// Values clamped into their physical range, per feature name.
    pub clamped_feature_values: BTreeMap<String, u64>,
    pub interactions_read: u64,
    pub interactions_with_nulls: u64,
    pub interactions_without_track_features: u64,
    /// Interactions of types the platform does not define, per type (kept, never positive).
    pub unknown_interaction_types: BTreeMap<String, u64>,
    pub playlist_memberships_read: u64,
    pub playlist_memberships_without_track_features: u64,
}

impl DataQuality {
    /// One warning per kind of dirty data found (never one per row).
    pub fn log(&self) {
        let counts = [
            (self.tracks_without_features, "tracks without features dropped"),
            (self.tracks_with_null_features, "tracks with NULL features dropped"),
            (self.tracks_with_non_finite_features, "tracks with NaN or infinite features dropped"),
            (self.tracks_with_invalid_key_or_mode, "tracks with key outside 0-11 or mode outside 0/1 dropped"),
            (self.interactions_with_nulls, "interactions with NULL columns dropped"),
            (self.interactions_without_track_features, "interactions whose track has no usable features dropped"),
            (
                self.playlist_memberships_without_track_features,
                "playlist memberships whose track has no usable features dropped",
            ),
        ];
        for (count, what) in counts {
            if count > 0 {
                warn!(count, "dirty data: {what}");
            }
        }
        for (feature, count) in &self.clamped_feature_values {
            warn!(count, feature = %feature, "dirty data: feature values outside the physical range clamped");
        }
        for (kind, count) in &self.unknown_interaction_types {
            warn!(count, interaction_type = %kind, "dirty data: unknown interaction type (kept, never positive)");
        }
    }
}
