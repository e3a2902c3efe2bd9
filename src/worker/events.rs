//! The bodies of the events the worker announces. Event ids are UUIDv5 (namespace URL) of a name
//! fixed by what is announced, so re-publishing a version — after a crash, or for requests it
//! already covers — reuses its id and consumers can dedupe on it.

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::db::coord::EventDraft;
use crate::job::{Published, Rejected};

pub const SCHEMA_VERSION: u64 = 1;

/// `model-ready/{model}/{version}` → the version's event id.
pub fn model_ready_id(model: &str, version: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("model-ready/{model}/{version}").as_bytes())
}

pub fn model_rejected_id(model: &str, version: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("model-rejected/{model}/{version}").as_bytes())
}

pub fn model_failed_id(run_id: Uuid) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("model-failed/{run_id}").as_bytes())
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `model-ready.<model>` for a published version (`satisfies` is filled in by the outbox writer).
pub fn model_ready(p: &Published) -> EventDraft {
    let m = &p.metadata;
    let event_id = model_ready_id(&m.model_name, &p.version);
    let artifact = |name: &str| p.artifacts.get(name).cloned().unwrap_or_default();
    let body = json!({
        "schema_version": SCHEMA_VERSION,
        "event_id": event_id.to_string(),
        "model": m.model_name,
        "version": p.version,
        "run_id": p.run_id,
        "created_at": m.training_date_rfc3339(),
        "artifacts": {
            "keras": artifact(crate::storage::layout::KERAS),
            "metadata": artifact(crate::storage::layout::METADATA),
            "weights": artifact(crate::storage::layout::WEIGHTS),
            "embeddings": artifact(crate::storage::layout::EMBEDDINGS),
            "tfjs": artifact(crate::storage::layout::TFJS_MODEL),
            "manifest": artifact("manifest"),
            "model_card": artifact(crate::storage::layout::MODEL_CARD),
        },
        "manifest_sha256": p.manifest_sha256,
        // Whether latest.json names this version now (false: a newer version was already latest).
        "latest": p.is_latest,
        "metrics": metrics_json(m),
        "data": {
            "newest_interaction_at": m.data.watermark.newest_interaction_at,
            "interactions": m.data.watermark.interactions,
            "tracks": m.data.num_tracks,
            "users": m.data.num_users,
            "synthetic": m.data.synthetic,
        },
        "satisfies": [],
    });
    EventDraft { event_id, routing_key: format!("model-ready.{}", m.model_name), body }
}

fn metrics_json(m: &crate::artifacts::ModelMetadata) -> Value {
    json!({
        "recall_at_10": m.final_metrics.recall_at_10,
        "ndcg_at_10": m.final_metrics.ndcg_at_10,
        "baselines": {
            "raw_features": {"recall_at_10": m.baselines.raw_features.recall_at_10, "ndcg_at_10": m.baselines.raw_features.ndcg_at_10},
            "popularity": {"recall_at_10": m.baselines.popularity.recall_at_10, "ndcg_at_10": m.baselines.popularity.ndcg_at_10},
        },
    })
}

/// `model-rejected.<model>`: the quality gate kept the current version.
pub fn model_rejected(model: &str, r: &Rejected) -> EventDraft {
    let event_id = model_rejected_id(model, &r.version);
    let body = json!({
        "schema_version": SCHEMA_VERSION,
        "event_id": event_id.to_string(),
        "model": model,
        "version": r.version,
        "run_id": r.run_id,
        "created_at": now(),
        "reason": r.reason,
        "metrics": metrics_json(&r.metadata),
        "current_version": r.current_version,
        "current_metrics": r.current_metrics,
        "tolerance": r.tolerance,
        "satisfies": [],
    });
    EventDraft { event_id, routing_key: format!("model-rejected.{model}"), body }
}

/// `model-failed.<model>`: the run failed for good (`outcome` `failed`) or found too little data
/// (`insufficient_data`).
pub fn model_failed(model: &str, run_id: Uuid, outcome: &str, error: &str, attempts: i32) -> EventDraft {
    let event_id = model_failed_id(run_id);
    let body = json!({
        "schema_version": SCHEMA_VERSION,
        "event_id": event_id.to_string(),
        "model": model,
        "run_id": run_id.to_string(),
        "created_at": now(),
        "outcome": outcome,
        "error": error,
        "attempts": attempts,
        "satisfies": [],
    });
    EventDraft { event_id, routing_key: format!("model-failed.{model}"), body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_per_version_and_distinct_per_kind() {
        assert_eq!(model_ready_id("content-based", "v1"), model_ready_id("content-based", "v1"));
        assert_ne!(model_ready_id("content-based", "v1"), model_ready_id("content-based", "v2"));
        assert_ne!(model_ready_id("content-based", "v1"), model_rejected_id("content-based", "v1"));
        assert_eq!(model_ready_id("content-based", "v1").get_version_num(), 5);
    }
}
