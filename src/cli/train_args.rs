//! The `train` flags: the settings of a run, shared by `train`, `worker` (each run's defaults) and
//! `spotify-baselines`.

use clap::Args;

use super::values::{
    WeightOrAuto, at_least_one, dropout_rate, model_key, neighbours_per_track, non_empty, non_negative_finite,
    open_unit_interval, positive_finite, share_below_one, weight_or_auto,
};
use crate::data::source::SyntheticSpec;
use crate::job::{MinimumSizes, RunDefaults};
use crate::system::device::DeviceChoice;
use crate::training::loss::{LossConfig, LossKind};
use crate::training::model::tables::TableConfig;
use crate::training::model::{EncoderConfig, ModelKind};
use crate::training::neighbours::IndexChoice;
use crate::training::pairs::{DEFAULT_POSITIVE_KINDS, SamplingConfig};
use crate::training::trainer::{Holdout, TrainConfig};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training epochs.
    #[arg(long, env = "AUDOTICS_EPOCHS", default_value_t = 50, value_parser = at_least_one)]
    pub epochs: usize,
    /// Pairs per optimiser step (also the number of in-batch negatives + 1).
    #[arg(long, env = "AUDOTICS_BATCH_SIZE", default_value_t = 64, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Share of each user's distinct positive tracks held out for evaluation, in (0, 1).
    #[arg(long, env = "AUDOTICS_VALIDATION_SPLIT", default_value_t = 0.2, value_parser = open_unit_interval, allow_negative_numbers = true)]
    pub validation_split: f64,
    /// Adam learning rate (> 0).
    #[arg(long, env = "AUDOTICS_LEARNING_RATE", default_value_t = 0.001, value_parser = positive_finite, allow_negative_numbers = true)]
    pub learning_rate: f64,
    /// Embedding size E (the first hidden layer has 2E units).
    #[arg(long, env = "AUDOTICS_EMBEDDING_SIZE", default_value_t = 64, value_parser = at_least_one)]
    pub embedding_size: usize,
    /// Seed for data generation, the split, initialisation, pair sampling and dropout.
    #[arg(long, env = "AUDOTICS_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Where to train: auto uses a GPU when the binary has CUDA and one is present.
    #[arg(long, env = "AUDOTICS_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Model store: a directory path, a file:// URL, or s3://bucket/prefix (S3 settings from AWS_*).
    #[arg(long, env = "MODEL_STORE_URL", default_value = "./models")]
    pub output: String,
    /// Model key: the top-level folder of the store.
    #[arg(long, env = "AUDOTICS_MODEL", default_value = "content-based", value_parser = model_key)]
    pub model: String,
    /// What to train: content (audio features; embeds any track), collaborative (a learned row per
    /// played track) or hybrid (audio + artists + album + track identity).
    #[arg(long, env = "AUDOTICS_MODEL_KIND", value_enum, default_value = "content")]
    pub model_kind: ModelKind,
    /// Collaborative and hybrid kinds: Adam's learning rate for embedding-table rows (> 0).
    #[arg(long, env = "AUDOTICS_TABLE_LEARNING_RATE", default_value_t = TableConfig::default().learning_rate, value_parser = positive_finite, allow_negative_numbers = true)]
    pub table_learning_rate: f64,
    /// Hybrid: probability that a training row's track-identity term is dropped, in [0, 1).
    #[arg(long, env = "AUDOTICS_IDENTITY_DROPOUT", default_value_t = TableConfig::default().identity_dropout, value_parser = dropout_rate, allow_negative_numbers = true)]
    pub identity_dropout: f32,
    /// Hybrid: probability that a training row's album term is dropped, in [0, 1).
    #[arg(long, env = "AUDOTICS_ALBUM_DROPOUT", default_value_t = TableConfig::default().album_dropout, value_parser = dropout_rate, allow_negative_numbers = true)]
    pub album_dropout: f32,
    /// Hybrid: catalogue tracks an artist or album needs for an embedding row of its own; rarer
    /// ones share the out-of-vocabulary row.
    #[arg(long, env = "AUDOTICS_VOCAB_MIN_COUNT", default_value_t = TableConfig::default().min_count, value_parser = at_least_one)]
    pub vocab_min_count: usize,
    /// Share of the catalogue held out as cold tracks, with all their listens, for the cold-start
    /// evaluation, in [0, 1) (0: none). Those tracks' listens are never trained on.
    #[arg(long, env = "AUDOTICS_COLD_TRACKS", default_value_t = 0.0, value_parser = share_below_one, allow_negative_numbers = true)]
    pub cold_tracks: f64,
    /// Similar tracks listed per track in each version's `neighbours.safetensors` (exact top-K by
    /// cosine), at most 1000 (0: no table).
    #[arg(long, env = "AUDOTICS_NEIGHBOURS", default_value_t = crate::training::neighbours::DEFAULT_K, value_parser = neighbours_per_track)]
    pub neighbours: usize,
    /// How the neighbour table is built: `exact` (every cosine), `approximate` (an HNSW graph:
    /// faster past ~1M tracks, finds most but not all of the exact neighbours; its recall is in
    /// BENCHMARKS.md) or `auto` (exact up to 1,000,000 listed tracks, approximate beyond).
    #[arg(long, env = "AUDOTICS_NEIGHBOUR_INDEX", value_enum, default_value_t = IndexChoice::Auto)]
    pub neighbour_index: IndexChoice,
    /// Start each run from the weights of the version latest.json names (`auto`), unless a full
    /// retrain is due (schedule, drift, request, another kind or size), or always train from
    /// scratch (`off`).
    #[arg(long, env = "AUDOTICS_WARM_START", value_enum, default_value = "off")]
    pub warm_start: crate::job::lineage::WarmStart,
    /// With warm start: retrain fully once every this many versions (0: never on schedule).
    #[arg(long, env = "FULL_RETRAIN_EVERY", default_value_t = crate::job::lineage::LineageSettings::default().full_retrain_every)]
    pub full_retrain_every: usize,
    /// With warm start: retrain fully when more than this share of the interactions is newer than
    /// the lineage's last full version, in [0, 1).
    #[arg(long, env = "FULL_RETRAIN_DRIFT", default_value_t = crate::job::lineage::LineageSettings::default().drift_threshold, value_parser = share_below_one, allow_negative_numbers = true)]
    pub full_retrain_drift: f64,
    /// A warm run's epochs are uniform samples of at most this many pairs (0: every pair).
    #[arg(long, env = "WARM_PAIRS_PER_EPOCH", default_value_t = crate::job::lineage::LineageSettings::default().warm_pairs_per_epoch)]
    pub warm_pairs_per_epoch: usize,
    /// Where a warm run's Adam starts: `fresh` (moments zero) or `carried` (the moments of the
    /// epoch the parent published, from its run's checkpoint).
    #[arg(long, env = "AUDOTICS_WARM_OPTIMIZER", value_enum, default_value = "fresh")]
    pub warm_optimizer: crate::job::lineage::WarmOptimizer,
    /// Training objective: contrastive (in-batch softmax) or cosine (the old, collapsing one).
    #[arg(long, env = "AUDOTICS_LOSS", value_enum, default_value = "contrastive")]
    pub loss: LossKind,
    /// Softmax temperature of the contrastive loss (> 0).
    #[arg(long, env = "AUDOTICS_TEMPERATURE", default_value_t = 0.05, value_parser = positive_finite, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Subtract log(popularity) from in-batch logits (logQ correction): true or false.
    #[arg(long, env = "AUDOTICS_LOGQ_CORRECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub logq_correction: bool,
    /// Weight of the penalty on the squared norm of each batch's mean embedding (0 = off): keeps
    /// embeddings from sharing one dominant direction. Unset: 1 for the content kind (without it
    /// the audio encoder collapses), 0 for the table kinds (measured: it costs them Recall@10).
    /// `auto` or empty: unset.
    #[arg(long, env = "AUDOTICS_CENTERING_WEIGHT", default_value = "auto", value_parser = weight_or_auto, allow_negative_numbers = true)]
    pub centering_weight: WeightOrAuto,
    /// Dropout rate after each hidden layer, in [0, 1).
    #[arg(long, env = "AUDOTICS_DROPOUT", default_value_t = 0.2, value_parser = dropout_rate, allow_negative_numbers = true)]
    pub dropout: f32,
    /// Partners drawn per anchor track per epoch.
    #[arg(long, env = "AUDOTICS_PAIRS_PER_TRACK", default_value_t = 5, value_parser = at_least_one)]
    pub pairs_per_track: usize,
    /// Cap on the pairs one user contributes per epoch.
    #[arg(long, env = "AUDOTICS_MAX_PAIRS_PER_USER", default_value_t = 500, value_parser = at_least_one)]
    pub max_pairs_per_user: usize,
    /// word2vec subsampling threshold for very popular tracks (0 = off; 1e-3 is a common value).
    #[arg(long, env = "AUDOTICS_SUBSAMPLE_THRESHOLD", default_value_t = 0.0, value_parser = non_negative_finite, allow_negative_numbers = true)]
    pub subsample_threshold: f64,
    /// Train on at most this many pairs per epoch, a uniform sample (0 = all).
    #[arg(long, env = "AUDOTICS_MAX_PAIRS_PER_EPOCH", default_value_t = 0)]
    pub max_pairs_per_epoch: usize,
    /// Interaction types that count as co-listening evidence (comma-separated).
    #[arg(long, env = "AUDOTICS_POSITIVE_TYPES", value_delimiter = ',', default_values_t = DEFAULT_POSITIVE_KINDS.map(String::from), value_parser = non_empty)]
    pub positive_types: Vec<String>,
    /// Evaluate at most this many users per epoch (a fixed seeded sample).
    #[arg(long, env = "AUDOTICS_EVAL_USERS", default_value_t = 5000, value_parser = at_least_one)]
    pub eval_users: usize,
    /// Validation loss over at most this many held-out pairs.
    #[arg(long, env = "AUDOTICS_MAX_VALIDATION_PAIRS", default_value_t = 20_000, value_parser = at_least_one)]
    pub max_validation_pairs: usize,
    /// Which listens are held out for evaluation: time (the newest share of the history; predict each
    /// user's next new tracks) or random (a seeded share of each user's tracks, for data without
    /// meaningful timestamps). Unset: time when training from the database, random otherwise.
    #[arg(long, env = "AUDOTICS_HOLDOUT", value_enum)]
    pub holdout: Option<Holdout>,
    /// Stop after this many epochs without a validation Recall@10 better than the best by more than
    /// --min-delta; the best epoch's weights are published either way (0: train every epoch).
    #[arg(long, env = "AUDOTICS_PATIENCE", default_value_t = 5)]
    pub patience: usize,
    /// The smallest Recall@10 gain that counts as an improvement (absolute, ≥ 0).
    #[arg(long, env = "AUDOTICS_MIN_DELTA", default_value_t = 0.0, value_parser = non_negative_finite, allow_negative_numbers = true)]
    pub min_delta: f64,
    /// Quality gate: a version is published only when its Recall@10 beats popularity and the raw
    /// features each by this share (0.1 = 10 %) and by two standard errors (≥ 0).
    #[arg(long, env = "AUDOTICS_MIN_LIFT", default_value_t = 0.1, value_parser = non_negative_finite, allow_negative_numbers = true)]
    pub min_lift: f64,
    /// Quality gate: whether the floors (popularity, raw features) decide publication: true or false.
    /// Off, they are still computed and recorded; for experiments and tests of the machinery.
    #[arg(long, env = "AUDOTICS_QUALITY_FLOORS", default_value_t = true, action = clap::ArgAction::Set)]
    pub quality_floors: bool,
    /// PostgreSQL URL of the platform's database; without it, training uses synthetic data.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// How published metadata, run.json and the model card name the database the data came from.
    /// Unset, they say only `postgres`: no host, user or database name leaves the trainer.
    #[arg(long, env = "AUDOTICS_DATA_SOURCE_LABEL", default_value = "postgres", value_parser = non_empty)]
    pub data_source_label: String,
    /// Also use playlist co-membership ("Playlist" / "_PlaylistToTrack") as co-occurrence: true or false.
    #[arg(long, env = "AUDOTICS_PLAYLISTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub playlists: bool,
    /// Minimum tracks with usable features; below it the run ends as "insufficient data".
    #[arg(long, env = "AUDOTICS_MIN_TRACKS", default_value_t = MinimumSizes::default().tracks)]
    pub min_tracks: usize,
    /// Minimum users with two or more positive tracks.
    #[arg(long, env = "AUDOTICS_MIN_USERS", default_value_t = MinimumSizes::default().users)]
    pub min_users: usize,
    /// Minimum usable interactions.
    #[arg(long, env = "AUDOTICS_MIN_INTERACTIONS", default_value_t = MinimumSizes::default().interactions)]
    pub min_interactions: usize,
    /// Versions to keep after a publish; older ones (never the one latest.json names) are deleted,
    /// with the checkpoints of finished runs except the newest run's.
    #[arg(long, env = "AUDOTICS_KEEP_VERSIONS", default_value_t = 10, value_parser = at_least_one)]
    pub keep_versions: usize,
    /// Checkpoints a run keeps while it trains (the newest; older ones are deleted as new ones land).
    #[arg(long, env = "AUDOTICS_KEEP_CHECKPOINTS", default_value_t = 2, value_parser = at_least_one)]
    pub keep_checkpoints: usize,
    /// Continue this run (by run id) from its newest checkpoint, with its stored settings.
    #[arg(long, env = "AUDOTICS_RESUME")]
    pub resume: Option<String>,
    /// Never draw a progress bar (one is drawn only when stderr is a terminal).
    #[arg(long, env = "AUDOTICS_NO_PROGRESS", default_value_t = false)]
    pub no_progress: bool,
    #[command(flatten)]
    pub synthetic: SyntheticArgs,
}

