//! The data in the form training needs: standardised features, the co-listen index and its hold-out.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::data::features::{NUM_FEATURES, Standardizer};
use crate::data::tags::TrackTags;
use crate::training::model::vocab::TrackInputs;
use crate::training::pairs::{self, CoListenIndex, MiningStats, UserTracks};

use super::{Holdout, TrainConfig};

/// The data in the form training needs, derived deterministically from a [`Dataset`].
pub struct PreparedData {
    pub standardizer: Standardizer,
    /// `[num_tracks, 11]` standardised features, resident on the training device.
    pub features: Tensor,
    pub mining: MiningStats,
    pub train: UserTracks,
    pub heldout: UserTracks,
    /// The dataset's user index of each row of `train` and `heldout`.
    pub user_index: Vec<u32>,
    /// Training users per track (popularity).
    pub track_counts: Vec<u32>,
    pub validation_pairs: Vec<[u32; 2]>,
    /// How the held-out listens were chosen.
    pub holdout: HoldoutSummary,
    /// Each track's artists and album (the shared-artist baseline reads them).
    pub tags: TrackTags,
    /// The vocabularies and each track's table rows (the collaborative and hybrid kinds).
    pub inputs: TrackInputs,
    /// The cold-track hold-out, when `cold_tracks > 0`.
    pub cold: Option<ColdHoldout>,
}

/// Tracks held out with all their listens, and who played them.
pub struct ColdHoldout {
    pub is_cold: Vec<bool>,
    /// Per training user (rows of `train`), the cold tracks they played.
    pub heldout: UserTracks,
}

/// The cold hold-out as metadata reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ColdSummary {
    pub fraction: f64,
    pub tracks: usize,
    /// Held-out (user, cold track) pairs.
    pub heldout_pairs: usize,
}

/// The hold-out as metadata, the model card and logs report it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldoutSummary {
    pub kind: Holdout,
    /// The share asked for (`--validation-split`): of each user's tracks (random) or of the
    /// timestamped positive interactions (time).
    pub fraction: f64,
    /// Time hold-out: listens at or after this instant (RFC 3339) are held out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<String>,
    /// Time hold-out: positives in the held-out period, and those dropped because the track was not
    /// new to the user or the user had fewer than two training tracks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_period_positives: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_known_tracks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_cold_users: Option<usize>,
    /// Held-out (user, track) pairs.
    pub heldout_pairs: usize,
}

impl PreparedData {
    pub fn new(dataset: &Dataset, config: &TrainConfig, device: &Device) -> anyhow::Result<Self> {
        Self::with_standardizer(dataset, config, device, None)
    }

    /// [`Self::new`] with given standardisation statistics (a warm start keeps its lineage's);
    /// `None` fits them on this catalogue.
    pub fn with_standardizer(
        dataset: &Dataset,
        config: &TrainConfig,
        device: &Device,
        standardizer: Option<Standardizer>,
    ) -> anyhow::Result<Self> {
        let standardizer = standardizer.unwrap_or_else(|| Standardizer::fit(&dataset.catalogue.features));
        let n = dataset.catalogue.len();
        let features =
            Tensor::from_vec(standardizer.apply_all(&dataset.catalogue.features), (n, NUM_FEATURES), device)?;
        let cold_split = (config.cold_tracks > 0.0)
            .then(|| pairs::split_cold_tracks(&dataset.interactions, n, config.cold_tracks, config.seed));
        let interactions = cold_split.as_ref().map_or(&dataset.interactions, |c| &c.warm);
        let (mining, train, heldout, mut holdout, user_index) = match config.holdout {
            Holdout::Random => {
                let index = CoListenIndex::build(interactions, &config.positive_kinds);
                let (train, heldout) = index.split(config.validation_split, config.seed);
                (index.stats, train, heldout, HoldoutSummary::default(), index.user_index)
            }
            Holdout::Time => {
                let split = pairs::split_by_time(interactions, &config.positive_kinds, config.validation_split);
                let cutoff = (split.cutoff_ms != i64::MAX)
                    .then(|| chrono::DateTime::from_timestamp_millis(split.cutoff_ms).map(|t| t.to_rfc3339()))
                    .flatten();
                let summary = HoldoutSummary {
                    cutoff,
                    heldout_period_positives: Some(split.heldout_period_positives),
                    dropped_known_tracks: Some(split.heldout_known_tracks),
                    dropped_cold_users: Some(split.heldout_cold_user_tracks),
                    ..HoldoutSummary::default()
                };
                (split.index.stats, split.index.tracks, split.heldout, summary, split.index.user_index)
            }
        };
        holdout.kind = config.holdout;
        holdout.fraction = config.validation_split;
        holdout.heldout_pairs = heldout.len();
        let track_counts = pairs::track_counts(&train, n);
        let validation_pairs = pairs::validation_pairs(&train, &heldout, config.max_validation_pairs, config.seed);
        let cold = cold_split
            .map(|c| ColdHoldout { heldout: c.heldout(&config.positive_kinds, &user_index), is_cold: c.is_cold });
        let tags = match dataset.catalogue.tags.len() {
            len if len == n => dataset.catalogue.tags.clone(),
            0 => untagged(n),
            len => anyhow::bail!("the catalogue has {n} tracks but tags for {len}"),
        };
        let inputs = TrackInputs::build(&tags, config.table_config().min_count);
        Ok(Self {
            standardizer,
            features,
            mining,
            train,
            heldout,
            user_index,
            track_counts,
            validation_pairs,
            holdout,
            tags,
            inputs,
            cold,
        })
    }

    /// The cold hold-out's size, for metadata and logs.
    pub fn cold_summary(&self, fraction: f64) -> Option<ColdSummary> {
        self.cold.as_ref().map(|c| ColdSummary {
            fraction,
            tracks: c.is_cold.iter().filter(|x| **x).count(),
            heldout_pairs: c.heldout.len(),
        })
    }

    pub fn num_tracks(&self) -> usize {
        self.track_counts.len()
    }
}

/// Tags of `n` tracks without artists or albums (a catalogue built without them).
fn untagged(n: usize) -> TrackTags {
    let mut tags = TrackTags::default();
    for _ in 0..n {
        tags.push([], None);
    }
    tags
}
