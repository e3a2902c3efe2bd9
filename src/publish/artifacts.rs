//! The files of a model version: final weights, precomputed track embeddings, and the metadata JSON
//! (a superset of the platform's `content-based-model-metadata.json`).
//!
//! - `weights.safetensors`: one f32 tensor per name in [`crate::training::model::PARAM_NAMES`], in Keras
//!   layouts: `batch_normalization.{gamma,beta,moving_mean,moving_variance}` `[11]`,
//!   `dense.kernel` `[11, 2E]`, `dense.bias` `[2E]`, `dense_1.kernel` `[2E, E]`, `dense_1.bias` `[E]`,
//!   `dense_2.kernel` `[E, E]`, `dense_2.bias` `[E]` (kernels are `[in, out]`: `y = x·K + b`).
//! - `embeddings.safetensors`: tensor `embeddings` `[num_tracks, E]` f32, row `i` the L2-normalised
//!   inference embedding of `track_ids[i]`.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::Watermark;
use crate::data::features::{FEATURE_NAMES, Standardizer};
use crate::data::source::DataSource;
use crate::training::eval::RankingMetrics;
use crate::training::model::{BN_EPSILON, BN_MOMENTUM, Encoder, EncoderConfig, ModelKind};
use crate::training::pairs::MiningStats;
use crate::training::trainer::{Baselines, EpochHistory, TrainConfig};

/// The platform's `model_type`.
pub const MODEL_TYPE: &str = ModelKind::ContentBased.as_str();
/// This crate's version, recorded in every artifact.
pub const TRAINER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the training data was, and how much of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataSummary {
    pub source: DataSource,
    /// True when the data was generated in-process rather than read from the platform.
    pub synthetic: bool,
    pub num_tracks: usize,
    pub num_users: usize,
    pub num_interactions: usize,
    pub mining: MiningStats,
    pub training_user_tracks: usize,
    pub heldout_user_tracks: usize,
    /// How the held-out listens were chosen (absent before time-ordered hold-outs: random).
    #[serde(default)]
    pub holdout: crate::training::trainer::HoldoutSummary,
    pub watermark: Watermark,
}

/// `content-based-model-metadata.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub model_type: String,
    pub model_name: String,
    pub model_version: String,
    pub run_id: String,
    /// UTC, in the platform's format (`2025-03-14T16:24:27.112054`).
    pub training_date: String,
    pub feature_names: Vec<String>,
    pub feature_means: Vec<f32>,
    pub feature_stds: Vec<f32>,
    /// Row `i` of the embeddings is `track_ids[i]`.
    pub track_ids: Vec<String>,
    pub num_tracks: usize,
    pub embedding_size: usize,
    pub training_history: EpochHistory,
    /// The published (best) epoch's held-out ranking metrics.
    pub final_metrics: RankingMetrics,
    pub baselines: Baselines,
    pub architecture: serde_json::Value,
    pub hyperparameters: TrainConfig,
    pub loss: String,
    pub data: DataSummary,
    pub device: String,
    pub seed: u64,
    pub trainer_version: String,
    /// Epochs trained (the run may have stopped early; see `stop_reason`).
    pub epochs_completed: usize,
    /// The epoch whose weights these are: the best validation Recall@10 (`final_metrics` are its).
    /// 0 in versions published before best-epoch selection (their weights are the last epoch's).
    #[serde(default)]
    pub best_epoch: usize,
    /// Why training ended: `max_epochs` or `early_stopping`.
    #[serde(default)]
    pub stop_reason: crate::training::trainer::StopReason,
    /// The quality gate's verdict on this version (absent before the gate had floors).
    #[serde(default)]
    pub quality_gate: Option<crate::publish::gate::GateReport>,
}

impl ModelMetadata {
    /// `training_date` (naive UTC, Keras's style) as RFC 3339.
    pub fn training_date_rfc3339(&self) -> String {
        chrono::NaiveDateTime::parse_from_str(&self.training_date, "%Y-%m-%dT%H:%M:%S%.f")
            .map(|t| t.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|_| self.training_date.clone())
    }
}

/// The layer stack, Keras-style, for the metadata.
pub fn architecture(config: &EncoderConfig) -> serde_json::Value {
    let e = config.embedding_size;
    json!({
        "input": {"features": FEATURE_NAMES.len(), "standardization": "z-score, population std, std 0 -> 1"},
        "layers": [
            {"type": "BatchNormalization", "momentum": BN_MOMENTUM, "epsilon": BN_EPSILON},
            {"type": "Dense", "units": 2 * e, "activation": "relu"},
            {"type": "Dropout", "rate": config.dropout},
            {"type": "Dense", "units": e, "activation": "relu"},
            {"type": "Dropout", "rate": config.dropout},
            {"type": "Dense", "units": e, "activation": "tanh"},
        ],
        "output": "L2-normalised embedding (UnitNormalization)",
        "siamese": "shared weights; both sides of a pair go through the encoder as one batch",
    })
}

/// The standardiser's columns as the metadata lists them.
pub fn feature_columns(s: &Standardizer) -> (Vec<String>, Vec<f32>, Vec<f32>) {
    (FEATURE_NAMES.iter().map(|s| s.to_string()).collect(), s.means.to_vec(), s.stds.to_vec())
}

/// `weights.safetensors` bytes.
pub fn weights_bytes(encoder: &Encoder, version: &str) -> anyhow::Result<Vec<u8>> {
    let tensors: Vec<(&str, Tensor)> = encoder
        .named_tensors()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), "audotics-weights/1".to_string()),
        ("model_version".to_string(), version.to_string()),
        ("embedding_size".to_string(), encoder.config.embedding_size.to_string()),
        ("feature_names".to_string(), FEATURE_NAMES.join(",")),
        ("layout".to_string(), "keras: dense kernels [in, out]".to_string()),
    ]);
    Ok(safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (*n, t)), Some(metadata))?)
}

/// `embeddings.safetensors` bytes from `[num_tracks, E]` normalised embeddings.
pub fn embeddings_bytes(embeddings: &Tensor, version: &str) -> anyhow::Result<Vec<u8>> {
    let host = embeddings.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
    let (n, e) = host.dims2()?;
    let metadata = HashMap::from([
        ("model_version".to_string(), version.to_string()),
        ("num_tracks".to_string(), n.to_string()),
        ("embedding_size".to_string(), e.to_string()),
        ("normalization".to_string(), "l2".to_string()),
    ]);
    Ok(safetensors::tensor::serialize([("embeddings", &host)], Some(metadata))?)
}
