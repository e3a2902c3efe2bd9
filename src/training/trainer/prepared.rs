//! The data in the form training needs: standardised features, the co-listen index and its hold-out.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::data::features::{NUM_FEATURES, Standardizer};
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
    /// Training users per track (popularity).
    pub track_counts: Vec<u32>,
    pub validation_pairs: Vec<[u32; 2]>,
    /// How the held-out listens were chosen.
    pub holdout: HoldoutSummary,
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
        let standardizer = Standardizer::fit(&dataset.catalogue.features);
        let n = dataset.catalogue.len();
        let features =
            Tensor::from_vec(standardizer.apply_all(&dataset.catalogue.features), (n, NUM_FEATURES), device)?;
        let (mining, train, heldout, mut holdout) = match config.holdout {
            Holdout::Random => {
                let index = CoListenIndex::build(&dataset.interactions, &config.positive_kinds);
                let (train, heldout) = index.split(config.validation_split, config.seed);
                (index.stats, train, heldout, HoldoutSummary::default())
            }
            Holdout::Time => {
                let split =
                    pairs::split_by_time(&dataset.interactions, &config.positive_kinds, config.validation_split);
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
                (split.index.stats, split.index.tracks, split.heldout, summary)
            }
        };
        holdout.kind = config.holdout;
        holdout.fraction = config.validation_split;
        holdout.heldout_pairs = heldout.len();
        let track_counts = pairs::track_counts(&train, n);
        let validation_pairs = pairs::validation_pairs(&train, &heldout, config.max_validation_pairs, config.seed);
        Ok(Self { standardizer, features, mining, train, heldout, track_counts, validation_pairs, holdout })
    }

    pub fn num_tracks(&self) -> usize {
        self.track_counts.len()
    }
}
