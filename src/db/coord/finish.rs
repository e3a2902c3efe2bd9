//! Ending a run in one transaction: its state, every answer, the outbox event, and for a published
//! version the model's newest version.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Row};

use super::lease::Claim;
use super::requests::{EventDraft, answer_with_version, insert_answers};

/// How a run ended, for [`finish`].
#[derive(Debug, Clone)]
pub struct Finish {
    /// `succeeded`, `rejected`, `failed` or `insufficient_data`.
    pub state: &'static str,
    /// `model-ready`, `model-rejected` or `model-failed`.
    pub answer: &'static str,
    pub version: Option<String>,
    pub error: Option<String>,
    pub event: EventDraft,
    /// Set when a version was published: it becomes the model's newest version.
    pub published: Option<NewestVersion>,
}

/// What the model's newest-version row records of a published version.
#[derive(Debug, Clone)]
pub struct NewestVersion {
    pub data_watermark: Option<DateTime<Utc>>,
    pub recall_at_10: f64,
}

/// Ends the run: its state, the answer to every request it claimed, the outbox event, and — for a
/// published version — the model's newest version (which also answers pending requests it covers).
/// Returns `false` (and changes nothing) when the lease is no longer ours.
pub async fn finish(pool: &PgPool, claim: &Claim, finish: Finish) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE audotics_trainer.run_jobs
         SET state = $3, finished_at = now(), version = $4, last_error = $5,
             lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
         WHERE run_id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(claim.run_id)
    .bind(claim.token)
    .bind(finish.state)
    .bind(&finish.version)
    .bind(&finish.error)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(false);
    }
    // The ledger's row ends with the run, whoever ends it: an attempt that failed before it reached
    // the ledger (the store refused it, say) after one that was taken over mid-run would otherwise
    // leave the row `running` for ever, overlapping every later run of the model.
    sqlx::query(
        "UPDATE audotics_trainer.training_runs
         SET status = $2, finished_at = now(), error = coalesce(error, $3)
         WHERE id = $1 AND (finished_at IS NULL OR status IN ('running', 'stopped'))",
    )
    .bind(claim.run_id)
    .bind(finish.state)
    .bind(&finish.error)
    .execute(&mut *tx)
    .await?;
    let satisfies: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM audotics_trainer.retrain_requests WHERE run_id = $1 ORDER BY received_at",
    )
    .bind(claim.run_id)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE audotics_trainer.retrain_requests
         SET answered_at = now(), answer = $2, answered_version = $3, answer_event_id = $4
         WHERE run_id = $1",
    )
    .bind(claim.run_id)
    .bind(finish.answer)
    .bind(&finish.version)
    .bind(finish.event.event_id)
    .execute(&mut *tx)
    .await?;
    let mut body = finish.event.body.clone();
    insert_answers(&mut tx, finish.event.event_id, &finish.event.routing_key, &mut body, &satisfies).await?;
    if let (Some(published), Some(version)) = (&finish.published, &finish.version) {
        let mut stored = finish.event.body.clone();
        stored["satisfies"] = Value::Array(vec![]);
        sqlx::query(
            "INSERT INTO audotics_trainer.model_versions (model, version, run_id, data_watermark, recall_at_10, event)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (model, version) DO NOTHING",
        )
        .bind(&claim.model)
        .bind(version)
        .bind(claim.run_id)
        .bind(published.data_watermark)
        .bind(published.recall_at_10)
        .bind(&stored)
        .execute(&mut *tx)
        .await?;
        if let Some(watermark) = published.data_watermark {
            let covered: Vec<String> = sqlx::query_scalar(
                "SELECT event_id FROM audotics_trainer.retrain_requests
                 WHERE model = $1 AND run_id IS NULL AND answered_at IS NULL AND interactions_until <= $2",
            )
            .bind(&claim.model)
            .bind(watermark)
            .fetch_all(&mut *tx)
            .await?;
            if !covered.is_empty() {
                answer_with_version(&mut tx, &covered, version, stored).await?;
            }
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// A model's newest published version, as its row in `model_versions` records it.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedVersion {
    pub version: String,
    pub recall_at_10: Option<f64>,
    /// The catalogue's pin its run read (the newest `"Track"."createdAt"`, ms since the Unix epoch),
    /// from its model-ready event; absent for synthetic data and for versions announced before the
    /// event carried it.
    pub newest_track_created_ms: Option<i64>,
}

/// The newest version the worker published for `model`.
pub async fn newest_version(pool: &PgPool, model: &str) -> sqlx::Result<Option<PublishedVersion>> {
    let row = sqlx::query(
        "SELECT version, recall_at_10, (event->'data'->>'newest_track_created_ms')::int8 AS pin
         FROM audotics_trainer.model_versions WHERE model = $1 ORDER BY published_at DESC LIMIT 1",
    )
    .bind(model)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| PublishedVersion {
        version: r.get("version"),
        recall_at_10: r.get("recall_at_10"),
        newest_track_created_ms: r.get("pin"),
    }))
}
