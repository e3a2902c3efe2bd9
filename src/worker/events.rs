//! The bodies of the events the worker announces. Event ids are UUIDv5 (namespace URL) of a name
//! fixed by what is announced, so re-publishing a version — after a crash, or for requests it
//! already covers — reuses its id and consumers can dedupe on it.

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::db::coord::{Claim, EventDraft};
use crate::job::{Published, RejectedVersion, ResourceRefusal};

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
    let mut body = json!({
        "schema_version": SCHEMA_VERSION,
        "event_id": event_id.to_string(),
        "model": m.model_name,
        "kind": m.model_type,
        "version": p.version,
        "run_id": p.run_id,
        "created_at": m.training_date_rfc3339(),
        "artifacts": {
            "keras": artifact(crate::publish::layout::KERAS),
            "metadata": artifact(crate::publish::layout::METADATA),
            "weights": artifact(crate::publish::layout::WEIGHTS),
            "embeddings": artifact(crate::publish::layout::EMBEDDINGS),
            "tfjs": artifact(crate::publish::layout::TFJS_MODEL),
            "manifest": artifact("manifest"),
            "model_card": artifact(crate::publish::layout::MODEL_CARD),
        },
        "manifest_sha256": p.manifest_sha256,
        // Whether latest.json names this version now (false: a newer version was already latest).
        "latest": p.is_latest,
        "metrics": metrics_json(m),
        "data": {
            "newest_interaction_at": m.data.watermark.newest_interaction_at,
            "interactions": m.data.watermark.interactions,
            // The catalogue's pin (the newest "Track"."createdAt" the run read, ms since the Unix
            // epoch): the refresh timer compares it with the catalogue. Null for synthetic data.
            "newest_track_created_ms": m.data.watermark.newest_track_created_ms,
            "tracks": m.data.num_tracks,
            "users": m.data.num_users,
            "synthetic": m.data.synthetic,
        },
        "satisfies": [],
    });
    // The table kinds' vocabularies (artist and album rows; which identity rows are learned).
    if let Some(url) = p.artifacts.get(crate::publish::artifacts::VOCABULARIES) {
        body["artifacts"]["vocabularies"] = json!(url);
    }
    if let Some(l) = &m.lineage {
        body["lineage"] = json!({
            "mode": l.plan.mode,
            "parent_version": l.plan.parent_version,
            "reason": l.plan.reason,
            "versions_since_full": l.plan.versions_since_full,
        });
    }
    // The similar-tracks table (absent when the run asked for none), and how far it moved.
    if let Some(url) = p.artifacts.get(crate::publish::layout::NEIGHBOURS) {
        body["artifacts"]["neighbours"] = json!(url);
    }
    if let Some(n) = &m.neighbours {
        body["neighbours"] = json!({
            "k": n.k,
            "method": n.method,
            "parent_version": n.parent_version,
            "jaccard_at_10_vs_parent": n.jaccard_at_10_vs_parent,
        });
    }
    EventDraft { event_id, routing_key: format!("model-ready.{}", m.model_name), body }
}

/// The version's held-out figures and the baselines' on the same listens, with standard errors.
fn metrics_json(m: &crate::publish::artifacts::ModelMetadata) -> Value {
    let pick = |r: &crate::training::eval::RankingMetrics| json!({"recall_at_10": r.recall_at_10, "recall_at_10_se": r.recall_at_10_se, "ndcg_at_10": r.ndcg_at_10});
    let b = &m.baselines;
    let mut metrics = json!({
        "recall_at_10": m.final_metrics.recall_at_10,
        "recall_at_10_se": m.final_metrics.recall_at_10_se,
        "ndcg_at_10": m.final_metrics.ndcg_at_10,
        "heldout_pairs": m.final_metrics.heldout,
        "holdout": m.data.holdout.kind.as_str(),
        "best_epoch": m.best_epoch,
        "epochs_trained": m.epochs_completed,
        "stop_reason": m.stop_reason,
        "baselines": {
            "random": pick(&b.random),
            "popularity": pick(&b.popularity),
            "raw_features": pick(&b.raw_features),
            "item_cf": pick(&b.item_cf),
            "shared_artist": pick(&b.shared_artist),
            "shared_album": pick(&b.shared_album),
        },
    });
    if let Some(cold) = &b.cold {
        let mut section = json!({"baselines": {
            "raw_features": pick(&cold.raw_features),
            "shared_artist": pick(&cold.shared_artist),
            "shared_album": pick(&cold.shared_album),
            "random": pick(&cold.random),
        }});
        if let Some(model) = &m.final_cold_metrics {
            section["model"] = pick(model);
        }
        metrics["cold"] = section;
    }
    metrics
}

/// `model-rejected.<model>`: the quality gate kept the current version.
pub fn model_rejected(model: &str, r: &RejectedVersion) -> EventDraft {
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
        // The current version scored on this run's held-out listens (null for a first version).
        "current_version": r.gate.current.as_ref().map(|c| c.version.clone()),
        "current_metrics": r.gate.current.as_ref().map(|c| json!({
            "recall_at_10": c.metrics.recall_at_10,
            "recall_at_10_se": c.metrics.recall_at_10_se,
            "ndcg_at_10": c.metrics.ndcg_at_10,
            "heldout_pairs": c.metrics.heldout,
            "known_tracks": c.known_tracks,
        })),
        "tolerance": r.gate.settings.tolerance,
        "failed_checks": r.gate.failed().map(|c| c.name.clone()).collect::<Vec<_>>(),
        "quality_gate": r.gate,
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

/// `model-failed.<model>` for a run refused because it needs more memory than the worker's budget:
/// the estimate and the budget travel with it, so the caller can size its next request.
pub fn model_over_budget(model: &str, claim: &Claim, refusal: &ResourceRefusal) -> EventDraft {
    let mut event = model_failed(model, claim.run_id, "resource_limit", &refusal.reason(), claim.attempt);
    event.body["estimate"] = serde_json::to_value(&refusal.estimate).unwrap_or_default();
    event.body["estimate_bytes"] = refusal.estimate.peak_bytes.into();
    event.body["budget_bytes"] = refusal.budget.bytes.into();
    event.body["budget_source"] = refusal.budget.source.as_str().into();
    event
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
