//! What determines a run: its settings, the hold-out, and when it stops.

use serde::{Deserialize, Serialize};

use crate::training::loss::LossConfig;
use crate::training::model::tables::TableConfig;
use crate::training::model::{EncoderConfig, ModelKind};
use crate::training::pairs::SamplingConfig;

use super::EpochHistory;

/// Everything that determines a run's result, given the data. Stored with the run so that a resumed
/// run continues with exactly the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub validation_split: f64,
    pub learning_rate: f64,
    pub encoder: EncoderConfig,
    pub loss: LossConfig,
    pub sampling: SamplingConfig,
    pub positive_kinds: Vec<String>,
    pub seed: u64,
    /// Evaluate at most this many users per epoch (a fixed seeded sample).
    pub eval_users: usize,
    /// Validation loss over at most this many held-out pairs.
    pub max_validation_pairs: usize,
    /// Which listens are held out for evaluation. Runs recorded before this setting existed held
    /// out a random share per user.
    #[serde(default)]
    pub holdout: Holdout,
    /// Stop after this many epochs without a validation Recall@10 better than the best by more
    /// than `min_delta` (0: train every epoch). Runs recorded before it existed never stopped early.
    #[serde(default)]
    pub patience: usize,
    #[serde(default)]
    pub min_delta: f64,
    /// What is trained. Absent (content) from the JSON of content runs, so their digests and
    /// metadata read as before the kinds existed.
    #[serde(default, skip_serializing_if = "ModelKind::is_content")]
    pub model_kind: ModelKind,
    /// The embedding tables' settings (collaborative and hybrid kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<TableConfig>,
    /// Share of the catalogue held out as cold tracks, with all their listens (0: none): the
    /// cold-start evaluation. Training never sees those tracks' listens.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cold_tracks: f64,
    /// Similar tracks listed per track in the version's neighbour table (0: no table). Absent from
    /// the JSON at the default, so runs recorded before the table existed read as before.
    #[serde(default = "default_neighbours", skip_serializing_if = "is_default_neighbours")]
    pub neighbours: usize,
    /// How the neighbour table is built: exact, approximate (HNSW) or `auto` (exact up to 1M
    /// listed tracks). Absent from the JSON at the default.
    #[serde(default, skip_serializing_if = "is_default_index")]
    pub neighbour_index: crate::training::neighbours::IndexChoice,
}

fn is_default_index(choice: &crate::training::neighbours::IndexChoice) -> bool {
    *choice == crate::training::neighbours::IndexChoice::Auto
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn default_neighbours() -> usize {
    crate::training::neighbours::DEFAULT_K
}

fn is_default_neighbours(k: &usize) -> bool {
    *k == default_neighbours()
}

impl TrainConfig {
    /// This config for a run of `kind`: the table settings if the kind has tables, and the
    /// centering weight given, or the kind's default when none was.
    pub fn for_kind(mut self, kind: ModelKind, tables: TableConfig, centering_weight: Option<f64>) -> Self {
        self.model_kind = kind;
        self.tables = (!kind.is_content()).then_some(tables);
        self.loss.centering_weight = centering_weight.unwrap_or(kind.default_centering_weight());
        self
    }

    /// The table settings of a kind with tables (defaults when unset).
    pub fn table_config(&self) -> TableConfig {
        self.tables.unwrap_or_default()
    }

    /// Whether a run with this history stops here (see [`should_stop_early`]).
    pub fn early_stop(&self, history: &EpochHistory) -> bool {
        should_stop_early(&history.recall_at_10, self.patience, self.min_delta)
    }
}

/// How the held-out listens are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Holdout {
    /// A seeded share of each user's distinct positive tracks (data without meaningful timestamps).
    #[default]
    Random,
    /// The newest share of the history by timestamp: predict each user's next new tracks.
    Time,
}

impl Holdout {
    pub fn as_str(self) -> &'static str {
        match self {
            Holdout::Random => "random",
            Holdout::Time => "time",
        }
    }
}

/// Why training ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every epoch of `epochs` was trained.
    #[default]
    MaxEpochs,
    /// `patience` epochs passed without an improvement larger than `min_delta`.
    EarlyStopping,
    /// A refresh: the parent's weights, no epoch trained.
    NotTrained,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::MaxEpochs => "max_epochs",
            StopReason::EarlyStopping => "early_stopping",
            StopReason::NotTrained => "not_trained",
        }
    }
}

/// The epoch (1-based) whose weights are published: the first to reach the best validation
/// Recall@10, where an epoch counts as better only when it beats the best so far by more than
/// `min_delta`. `None` before the first epoch.
pub fn best_epoch(recall_at_10: &[f64], min_delta: f64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, &r) in recall_at_10.iter().enumerate() {
        match best {
            Some((_, b)) if r <= b + min_delta => {}
            _ => best = Some((i + 1, r)),
        }
    }
    best.map(|(epoch, _)| epoch)
}

/// Whether a run with these curves stops now: `patience` epochs have passed since the best one. A
/// function of the history alone, so a resumed run stops at the same epoch.
pub fn should_stop_early(recall_at_10: &[f64], patience: usize, min_delta: f64) -> bool {
    patience > 0 && best_epoch(recall_at_10, min_delta).is_some_and(|best| recall_at_10.len() - best >= patience)
}