impl TrainArgs {
    /// The run settings these flags describe.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            validation_split: self.validation_split,
            learning_rate: self.learning_rate,
            encoder: EncoderConfig { embedding_size: self.embedding_size, dropout: self.dropout },
            loss: LossConfig {
                kind: self.loss,
                temperature: self.temperature,
                logq_correction: self.logq_correction,
                centering_weight: 0.0, // set by `for_kind`
            },
            sampling: SamplingConfig {
                pairs_per_track: self.pairs_per_track,
                max_pairs_per_user: self.max_pairs_per_user,
                subsample_threshold: self.subsample_threshold,
                max_pairs_per_epoch: self.max_pairs_per_epoch,
            },
            positive_kinds: self.positive_types.clone(),
            seed: self.seed,
            eval_users: self.eval_users,
            max_validation_pairs: self.max_validation_pairs,
            holdout: self.holdout.unwrap_or_default(),
            patience: self.patience,
            min_delta: self.min_delta,
            model_kind: ModelKind::ContentBased,
            tables: None,
            cold_tracks: self.cold_tracks,
            neighbours: self.neighbours,
            neighbour_index: self.neighbour_index,
        }
        .for_kind(self.model_kind, self.table_config(), self.centering_weight.0)
    }

    /// The run settings for data read from the platform's database (`from_database`) or not: the
    /// hold-out defaults to time-ordered for the database's timestamped history.
    pub fn train_config_for(&self, from_database: bool) -> TrainConfig {
        let holdout = match (self.holdout, from_database) {
            (Some(h), _) => h,
            (None, true) => Holdout::Time,
            (None, false) => Holdout::Random,
        };
        TrainConfig { holdout, ..self.train_config() }
    }

    /// What every run of this process starts from; `from_database` as for [`Self::train_config_for`].
    /// The embedding-table settings (collaborative and hybrid kinds).
    pub fn table_config(&self) -> TableConfig {
        TableConfig {
            identity_dropout: self.identity_dropout,
            album_dropout: self.album_dropout,
            min_count: self.vocab_min_count,
            learning_rate: self.table_learning_rate,
        }
    }

    pub fn run_defaults(&self, from_database: bool) -> RunDefaults {
        RunDefaults {
            config: self.train_config_for(from_database),
            tables: self.table_config(),
            centering_weight: self.centering_weight.0,
            minimums: MinimumSizes {
                tracks: self.min_tracks,
                users: self.min_users,
                interactions: self.min_interactions,
            },
            device: self.device,
            min_lift: self.min_lift,
            quality_floors: self.quality_floors,
            keep_versions: self.keep_versions,
            keep_checkpoints: self.keep_checkpoints,
            data_source_label: self.data_source_label.clone(),
            playlists: self.playlists,
            lineage: crate::job::lineage::LineageSettings {
                warm_start: self.warm_start,
                full_retrain_every: self.full_retrain_every,
                drift_threshold: self.full_retrain_drift,
                warm_pairs_per_epoch: self.warm_pairs_per_epoch,
                warm_optimizer: self.warm_optimizer,
            },
        }
    }
}

