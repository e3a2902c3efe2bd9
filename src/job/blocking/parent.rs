//! The parent of a warm run: the version its plan names, read back from the store.

use anyhow::Context;
use tracing::{info, warn};

use super::BlockingRun;
use crate::publish::lineage::{TrainingMode, parent_model};
use crate::publish::store::StoreError;
use crate::publish::versions::trained_version;
use crate::publish::{artifacts, layout};
use crate::training::checkpoint;
use crate::training::warm::{ParentModel, ParentOptimizer};

impl BlockingRun {
    /// The parent model of a warm run or a refresh (`None` for a full run); a refresh also reads the
    /// parent's published embeddings. Versions are immutable, so a resumed run reads the same parent;
    /// one deleted by retention since is an error that says so.
    pub(super) fn warm_parent(&self) -> anyhow::Result<Option<ParentModel>> {
        let Some(plan) = self.record.lineage.as_ref().filter(|l| l.mode != TrainingMode::Full) else {
            return Ok(None);
        };
        let version = plan.parent_version.as_deref().context("a warm plan names its parent")?;
        let get = |name: &str| {
            self.version_file(version, name).with_context(|| format!("reading {name} of the parent version {version}"))
        };
        let metadata = self.version_metadata(version)?;
        let vocabularies = match self.version_file(version, artifacts::VOCABULARIES) {
            Ok(bytes) => Some(serde_json::from_slice::<serde_json::Value>(&bytes)?),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let embeddings = match plan.mode {
            TrainingMode::Refresh => Some(get(layout::EMBEDDINGS)?),
            _ => None,
        };
        let parent =
            parent_model(version, &get(layout::WEIGHTS)?, &metadata, vocabularies.as_ref(), embeddings.as_deref())?;
        info!(parent = version, tables = parent.tables.len(), "parent version loaded for a warm start");
        Ok(Some(parent))
    }

    /// The optimiser state a warm run carries over (`--warm-optimizer carried`): the checkpoint of
    /// the epoch whose weights the parent published, from the run that trained them — the parent's
    /// own run, or for a refresh (which trains nothing) that of the nearest trained ancestor. `None`
    /// when the run starts Adam fresh, or when that checkpoint is gone (retention keeps it only
    /// while its weights are the latest's; a warning says so and Adam starts fresh).
    pub(super) fn parent_optimizer(&self) -> anyhow::Result<Option<ParentOptimizer>> {
        let Some(plan) = self.record.lineage.as_ref().filter(|l| l.mode == TrainingMode::Warm && l.carry_optimizer)
        else {
            return Ok(None);
        };
        let parent = plan.parent_version.as_deref().context("a warm plan names its parent")?;
        let (version, metadata) = self.runtime.block_on(trained_version(&self.store, &self.record.model, parent))?;
        let run_id = metadata["run_id"].as_str().with_context(|| format!("version {version} names no run"))?;
        let epoch = metadata["best_epoch"].as_u64().with_context(|| format!("version {version} has no best_epoch"))?;
        let model = &self.record.model;
        let keys = self.runtime.block_on(self.store.list(&layout::checkpoints_dir(model, run_id)))?;
        let Some(key) =
            keys.iter().find(|k| k.rsplit('/').next().and_then(checkpoint::position_of) == Some((epoch as usize, 0)))
        else {
            warn!(
                version,
                run_id, epoch, "the checkpoint that trained the parent's weights is gone; Adam starts fresh"
            );
            return Ok(None);
        };
        let bytes = self.runtime.block_on(self.store.get(key))?;
        let table_keys = match metadata["model_type"] == artifacts::MODEL_TYPE {
            true => Vec::new(),
            false => {
                let vocabularies = match self.version_file(&version, artifacts::VOCABULARIES) {
                    Ok(bytes) => Some(serde_json::from_slice::<serde_json::Value>(&bytes)?),
                    Err(StoreError::NotFound { .. }) => None,
                    Err(e) => return Err(e.into()),
                };
                let weights = self.version_file(&version, layout::WEIGHTS)?;
                let trained = parent_model(&version, &weights, &metadata, vocabularies.as_ref(), None)?;
                trained.tables.into_iter().map(|t| (t.name, t.keys)).collect()
            }
        };
        let origin = format!("run {run_id}'s epoch {epoch} (version {version})");
        info!(from = %origin, "warm start carries the optimiser state over");
        Ok(Some(ParentOptimizer { origin, checkpoint: bytes.to_vec(), table_keys }))
    }
}
