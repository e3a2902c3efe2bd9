//! The version `latest.json` names, scored on this run's held-out listens: what the quality gate
//! compares this run's version against.

use std::collections::HashMap;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use tracing::info;

use super::BlockingRun;
use crate::data::Dataset;
use crate::publish::store::StoreError;
use crate::publish::versions::{Latest, read_latest};
use crate::publish::{gate, layout};
use crate::training::trainer::Trainer;

impl BlockingRun {
    /// The version `latest.json` names, scored on this run's held-out pairs: its published
    /// embeddings, matched to this catalogue by track id (tracks it does not know rank last).
    /// `None` for a model's first version, or when the latest is this run's own (a retried publish).
    pub(super) fn score_current(
        &self,
        trainer: &Trainer,
        dataset: &Dataset,
    ) -> anyhow::Result<Option<gate::CurrentScore>> {
        let Some(latest) = self.other_latest()? else { return Ok(None) };
        let get = |name: &str| self.version_file(&latest.version, name);
        let metadata = self.version_metadata(&latest.version)?;
        let ids: Vec<&str> =
            metadata["track_ids"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
        let tensors = candle_core::safetensors::load_buffer(&get(layout::EMBEDDINGS)?, &Device::Cpu)?;
        let old = tensors.get("embeddings").context("the current version's embeddings file has no `embeddings`")?;
        let (rows, dim) = old.dims2()?;
        anyhow::ensure!(rows == ids.len(), "the current version has {rows} embeddings for {} track ids", ids.len());
        let old: Vec<f32> = old.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let row_of: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let n = dataset.catalogue.len();
        let (mut matched, mut known) = (vec![0f32; n * dim], vec![false; n]);
        for (j, id) in dataset.catalogue.track_ids.iter().enumerate() {
            if let Some(&i) = row_of.get(id.as_str()) {
                matched[j * dim..(j + 1) * dim].copy_from_slice(&old[i * dim..(i + 1) * dim]);
                known[j] = true;
            }
        }
        let embeddings = Tensor::from_vec(matched, (n, dim), &Device::Cpu)?;
        let metrics = trainer.evaluate_known(&embeddings, &known)?;
        let known_tracks = known.iter().filter(|k| **k).count();
        info!(
            current_version = %latest.version,
            recall_at_10 = metrics.recall_at_10,
            known_tracks,
            "the current version scored on this run's held-out listens"
        );
        Ok(Some(gate::CurrentScore { version: latest.version, metrics, known_tracks }))
    }
}

impl BlockingRun {
    /// The version `latest.json` names, unless there is none or it is this run's own (a publish
    /// retried after it advanced `latest.json`): what this run is compared with.
    pub(super) fn other_latest(&self) -> anyhow::Result<Option<Latest>> {
        let m = &self.record;
        let latest = self.runtime.block_on(read_latest(&self.store, &m.model))?;
        Ok(latest.filter(|l| l.version != m.version))
    }

    /// A published version's metadata, parsed once per run: the gate, the neighbour comparison and
    /// a warm start all read the latest version's, whose `track_ids` make it megabytes.
    pub(super) fn version_metadata(&self, version: &str) -> anyhow::Result<std::sync::Arc<serde_json::Value>> {
        let mut cached = self.published_metadata.lock().expect("the metadata cache is never poisoned");
        if let Some((_, metadata)) = cached.as_ref().filter(|(v, _)| v == version) {
            return Ok(metadata.clone());
        }
        let metadata: std::sync::Arc<serde_json::Value> = std::sync::Arc::new(
            serde_json::from_slice(&self.version_file(version, layout::METADATA)?)
                .with_context(|| format!("version {version}'s metadata"))?,
        );
        *cached = Some((version.to_string(), metadata.clone()));
        Ok(metadata)
    }

    /// One file of a published version of this run's model.
    pub(super) fn version_file(&self, version: &str, name: &str) -> Result<bytes::Bytes, StoreError> {
        self.runtime.block_on(self.store.get(&layout::version_object(&self.record.model, version, name)))
    }
}
