//! What a run carries from epoch to epoch: metrics, history, model and optimiser state.

use candle_core::{DType, Device};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::training::eval::RankingMetrics;
use crate::training::model::Encoder;
use crate::training::model::tables::Tables;
use crate::training::model::vocab::TrackInputs;
use crate::training::optim::Adam;

use super::TrainConfig;

/// Metrics of one finished epoch (1-based `epoch`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub loss: f64,
    pub val_loss: f64,
    pub ranking: RankingMetrics,
    /// Ranking among the cold tracks, when the run holds some out and the kind can embed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_ranking: Option<RankingMetrics>,
    /// Mean cosine between two random tracks' embeddings (‖mean embedding‖²): near 1 means the
    /// embeddings have collapsed onto one direction.
    pub mean_pairwise_cosine: f64,
    pub pairs: usize,
    pub pairs_per_second: f64,
    pub train_seconds: f64,
    /// Process CPU time (all threads) spent in the training phase, where `/proc` can tell.
    pub train_cpu_seconds: Option<f64>,
    pub seconds: f64,
}

/// Per-epoch curves, as the metadata's `training_history` reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochHistory {
    pub loss: Vec<f64>,
    pub val_loss: Vec<f64>,
    pub recall_at_10: Vec<f64>,
    pub ndcg_at_10: Vec<f64>,
    pub mean_pairwise_cosine: Vec<f64>,
    pub pairs_per_second: Vec<f64>,
    pub seconds: Vec<f64>,
}

impl EpochHistory {
    pub(super) fn push(&mut self, m: &EpochMetrics) {
        self.loss.push(m.loss);
        self.val_loss.push(m.val_loss);
        self.recall_at_10.push(m.ranking.recall_at_10);
        self.ndcg_at_10.push(m.ranking.ndcg_at_10);
        self.mean_pairwise_cosine.push(m.mean_pairwise_cosine);
        self.pairs_per_second.push(m.pairs_per_second);
        self.seconds.push(m.seconds);
    }
}

/// Everything that changes during training; a checkpoint is exactly this.
pub struct TrainingState {
    /// The content encoder (trained by the content and hybrid kinds; the collaborative kind leaves
    /// it at its initialisation and never uses it).
    pub encoder: Encoder,
    /// The embedding tables of the collaborative and hybrid kinds (none for content).
    pub tables: Tables,
    pub optimizer: Adam,
    /// Drives pair sampling and dropout; initialisation consumed its first draws.
    pub rng: ChaCha8Rng,
    /// Epochs completed so far.
    pub epoch: usize,
    pub history: EpochHistory,
    /// Set when the run stopped part-way through epoch `epoch + 1`: where to continue it.
    pub cursor: Option<EpochCursor>,
}

/// A position inside an epoch: enough to continue it exactly as if it had never stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochCursor {
    /// The generator as the epoch started: re-sampling the epoch's pairs from it gives the same pairs.
    pub rng_at_start: ChaCha8Rng,
    /// The next batch (step) to train.
    pub next_step: usize,
    pub loss_sum: f64,
    pub batches: usize,
    pub trained: usize,
}

impl TrainingState {
    /// A fresh state of a content run: the encoder initialised from the seed. Kinds with tables
    /// need the catalogue's inputs: [`Self::for_inputs`].
    pub fn new(config: &TrainConfig, device: &Device) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.model_kind.is_content(),
            "a {} model needs the catalogue's vocabularies to build its tables",
            config.model_kind.as_str()
        );
        Self::for_inputs(config, &TrackInputs::build(&Default::default(), 1), device)
    }

    /// A fresh state of any kind: the encoder initialised from the seed, then the kind's tables,
    /// sized by `inputs`, from their own seeded stream.
    pub fn for_inputs(config: &TrainConfig, inputs: &TrackInputs, device: &Device) -> anyhow::Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let encoder = Encoder::new(config.encoder, &mut rng, device, DType::F32)?;
        let optimizer = Adam::new(encoder.trainable().to_vec(), config.learning_rate)?;
        let tables = Tables::new(config.model_kind, inputs, config.encoder.embedding_size, config.seed);
        Ok(Self { encoder, tables, optimizer, rng, epoch: 0, history: EpochHistory::default(), cursor: None })
    }
}
