//! The worker's coordination in Postgres: recording requests (dedup by `event_id`), claiming runs
//! under a lease (coalescing every pending request of a model into one run), heartbeats, and ending
//! runs together with their outbox events in one transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::contract::request::{Params, RetrainRequest};

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

/// A run this worker holds the lease of.
#[derive(Debug, Clone)]
pub struct Claim {
    pub run_id: Uuid,
    pub model: String,
    pub params: Option<Params>,
    /// 1 for the first attempt. A takeover counts one: the owner before it vanished mid-attempt.
    pub attempt: i32,
    /// The run was taken over from a worker whose lease expired without a clean release (a crash,
    /// an out-of-memory kill, a pause past the lease).
    pub taken_over: bool,
    /// How many owners of this run vanished that way so far (this takeover included).
    pub crashes: i32,
    /// The owner whose lease this claim took over, when `taken_over`.
    pub previous_owner: Option<String>,
    /// How long ago the run was first claimed, by the database's clock (`RUN_MAX_SECONDS` counts from then).
    pub age: Duration,
    /// When the run was first claimed, by the database's clock: its version is named from this, so
    /// version order never depends on a worker's clock.
    pub created_at: DateTime<Utc>,
    pub token: Uuid,
}

/// An event to publish through the outbox. `satisfies` is filled in from the requests the run
/// answers, inside the transaction that ends the run.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub event_id: Uuid,
    pub routing_key: String,
    pub body: Value,
}

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
    pub published: Option<PublishedVersion>,
}

#[derive(Debug, Clone)]
pub struct PublishedVersion {
    pub data_watermark: Option<DateTime<Utc>>,
    pub recall_at_10: f64,
}

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
async fn answer_with_version(
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
async fn insert_answers(
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

/// Claims a run for one of `models`, in this order: a run whose lease expired (takeover) or whose
/// retry is due; else a new run for a model with pending requests and no active run, which claims
/// every pending request of that model (requests arriving later wait for the next run).
pub async fn claim(pool: &PgPool, owner: &str, models: &[String], lease: Duration) -> sqlx::Result<Option<Claim>> {
    let mut tx = pool.begin().await?;
    let token = Uuid::new_v4();
    let lease_secs = lease.as_secs_f64();
    let resumable = sqlx::query(
        "UPDATE audotics_trainer.run_jobs j
         SET state = 'running', lease_owner = $2, lease_token = $3,
             lease_expires_at = now() + make_interval(secs => $4),
             attempts = j.attempts + 1,
             takeovers = j.takeovers + CASE WHEN j.state = 'running' THEN 1 ELSE 0 END
         FROM (SELECT run_id, state AS old_state, lease_owner AS old_owner FROM audotics_trainer.run_jobs
               WHERE model = ANY($1)
                 AND ((state = 'running' AND lease_expires_at < now())
                   OR (state = 'retry' AND available_at <= now()))
               ORDER BY available_at LIMIT 1 FOR UPDATE SKIP LOCKED) due
         WHERE j.run_id = due.run_id
         RETURNING j.run_id, j.model, j.params, j.attempts, j.takeovers, due.old_state, due.old_owner,
                   EXTRACT(EPOCH FROM now() - j.created_at)::float8 AS age_seconds, j.created_at",
    )
    .bind(models)
    .bind(owner)
    .bind(token)
    .bind(lease_secs)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = resumable {
        let old_state: String = row.get("old_state");
        let claim = Claim {
            run_id: row.get("run_id"),
            model: row.get("model"),
            params: params_of(row.get("params")),
            attempt: row.get("attempts"),
            taken_over: old_state == "running",
            crashes: row.get("takeovers"),
            previous_owner: row.get("old_owner"),
            age: Duration::from_secs_f64(row.get::<f64, _>("age_seconds").max(0.0)),
            created_at: row.get("created_at"),
            token,
        };
        tx.commit().await?;
        return Ok(Some(claim));
    }
    let candidate: Option<String> = sqlx::query_scalar(
        "SELECT r.model FROM audotics_trainer.retrain_requests r
         WHERE r.run_id IS NULL AND r.answered_at IS NULL AND r.model = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM audotics_trainer.run_jobs j
                           WHERE j.model = r.model AND j.state IN ('running', 'retry'))
         ORDER BY r.received_at LIMIT 1",
    )
    .bind(models)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(model) = candidate else {
        return Ok(None);
    };
    // The newest request that carries params decides them for the coalesced run.
    let params: Option<Value> = sqlx::query_scalar(
        "SELECT params FROM audotics_trainer.retrain_requests
         WHERE model = $1 AND run_id IS NULL AND answered_at IS NULL AND params IS NOT NULL
         ORDER BY received_at DESC LIMIT 1",
    )
    .bind(&model)
    .fetch_optional(&mut *tx)
    .await?;
    let run_id = Uuid::now_v7();
    // The partial unique index makes this the exclusivity check: a concurrent claimer loses here.
    let created_at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "INSERT INTO audotics_trainer.run_jobs
             (run_id, model, state, params, attempts, lease_owner, lease_token, lease_expires_at)
         VALUES ($1, $2, 'running', $3, 1, $4, $5, now() + make_interval(secs => $6))
         ON CONFLICT DO NOTHING RETURNING created_at",
    )
    .bind(run_id)
    .bind(&model)
    .bind(&params)
    .bind(owner)
    .bind(token)
    .bind(lease_secs)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(created_at) = created_at else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE audotics_trainer.retrain_requests SET run_id = $2
         WHERE model = $1 AND run_id IS NULL AND answered_at IS NULL",
    )
    .bind(&model)
    .bind(run_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Claim {
        run_id,
        model,
        params: params_of(params),
        attempt: 1,
        taken_over: false,
        crashes: 0,
        previous_owner: None,
        age: Duration::ZERO,
        created_at,
        token,
    }))
}

