//! How a run ended, and what the ledger and the worker's announcement say of each ending.

use std::collections::BTreeMap;

use serde_json::json;

use crate::db::ledger;
use crate::publish::artifacts::ModelMetadata;
use crate::publish::gate;
use crate::system::procstat::human;
use crate::training::resources::{MemoryBudget, MemoryEstimate};

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// All epochs done and the version's artifacts written.
    Published(Box<Published>),
    /// Stopped on request after `epochs_completed` epochs; `--resume <run_id>` continues it.
    Stopped { run_id: String, epochs_completed: usize },
    /// The data is below the minimum sizes; nothing was trained.
    InsufficientData { run_id: String, reason: String },
    /// Trained, but the quality gate kept the current version; nothing was uploaded.
    Rejected(Box<RejectedVersion>),
    /// The run would need more memory than the budget; nothing was trained. Retrying cannot help.
    ResourceLimit(Box<ResourceRefusal>),
}

/// A run refused before training because its estimated peak memory exceeds the budget.
#[derive(Debug, Clone)]
pub struct ResourceRefusal {
    pub run_id: String,
    pub estimate: MemoryEstimate,
    pub budget: MemoryBudget,
}

impl ResourceRefusal {
    pub fn reason(&self) -> String {
        format!(
            "estimated peak memory {} (data and process {}, training step {}, validation {}, evaluation and export {}) exceeds the worker's memory budget {} ({}); lower params.batch_size or raise WORKER_MEMORY_LIMIT",
            human(self.estimate.peak_bytes),
            human(self.estimate.in_use_bytes),
            human(self.estimate.train_step_bytes),
            human(self.estimate.validation_bytes),
            human(self.estimate.evaluate_and_export_bytes),
            human(self.budget.bytes),
            self.budget.source.as_str(),
        )
    }
}

/// A version the quality gate refused.
#[derive(Debug)]
pub struct RejectedVersion {
    pub run_id: String,
    pub version: String,
    pub reason: String,
    pub metadata: ModelMetadata,
    /// Every check, the figures it compared, and the current version's score on this run's
    /// held-out listens.
    pub gate: gate::GateReport,
}

/// A published version.
#[derive(Debug)]
pub struct Published {
    pub run_id: String,
    pub version: String,
    pub metadata: ModelMetadata,
    /// Artifact name → full URL (`manifest` included).
    pub artifacts: BTreeMap<String, String>,
    /// URL of the version's folder.
    pub location: String,
    pub manifest_sha256: String,
    /// Whether `latest.json` names this version now.
    pub is_latest: bool,
}

impl RunOutcome {
    /// The run's final state, as the ledger (`training_runs.status`) and the coordination table
    /// (`run_jobs.state`) both spell it.
    pub fn status(&self) -> ledger::RunStatus {
        match self {
            RunOutcome::Published(_) => ledger::RunStatus::Succeeded,
            RunOutcome::Rejected(_) => ledger::RunStatus::Rejected,
            RunOutcome::InsufficientData { .. } => ledger::RunStatus::InsufficientData,
            RunOutcome::ResourceLimit(_) => ledger::RunStatus::Failed,
            RunOutcome::Stopped { .. } => ledger::RunStatus::Stopped,
        }
    }

    /// Why no version was published (none for a published or a stopped run).
    pub fn reason(&self) -> Option<String> {
        match self {
            RunOutcome::Published(_) | RunOutcome::Stopped { .. } => None,
            RunOutcome::Rejected(r) => Some(r.reason.clone()),
            RunOutcome::InsufficientData { reason, .. } => Some(reason.clone()),
            RunOutcome::ResourceLimit(r) => Some(r.reason()),
        }
    }

    /// What the ledger records of this outcome besides its status: the data, the figures, where
    /// the version lives, and the reason when nothing was published.
    pub fn ledger_end(&self) -> anyhow::Result<ledger::RunEnd> {
        let figures = |m: &ModelMetadata, gate: serde_json::Value| {
            Some(json!({"final": m.final_metrics, "baselines": m.baselines, "quality_gate": gate}))
        };
        Ok(match self {
            RunOutcome::Published(p) => ledger::RunEnd {
                data_watermark_ms: p.metadata.data.watermark.newest_interaction_ms,
                interaction_count: Some(p.metadata.data.watermark.interactions as i64),
                counts: Some(serde_json::to_value(&p.metadata.data)?),
                metrics: figures(&p.metadata, serde_json::to_value(&p.metadata.quality_gate)?),
                artifact_location: Some(p.location.clone()),
                error: None,
            },
            RunOutcome::Rejected(r) => ledger::RunEnd {
                metrics: figures(&r.metadata, serde_json::to_value(&r.gate)?),
                error: self.reason(),
                ..Default::default()
            },
            _ => ledger::RunEnd { error: self.reason(), ..Default::default() },
        })
    }
}
