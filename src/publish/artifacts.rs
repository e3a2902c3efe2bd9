//! The files of a model version: final weights, precomputed track embeddings, and the metadata JSON
//! (a superset of the platform's `content-based-model-metadata.json`).
//!
//! - `weights.safetensors`: one f32 tensor per name in [`crate::training::model::PARAM_NAMES`], in Keras
//!   layouts: `batch_normalization.{gamma,beta,moving_mean,moving_variance}` `[11]`,
//!   `dense.kernel` `[11, 2E]`, `dense.bias` `[2E]`, `dense_1.kernel` `[2E, E]`, `dense_1.bias` `[E]`,
//!   `dense_2.kernel` `[E, E]`, `dense_2.bias` `[E]` (kernels are `[in, out]`: `y = x·K + b`).
//! - `embeddings.safetensors`: tensor `embeddings` `[num_tracks, E]` f32, row `i` the L2-normalised
//!   inference embedding of `track_ids[i]`.
//! - `neighbours.safetensors`: each track's K most similar tracks by cosine ([`neighbours_bytes`]).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::Watermark;
use crate::data::features::{FEATURE_NAMES, Standardizer};
use crate::data::source::DataSource;
use crate::training::eval::RankingMetrics;
use crate::training::model::tables::Tables;
use crate::training::model::vocab::{OOV_ROW, TrackInputs};
use crate::training::model::{BN_EPSILON, BN_MOMENTUM, Encoder, EncoderConfig, ModelKind};
use crate::training::neighbours::{HnswSettings, Method, Neighbours};
use crate::training::pairs::MiningStats;
use crate::training::trainer::{Baselines, EpochHistory, TrainConfig};

/// The platform's `model_type` of the content kind.
pub const MODEL_TYPE: &str = ModelKind::ContentBased.as_str();
/// The vocabularies of a kind with tables: which name each artist and album row stands for.
pub const VOCABULARIES: &str = "vocabularies.json";
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
    /// The cold-track hold-out, when the run made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_holdout: Option<crate::training::trainer::ColdSummary>,
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
    /// The same epoch ranking only the cold tracks, when the run held some out (and the kind can
    /// embed a track without listens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_cold_metrics: Option<RankingMetrics>,
    /// Collaborative kind: how many tracks have a learned row (the others' embeddings are zeros;
    /// `vocabularies.json` lists which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_tracks: Option<usize>,
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
    /// Full retrain or warm start, and the distance from the last full retrain (absent in
    /// versions published before lineages were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<crate::publish::lineage::Lineage>,
    /// The similar-tracks table (`neighbours.safetensors`), absent when none was built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<NeighbourSummary>,
}

/// How the version's neighbour table was built and how much it moved since the parent version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeighbourSummary {
    /// Neighbours per track.
    pub k: usize,
    /// Tracks with at least one neighbour (the collaborative kind lists only learned tracks).
    pub tracks_listed: usize,
    pub seconds: f64,
    /// How the table was built: `exact` (versions before the option existed), or `hnsw`.
    #[serde(default)]
    pub method: Method,
    /// The HNSW graph's settings, when `method` is `hnsw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hnsw: Option<HnswSettings>,
    /// The version `latest.json` named when this one was built, if it had a neighbour table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<String>,
    /// Mean Jaccard similarity of each track's first 10 neighbours here and in the parent version,
    /// over the tracks both list (matched by track id): 1 means nothing changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jaccard_at_10_vs_parent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracks_compared: Option<usize>,
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

/// `weights.safetensors` of a kind with tables: the content encoder's tensors (hybrid) as in
/// [`weights_bytes`], and each table as `<table>.embeddings` `[rows, E]`.
pub fn weights_bytes_with_tables(
    kind: ModelKind,
    encoder: &Encoder,
    tables: &Tables,
    version: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    if kind.has_content() {
        for (n, t) in encoder.named_tensors() {
            tensors.push((n.to_string(), t.to_device(&Device::Cpu)?));
        }
    }
    for table in tables.tables.iter().flatten() {
        let t = Tensor::from_slice(&table.values, (table.rows, table.dim), &Device::Cpu)?;
        tensors.push((format!("{}.embeddings", table.name), t));
    }
    let metadata = HashMap::from([
        ("format".to_string(), "audotics-weights/1".to_string()),
        ("model_type".to_string(), kind.as_str().to_string()),
        ("model_version".to_string(), version.to_string()),
        ("embedding_size".to_string(), encoder.config.embedding_size.to_string()),
        ("feature_names".to_string(), FEATURE_NAMES.join(",")),
        ("layout".to_string(), "keras: dense kernels [in, out]; embedding tables [rows, E]".to_string()),
    ]);
    Ok(safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))?)
}

