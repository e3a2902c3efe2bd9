//! Recording retrain requests once, and answering them from a published version.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::contract::request::RetrainRequest;

/// What recording a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// New and pending: the next run of its model answers it.
    Pending,
    /// Seen before (a redelivery or a re-send): nothing to do.
    Duplicate,
    /// Already covered by this published version; its model-ready is re-announced for the request.
    Satisfied { version: String },
}

/// An event to publish through the outbox. `satisfies` is filled in from the requests the run
/// answers, inside the transaction that ends the run.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub event_id: Uuid,
    pub routing_key: String,
    pub body: Value,
}

/// Requests one event's `satisfies` lists at most: a burst coalesced into one run is announced in
/// several messages (same `event_id`, disjoint `satisfies`), each far below the broker's message size.
pub const SATISFIES_PER_EVENT: usize = 500;

/// Records `request` once. A request whose `interactions_until` the newest published version
/// already covers is answered at once, in the same transaction.
pub async fn record_request(pool: &PgPool, request: &RetrainRequest) -> sqlx::Result<Recorded> {
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO audotics_trainer.retrain_requests
             (event_id, model, requested_at, interactions_until, reason, params)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&request.event_id)
    .bind(&request.model)
    .bind(request.requested_at)
    .bind(request.interactions_until)
    .bind(&request.reason)
    .bind(request.params.as_ref().map(|p| serde_json::to_value(p).expect("params serialise")))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(Recorded::Duplicate);
    }
    let mut outcome = Recorded::Pending;
    if let Some(until) = request.interactions_until {
        let newest = sqlx::query(
            "SELECT version, data_watermark, event FROM audotics_trainer.model_versions
             WHERE model = $1 ORDER BY published_at DESC LIMIT 1",
        )
        .bind(&request.model)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = newest {
            let watermark: Option<DateTime<Utc>> = row.get("data_watermark");
            if watermark.is_some_and(|w| w >= until) {
                let version: String = row.get("version");
                let event: Value = row.get("event");
                answer_with_version(&mut tx, std::slice::from_ref(&request.event_id), &version, event).await?;
                outcome = Recorded::Satisfied { version };
            }
        }
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Re-announces a version's model-ready event (same `event_id`) for `event_ids`, and marks them
/// answered by it.
pub(super) async fn answer_with_version(
    tx: &mut Transaction<'_, Postgres>,
    event_ids: &[String],
    version: &str,
    mut event: Value,
) -> sqlx::Result<()> {
    let event_id: Uuid = event["event_id"].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        sqlx::Error::Protocol(format!("model_versions holds an event for {version} without a valid event_id"))
    })?;
    let routing_key = format!("model-ready.{}", event["model"].as_str().unwrap_or_default());
    sqlx::query(
        "UPDATE audotics_trainer.retrain_requests
         SET answered_at = now(), answer = 'model-ready', answered_version = $2, answer_event_id = $3
         WHERE event_id = ANY($1)",
    )
    .bind(event_ids)
    .bind(version)
    .bind(event_id)
    .execute(&mut **tx)
    .await?;
    insert_answers(tx, event_id, &routing_key, &mut event, event_ids).await
}

/// One outbox row per [`SATISFIES_PER_EVENT`] requests of `satisfies`, all with `event_id`.
pub(super) async fn insert_answers(
    tx: &mut Transaction<'_, Postgres>,
    event_id: Uuid,
    routing_key: &str,
    body: &mut Value,
    satisfies: &[String],
) -> sqlx::Result<()> {
    for chunk in satisfies.chunks(SATISFIES_PER_EVENT) {
        body["satisfies"] = Value::from(chunk.to_vec());
        insert_outbox(tx, event_id, routing_key, body).await?;
    }
    if satisfies.is_empty() {
        body["satisfies"] = Value::Array(vec![]);
        insert_outbox(tx, event_id, routing_key, body).await?;
    }
    Ok(())
}

async fn insert_outbox(
    tx: &mut Transaction<'_, Postgres>,
    event_id: Uuid,
    routing_key: &str,
    body: &Value,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO audotics_trainer.outbox (event_id, routing_key, body) VALUES ($1, $2, $3)")
        .bind(event_id)
        .bind(routing_key)
        .bind(body)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}

/// The event id of the refresh timer's request for `model` while `version` is its newest: one per
/// version, so workers ticking at once record it once (`event_id` is unique).
pub fn timer_refresh_id(model: &str, version: &str) -> String {
    format!("refresh-timer:{model}:{version}")
}

/// What [`record_timer_refresh`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerRefresh {
    Recorded,
    /// The model has an unanswered request: its run publishes a version the next tick compares.
    RequestPending,
    /// This version's timer request exists already (answered or failed: the timer asks once).
    AlreadyAsked,
}

/// Records the refresh timer's request (`params.refresh`) for `model`, whose newest version is
/// `version`, unless the model has an unanswered request — in one statement, so that a request
/// recorded meanwhile is seen. (A retrain recorded after it, before a run claims them, makes that
/// run train: a refresh never answers a request for training; see `lease::claim`.)
pub async fn record_timer_refresh(
    pool: &PgPool,
    model: &str,
    version: &str,
    every_seconds: u64,
) -> sqlx::Result<TimerRefresh> {
    let params = serde_json::json!({"refresh": true});
    let row = sqlx::query(
        "WITH pending AS (
             SELECT count(*) AS n FROM audotics_trainer.retrain_requests WHERE model = $2 AND answered_at IS NULL
         ), inserted AS (
             INSERT INTO audotics_trainer.retrain_requests (event_id, model, requested_at, reason, params)
             SELECT $1, $2, now(), $3, $4 FROM pending WHERE pending.n = 0
             ON CONFLICT (event_id) DO NOTHING
             RETURNING 1
         )
         SELECT (SELECT n FROM pending) AS pending, (SELECT count(*) FROM inserted) AS inserted",
    )
    .bind(timer_refresh_id(model, version))
    .bind(model)
    .bind(format!("refresh timer (every {every_seconds} s): tracks were added after {version}'s catalogue"))
    .bind(params)
    .fetch_one(pool)
    .await?;
    let (pending, inserted): (i64, i64) = (row.get("pending"), row.get("inserted"));
    Ok(match (inserted, pending) {
        (1, _) => TimerRefresh::Recorded,
        (_, 0) => TimerRefresh::AlreadyAsked,
        _ => TimerRefresh::RequestPending,
    })
}
