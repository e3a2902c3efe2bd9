//! The `training_runs` ledger: one row per run, written when it starts and when it ends, by CLI runs
//! and worker runs alike (whenever a database is configured).

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// How a run ended, as the ledger's `status` column spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Succeeded,
    Rejected,
    Failed,
    InsufficientData,
    Stopped,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Rejected => "rejected",
            RunStatus::Failed => "failed",
            RunStatus::InsufficientData => "insufficient_data",
            RunStatus::Stopped => "stopped",
        }
    }
}

/// A run starting (or starting again, when resumed): inserts the row, or marks it running again and
/// counts the attempt. With `lease_token` (worker runs) the row is written only while that lease
/// still holds the run: a worker paused between its claim and this write (or stuck on a database
/// outage) may find the run taken over and already finished by another, and marking it `running`
/// again would leave the row running for ever, overlapping every later run of the model. Returns
/// whether the row was written.
pub async fn record_start(
    pool: &PgPool,
    run_id: Uuid,
    model: &str,
    version: &str,
    trigger: &str,
    config: &Value,
    lease_token: Option<Uuid>,
) -> sqlx::Result<bool> {
    sqlx::query(
        "INSERT INTO audotics_trainer.training_runs (id, model, version, status, trigger, config)
         SELECT $1, $2, $3, 'running', $4, $5
         WHERE $6::uuid IS NULL OR EXISTS (
               SELECT 1 FROM audotics_trainer.run_jobs j
               WHERE j.run_id = $1 AND j.lease_token = $6 AND j.state = 'running')
         ON CONFLICT (id) DO UPDATE
         SET status = 'running', attempts = training_runs.attempts + 1, finished_at = NULL, error = NULL",
    )
    .bind(run_id)
    .bind(model)
    .bind(version)
    .bind(trigger)
    .bind(config)
    .bind(lease_token)
    .execute(pool)
    .await
    .map(|done| done.rows_affected() == 1)
}

/// What a finished run records.
#[derive(Debug, Default)]
pub struct RunEnd {
    pub data_watermark_ms: Option<i64>,
    pub interaction_count: Option<i64>,
    pub counts: Option<Value>,
    pub metrics: Option<Value>,
    pub artifact_location: Option<String>,
    pub error: Option<String>,
}

/// A run ending with `status`. With `lease_token` (worker runs) the row is written only while that
/// lease still holds the run: a worker that lost it — paused past its lease, say — must not
/// overwrite what the run's new owner recorded. Returns whether the row was written.
pub async fn record_end(
    pool: &PgPool,
    run_id: Uuid,
    status: RunStatus,
    end: &RunEnd,
    lease_token: Option<Uuid>,
) -> sqlx::Result<bool> {
    sqlx::query(
        "UPDATE audotics_trainer.training_runs
         SET status = $2, finished_at = now(),
             data_watermark = to_timestamp($3::float8 / 1000),
             interaction_count = $4, counts = $5, metrics = $6, artifact_location = $7, error = $8
         WHERE id = $1
           AND ($9::uuid IS NULL OR EXISTS (
                SELECT 1 FROM audotics_trainer.run_jobs j
                WHERE j.run_id = $1 AND j.lease_token = $9 AND j.state = 'running'))",
    )
    .bind(run_id)
    .bind(status.as_str())
    .bind(end.data_watermark_ms.map(|ms| ms as f64))
    .bind(end.interaction_count)
    .bind(&end.counts)
    .bind(&end.metrics)
    .bind(&end.artifact_location)
    .bind(&end.error)
    .bind(lease_token)
    .execute(pool)
    .await
    .map(|done| done.rows_affected() == 1)
}