/// `vocabularies.json`: the artist and album vocabularies (row 0 is the out-of-vocabulary bucket,
/// `names[i]` is row `i + 1`), how to find a track's rows, and which identity rows are learned.
pub fn vocabularies_json(inputs: &TrackInputs, learned: Option<&[bool]>) -> serde_json::Value {
    json!({
        "format": "audotics-vocabularies/1",
        "artists": {"oov_row": OOV_ROW, "min_count": inputs.artists.min_count, "names": inputs.artists.names, "oov_names": inputs.artists.oov_names},
        "albums": {"oov_row": OOV_ROW, "min_count": inputs.albums.min_count, "names": inputs.albums.names, "oov_names": inputs.albums.oov_names},
        "track_rows": "row i of track_embedding is track_ids[i] of the metadata",
        "exported_model_inputs": "the .keras and TF.js models take row + 1 for every index input (artist_indices, album_index, track_index); 0 means none (padding, no album, a new track)",
        "max_artists": inputs.max_artists(),
        "learned_track_rows": learned.map(|l| l.iter().enumerate().filter(|(_, k)| **k).map(|(i, _)| i).collect::<Vec<_>>()),
    })
}

/// The architecture of a kind with tables, for the metadata.
pub fn architecture_of(
    kind: ModelKind,
    config: &EncoderConfig,
    tables: &crate::training::model::tables::TableConfig,
) -> serde_json::Value {
    let e = config.embedding_size;
    match kind {
        ModelKind::ContentBased => architecture(config),
        ModelKind::Collaborative => json!({
            "input": {"track_index": "row of the catalogue (metadata track_ids)"},
            "layers": [{"type": "Embedding", "name": "track_embedding", "output_dim": e}],
            "output": "L2-normalised embedding; tracks without training listens have no learned row (zeros)",
        }),
        ModelKind::Hybrid => json!({
            "inputs": {
                "features": "11 standardised audio features (feature_means / feature_stds)",
                "artist_indices": "padded artist rows (vocabularies.json; 0 = out of vocabulary), mean over present ones",
                "album_index": "album row (0 = out of vocabulary)",
                "track_index": "identity row (catalogue order); a new track has none",
            },
            "sum": [
                {"content": architecture(config)["layers"]},
                {"type": "Embedding", "name": "artist_embedding", "output_dim": e, "reduce": "mean"},
                {"type": "Embedding", "name": "album_embedding", "output_dim": e},
                {"type": "Embedding", "name": "track_embedding", "output_dim": e},
            ],
            "training_dropout": {"identity": tables.identity_dropout, "album": tables.album_dropout, "kind": "whole term, no rescaling"},
            "output": "L2-normalised sum (UnitNormalization)",
        }),
    }
}

/// `neighbours.safetensors` bytes: `indices` `[num_tracks, K]` u32 (rows of `track_ids`, padding
/// `u32::MAX`) and `cosines` `[num_tracks, K]` f32 (padding −∞), best first; see
/// [`crate::training::neighbours`] for the order.
pub fn neighbours_bytes(table: &Neighbours, version: &str) -> anyhow::Result<Vec<u8>> {
    let (n, k) = (table.num_tracks(), table.k);
    let indices = Tensor::from_slice(&table.indices, (n, k), &Device::Cpu)?;
    let cosines = Tensor::from_slice(&table.cosines, (n, k), &Device::Cpu)?;
    let metadata = HashMap::from([
        ("model_version".to_string(), version.to_string()),
        ("num_tracks".to_string(), n.to_string()),
        ("k".to_string(), k.to_string()),
        ("order".to_string(), "cosine descending, then track row ascending; never the track itself".to_string()),
        ("padding_index".to_string(), crate::training::neighbours::PADDING.to_string()),
    ]);
    Ok(safetensors::tensor::serialize([("indices", &indices), ("cosines", &cosines)], Some(metadata))?)
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
