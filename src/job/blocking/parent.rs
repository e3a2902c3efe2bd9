//! The parent of a warm run: the version its plan names, read back from the store.

use anyhow::Context;
use tracing::info;

use super::BlockingRun;
use crate::publish::lineage::{TrainingMode, parent_model};
use crate::publish::store::StoreError;
use crate::publish::{artifacts, layout};
use crate::training::warm::ParentModel;

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
}
