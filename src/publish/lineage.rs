//! A version's lineage: whether it was trained from scratch (a full retrain) or warm-started from
//! its parent, why, and how far it is from the last full retrain. Recorded in the metadata, so the
//! next run can decide from the version `latest.json` names alone.

use serde::{Deserialize, Serialize};

use crate::training::warm::CarriedOver;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingMode {
    /// From a seeded initialisation, with standardisation fitted on this catalogue: a new lineage.
    Full,
    /// From the parent version's weights, with the lineage's standardisation.
    Warm,
    /// No training: the parent's weights embed the tracks added since it; the others' rows are the
    /// parent's, bit for bit.
    Refresh,
}

/// What a run decided before training (kept in its `run.json`, so a resumed run decides nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineagePlan {
    pub mode: TrainingMode,
    /// Why, in words: the trigger of a full retrain, or what made the warm start possible.
    pub reason: String,
    /// The version `latest.json` named when the run decided (a warm run's parent).
    pub parent_version: Option<String>,
    /// The lineage's last full version (`None` for a full run: it is its own base).
    pub base_version: Option<String>,
    /// The newest interaction the base version trained on, in ms since the epoch.
    pub base_watermark_ms: Option<i64>,
    /// Versions since the last full retrain, this one included (0 for a full retrain).
    pub versions_since_full: usize,
    /// Epochs the lineage trained since its last full retrain, before this run.
    pub epochs_before: usize,
    /// Share of this run's timestamped interactions newer than the base's watermark (the drift
    /// measure), when there was a base to compare with.
    pub new_interaction_share: Option<f64>,
    /// A warm run starts Adam from the parent's training run's state (`--warm-optimizer carried`)
    /// instead of fresh.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub carry_optimizer: bool,
}

/// The metadata's record: the plan, and what the run then did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    #[serde(flatten)]
    pub plan: LineagePlan,
    /// Epochs trained since the last full retrain, this run's included.
    pub epochs_since_full: usize,
    /// Warm runs: rows copied from the parent and rows new to this version, per table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub carried_over: Vec<CarriedOver>,
    /// Refreshes: tracks embedded for the first time (the rest are the parent's rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_tracks: Option<usize>,
    /// Warm runs that carried the optimiser over: where its state came from, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_from: Option<String>,
}

/// A published version's model read back from its files, for a warm start: `weights.safetensors`,
/// the metadata (standardisation, track ids) and, for the table kinds, `vocabularies.json`.
pub fn parent_model(
    version: &str,
    weights: &[u8],
    metadata: &serde_json::Value,
    vocabularies: Option<&serde_json::Value>,
    embeddings: Option<&[u8]>,
) -> anyhow::Result<crate::training::warm::ParentModel> {
    use crate::training::warm::{ParentModel, ParentTable};
    use anyhow::Context;
    let floats = |key: &str| -> anyhow::Result<[f32; crate::data::features::NUM_FEATURES]> {
        let v: Vec<f32> = serde_json::from_value(metadata[key].clone())
            .with_context(|| format!("version {version}'s metadata has no {key}"))?;
        v.try_into().map_err(|v: Vec<f32>| anyhow::anyhow!("version {version}'s {key} has {} values", v.len()))
    };
    let standardizer =
        crate::data::features::Standardizer { means: floats("feature_means")?, stds: floats("feature_stds")? };
    let tensors = candle_core::safetensors::load_buffer(weights, &candle_core::Device::Cpu)?;
    let names = |table: &str| -> anyhow::Result<Vec<String>> {
        let vocab = vocabularies.with_context(|| format!("version {version} has no vocabularies.json"))?;
        let names: Vec<String> = serde_json::from_value(vocab[table]["names"].clone())
            .with_context(|| format!("version {version}'s vocabularies have no {table}"))?;
        Ok(std::iter::once(String::new()).chain(names).collect())
    };
    let track_ids: Vec<String> = serde_json::from_value(metadata["track_ids"].clone())
        .with_context(|| format!("version {version}'s metadata has no track_ids"))?;
    let mut tables = Vec::new();
    for (name, values) in tensors.iter().filter_map(|(n, t)| n.strip_suffix(".embeddings").map(|n| (n, t))) {
        let keys = match name {
            "track_embedding" => track_ids.clone(),
            "artist_embedding" => names("artists")?,
            "album_embedding" => names("albums")?,
            other => anyhow::bail!("version {version} has an unknown table {other}"),
        };
        let (rows, dim) = values.dims2()?;
        anyhow::ensure!(keys.len() == rows, "version {version}'s {name} has {rows} rows for {} keys", keys.len());
        tables.push(ParentTable { name: name.to_string(), keys, dim, values: values.flatten_all()?.to_vec1()? });
    }
    let encoder: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.into_iter().filter(|(n, _)| !n.ends_with(".embeddings")).collect();
    let published = match embeddings {
        None => None,
        Some(bytes) => {
            let t = candle_core::safetensors::load_buffer(bytes, &candle_core::Device::Cpu)?;
            let e = t
                .get("embeddings")
                .with_context(|| format!("version {version}'s embeddings file has no `embeddings`"))?;
            let (rows, dim) = e.dims2()?;
            anyhow::ensure!(
                rows == track_ids.len(),
                "version {version} has {rows} embeddings for {} tracks",
                track_ids.len()
            );
            Some((dim, e.flatten_all()?.to_vec1()?))
        }
    };
    Ok(ParentModel {
        version: version.to_string(),
        standardizer,
        encoder: (!encoder.is_empty()).then_some(encoder),
        tables,
        track_ids,
        published,
    })
}