/// `train`'s own flags beside the run settings it shares with the worker.
#[derive(Debug, Args)]
pub struct TrainCommand {
    #[command(flatten)]
    pub args: TrainArgs,
    /// No training: embed the tracks added since the latest version with its weights, keep every
    /// other track's row, and publish (content and hybrid models; the latest version's settings).
    #[arg(long, conflicts_with = "full")]
    pub refresh: bool,
    /// Retrain from scratch even when `--warm-start auto` would warm-start.
    #[arg(long)]
    pub full: bool,
}

/// Sizes of the synthetic dataset (the embedded default when no database is configured).
#[derive(Debug, Args)]
pub struct SyntheticArgs {
    #[arg(long, env = "AUDOTICS_SYNTHETIC_TRACKS", default_value_t = SyntheticSpec::default().tracks, value_parser = at_least_one)]
    pub synthetic_tracks: usize,
    #[arg(long, env = "AUDOTICS_SYNTHETIC_USERS", default_value_t = SyntheticSpec::default().users, value_parser = at_least_one)]
    pub synthetic_users: usize,
    #[arg(long, env = "AUDOTICS_SYNTHETIC_INTERACTIONS", default_value_t = SyntheticSpec::default().interactions, value_parser = at_least_one)]
    pub synthetic_interactions: usize,
    /// Genre-like clusters the synthetic tracks are drawn around.
    #[arg(long, env = "AUDOTICS_SYNTHETIC_GENRES", default_value_t = SyntheticSpec::default().genres, value_parser = at_least_one)]
    pub synthetic_genres: usize,
}

impl SyntheticArgs {
    pub fn spec(&self, seed: u64) -> SyntheticSpec {
        SyntheticSpec {
            tracks: self.synthetic_tracks,
            users: self.synthetic_users,
            interactions: self.synthetic_interactions,
            genres: self.synthetic_genres,
            seed,
        }
    }
}