fn params_of(v: Option<Value>) -> Option<Params> {
    v.and_then(|v| serde_json::from_value(v).ok())
}

/// Extends the lease; `false` when it is no longer ours (expired and taken over).
pub async fn heartbeat(pool: &PgPool, claim: &Claim, lease: Duration) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE audotics_trainer.run_jobs SET lease_expires_at = now() + make_interval(secs => $3)
         WHERE run_id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(claim.run_id)
    .bind(claim.token)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Gives the run back without counting a failed attempt (graceful shutdown): another worker can
/// claim it at once and resume from its checkpoint.
pub async fn release(pool: &PgPool, claim: &Claim) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE audotics_trainer.run_jobs
         SET state = 'retry', available_at = now(), attempts = attempts - 1,
             lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
         WHERE run_id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(claim.run_id)
    .bind(claim.token)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Records a failed attempt to be retried at `retry_in`.
pub async fn retry_later(pool: &PgPool, claim: &Claim, error: &str, retry_in: Duration) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE audotics_trainer.run_jobs
         SET state = 'retry', available_at = now() + make_interval(secs => $3), last_error = $4,
             lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
         WHERE run_id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(claim.run_id)
    .bind(claim.token)
    .bind(retry_in.as_secs_f64())
    .bind(error)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
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

/// One unpublished outbox event.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub id: i64,
    pub event_id: Uuid,
    pub routing_key: String,
    pub body: Value,
}

/// The oldest unpublished events, locked for this publisher until `tx` ends.
pub async fn next_outbox(tx: &mut Transaction<'_, Postgres>, limit: i64) -> sqlx::Result<Vec<OutboxEvent>> {
    let rows = sqlx::query(
        "SELECT id, event_id, routing_key, body FROM audotics_trainer.outbox
         WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| OutboxEvent {
            id: r.get("id"),
            event_id: r.get("event_id"),
            routing_key: r.get("routing_key"),
            body: r.get("body"),
        })
        .collect())
}

pub async fn mark_published(tx: &mut Transaction<'_, Postgres>, id: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE audotics_trainer.outbox SET published_at = now(), attempts = attempts + 1 WHERE id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}

/// Counts a failed publish of event `id`; after `max_attempts` the event is parked (no longer
/// tried, so it stops blocking the events behind it). Returns whether it is parked now.
pub async fn mark_publish_failed(pool: &PgPool, id: i64, error: &str, max_attempts: i32) -> sqlx::Result<bool> {
    let parked: Option<bool> = sqlx::query_scalar(
        "UPDATE audotics_trainer.outbox
         SET attempts = attempts + 1, last_error = $2,
             parked_at = CASE WHEN attempts + 1 >= $3 THEN now() END
         WHERE id = $1 RETURNING parked_at IS NOT NULL",
    )
    .bind(id)
    .bind(error)
    .bind(max_attempts)
    .fetch_optional(pool)
    .await?;
    Ok(parked.unwrap_or(false))
}

/// Requests one event's `satisfies` lists at most: a burst coalesced into one run is announced in
/// several messages (same `event_id`, disjoint `satisfies`), each far below the broker's message size.
pub const SATISFIES_PER_EVENT: usize = 500;

/// The newest version the worker published for `model`: (version, Recall@10).
pub async fn newest_version(pool: &PgPool, model: &str) -> sqlx::Result<Option<(String, Option<f64>)>> {
    let row = sqlx::query(
        "SELECT version, recall_at_10 FROM audotics_trainer.model_versions
         WHERE model = $1 ORDER BY published_at DESC LIMIT 1",
    )
    .bind(model)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.get("version"), r.get("recall_at_10"))))
}
