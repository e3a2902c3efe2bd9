//! Keeps the worker's state tables bounded: rows that ended longer ago than the horizon are deleted,
//! by whichever worker gets the lock first (the others skip that round). What is never deleted:
//! a pending or unanswered request, an unpublished outbox event (parked ones included: an operator
//! looks at those), an active run, a run or ledger row still `running`, and `model_versions` (one
//! row per published version; rollback and re-announcement read it).
//!
//! The horizon is also the deduplication window: a request re-sent with an `event_id` older than it
//! is recorded (and trained) again.

use std::time::Duration;

use sqlx::PgPool;

/// Rows deleted by one [`prune`], per table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    pub retrain_requests: u64,
    pub outbox: u64,
    pub run_jobs: u64,
    pub training_runs: u64,
}

/// Deletes what ended more than `horizon` ago. `None` when another worker holds the prune lock.
pub async fn prune(pool: &PgPool, horizon: Duration) -> sqlx::Result<Option<Pruned>> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('audotics_trainer.prune'))")
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(None);
    }
    let secs = horizon.as_secs_f64();
    let retrain_requests = delete(
        &mut tx,
        "DELETE FROM audotics_trainer.retrain_requests WHERE answered_at < now() - make_interval(secs => $1)",
        secs,
    )
    .await?;
    let outbox = delete(
        &mut tx,
        "DELETE FROM audotics_trainer.outbox WHERE published_at < now() - make_interval(secs => $1)",
        secs,
    )
    .await?;
    let run_jobs = delete(
        &mut tx,
        "DELETE FROM audotics_trainer.run_jobs j
         WHERE j.state NOT IN ('running', 'retry') AND j.finished_at < now() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM audotics_trainer.retrain_requests r WHERE r.run_id = j.run_id)",
        secs,
    )
    .await?;
    let training_runs = delete(
        &mut tx,
        "DELETE FROM audotics_trainer.training_runs
         WHERE status <> 'running' AND finished_at < now() - make_interval(secs => $1)",
        secs,
    )
    .await?;
    tx.commit().await?;
    Ok(Some(Pruned { retrain_requests, outbox, run_jobs, training_runs }))
}

async fn delete(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, sql: &'static str, secs: f64) -> sqlx::Result<u64> {
    sqlx::query(sql).bind(secs).execute(&mut **tx).await.map(|r| r.rows_affected())
}
