//! Where each object of a model lives, relative to the store root.
//!
//! ```text
//! <model>/latest.json                                  the version model servers should load
//! <model>/versions/<version>/…                         one immutable folder per version
//! <model>/versions/<version>/manifest.json             written after every other file of the version
//! <model>/runs/<run-id>/run.json                       a run's settings
//! <model>/runs/<run-id>/checkpoints/epoch-NNNN.safetensors
//! ```

/// The metadata file name the platform already uses.
pub const METADATA: &str = "content-based-model-metadata.json";
pub const WEIGHTS: &str = "weights.safetensors";
pub const EMBEDDINGS: &str = "embeddings.safetensors";
pub const NEIGHBOURS: &str = "neighbours.safetensors";
pub const KERAS: &str = "content-based-model.keras";
pub const TFJS_MODEL: &str = "tfjs/model.json";
pub const MODEL_CARD: &str = "MODEL_CARD.md";
pub const MANIFEST: &str = "manifest.json";
pub const RUN_MANIFEST: &str = "run.json";
pub const LATEST: &str = "latest.json";

pub fn latest(model: &str) -> String {
    format!("{model}/{LATEST}")
}

pub fn versions_dir(model: &str) -> String {
    format!("{model}/versions")
}

pub fn version_dir(model: &str, version: &str) -> String {
    format!("{model}/versions/{version}")
}

pub fn version_object(model: &str, version: &str, name: &str) -> String {
    format!("{}/{name}", version_dir(model, version))
}

pub fn runs_dir(model: &str) -> String {
    format!("{model}/runs")
}

pub fn run_dir(model: &str, run_id: &str) -> String {
    format!("{model}/runs/{run_id}")
}

pub fn run_record(model: &str, run_id: &str) -> String {
    format!("{}/{RUN_MANIFEST}", run_dir(model, run_id))
}

pub fn checkpoints_dir(model: &str, run_id: &str) -> String {
    format!("{}/checkpoints", run_dir(model, run_id))
}

pub fn checkpoint(model: &str, run_id: &str, epoch: usize) -> String {
    format!("{}/{}", checkpoints_dir(model, run_id), crate::training::checkpoint::file_name(epoch))
}

/// The key of a checkpoint by its file name (complete or partial).
pub fn checkpoint_named(model: &str, run_id: &str, file_name: &str) -> String {
    format!("{}/{file_name}", checkpoints_dir(model, run_id))
}
