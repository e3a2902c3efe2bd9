//! Runs under a lease: claiming one (a takeover, a due retry, or a new run that coalesces every
//! pending request of its model), heartbeats, a clean release, and a retry later.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::contract::request::Params;

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
    // The newest request that carries params decides them for the coalesced run, except that a
    // refresh does not answer a request for training: when any pending request does not ask for a
    // refresh, the run trains (a trained version embeds the new tracks too, so it answers both).
    let params: Option<Value> = sqlx::query_scalar(
        "SELECT CASE
                    WHEN (newest.params->>'refresh')::boolean IS TRUE AND EXISTS (
                        SELECT 1 FROM audotics_trainer.retrain_requests r
                        WHERE r.model = $1 AND r.run_id IS NULL AND r.answered_at IS NULL
                          AND (r.params->>'refresh')::boolean IS NOT TRUE)
                    THEN newest.params - 'refresh'
                    ELSE newest.params
                END
         FROM (SELECT params FROM audotics_trainer.retrain_requests
               WHERE model = $1 AND run_id IS NULL AND answered_at IS NULL AND params IS NOT NULL
               ORDER BY received_at DESC LIMIT 1) AS newest",
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
