//! The scheduler: claims runs and executes them, one at a time per worker, under a lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::{Instrument, error, info, info_span, warn};

use super::{Shared, events};
use crate::db::coord::{self, Claim, EventDraft, Finish, NewestVersion};
use crate::db::ledger;
use crate::job::{self, RunOutcome, StopFlag, TrainJob};

/// What one step of the runner did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Claimed a run and carried it to its end (published, rejected, failed, released or retrying).
    Ran,
    /// Nothing to run now: no pending request, the database unreachable, or the clock off.
    Idle,
}

/// The runner: one step after another, waiting between idle ones for a new request, the poll
/// interval or shutdown.
pub(super) async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    while !shared.shutting_down() {
        if run_one(&shared).await == Step::Ran {
            continue;
        }
        tokio::select! {
            _ = shared.scheduler_wake.notified(), if shared.clock_ok() => {}
            _ = tokio::time::sleep(shared.poll()) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }
}

/// Claims one run for the models this worker serves, if any is due, and executes it.
pub(super) async fn run_one(shared: &Arc<Shared>) -> Step {
    if !shared.clock_ok() {
        // The clock watcher logs why and checks again; requests wait in the database meanwhile.
        return Step::Idle;
    }
    let claim = coord::claim(&shared.pool, &shared.worker_id, &shared.settings.models, shared.lease());
    match bounded(shared.lease(), claim).await {
        Ok(Some(claim)) => {
            execute(shared, claim).await;
            Step::Ran
        }
        Ok(None) => Step::Idle,
        Err(e) => {
            metrics::counter!("audotics_database_errors_total", "operation" => "claim").increment(1);
            warn!(error.message = %e, "cannot look for runs to claim; retrying");
            Step::Idle
        }
    }
}

async fn execute(shared: &Arc<Shared>, claim: Claim) {
    let span = info_span!("run", run_id = %claim.run_id, model = %claim.model, attempt = claim.attempt);
    async {
        if claim.taken_over {
            metrics::counter!("audotics_lease_takeovers_total", "model" => claim.model.clone()).increment(1);
            warn!(
                crashes = claim.crashes,
                previous_owner = claim.previous_owner.as_deref().unwrap_or(""),
                "took over a run whose lease had expired"
            );
        }
        if claim.crashes > 1 {
            metrics::counter!("audotics_repeatedly_crashed_runs_taken_over_total", "model" => claim.model.clone())
                .increment(1);
            warn!(crashes = claim.crashes, "this run's owners have vanished before: it may be what crashes them");
        }
        let remaining = Duration::from_secs(shared.settings.run_max_seconds).saturating_sub(claim.age);
        if claim.attempt as usize > shared.settings.max_attempts || remaining.is_zero() {
            let status = if remaining.is_zero() {
                give_up_deadline(shared, &claim).await
            } else {
                give_up_crashed(shared, &claim).await
            };
            metrics::counter!("audotics_runs_total", "model" => claim.model.clone(), "status" => status).increment(1);
            return;
        }
        info!(params = ?claim.params, "run claimed");
        metrics::counter!("audotics_runs_total", "model" => claim.model.clone(), "status" => "started").increment(1);
        let stop = StopFlag::default();
        *shared.run_stop.lock().expect("run_stop lock") = Some(stop.clone());
        if shared.shutting_down() {
            stop.request();
        }
        let lease_lost = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), claim.clone(), stop.clone(), lease_lost.clone()));
        let past_deadline = Arc::new(AtomicBool::new(false));
        let deadline = tokio::spawn(deadline(remaining, stop.clone(), past_deadline.clone()));
        let started = Instant::now();
        let result = job::run(&shared.store, build_job(shared, &claim, stop)).await;
        heartbeat.abort();
        deadline.abort();
        *shared.run_stop.lock().expect("run_stop lock") = None;
        let gone_before_start = matches!(&result, Err(e) if e.downcast_ref::<job::LeaseGone>().is_some());
        let ended = RunEnded {
            lease_lost: gone_before_start || lease_lost.load(Ordering::SeqCst),
            past_deadline: past_deadline.load(Ordering::SeqCst),
        };
        let status = conclude(shared, &claim, result, ended).await;
        let labels = [("model", claim.model.clone()), ("status", status.to_string())];
        metrics::counter!("audotics_runs_total", &labels).increment(1);
        metrics::histogram!("audotics_run_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
        info!(status, seconds = started.elapsed().as_secs_f64(), "run ended");
    }
    .instrument(span)
    .await
}

fn build_job(shared: &Shared, claim: &Claim, stop: StopFlag) -> TrainJob {
    let defaults = &shared.settings.runs;
    let mut config = defaults.config_for(shared.settings.model_kinds.get(&claim.model).copied().unwrap_or_default());
    if let Some(params) = &claim.params {
        super::admission::apply(params, &mut config);
    }
    TrainJob {
        database_url: Some(shared.database_url.clone()),
        pool: Some(shared.pool.clone()),
        run_id: Some(claim.run_id),
        lease_token: Some(claim.token),
        quality_tolerance: Some(shared.settings.quality_tolerance),
        started_at: Some(claim.created_at),
        trigger: "worker",
        memory_budget: shared.memory_budget,
        requested_full: claim.params.as_ref().and_then(|p| p.full).unwrap_or(false),
        refresh: claim.params.as_ref().and_then(|p| p.refresh).unwrap_or(false),
        ..defaults.job(claim.model.clone(), config, defaults.postgres_data(), stop)
    }
}

/// `call`, or an error once `limit` has passed without an answer.
pub(super) async fn bounded<T>(limit: Duration, call: impl Future<Output = sqlx::Result<T>>) -> sqlx::Result<T> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the database did not answer within {limit:?}"),
        )))
    })
}

/// Stops the run at its next batch boundary once `remaining` has passed.
async fn deadline(remaining: Duration, stop: StopFlag, past: Arc<AtomicBool>) {
    tokio::time::sleep(remaining).await;
    warn!(seconds = remaining.as_secs_f64(), "the run reached RUN_MAX_SECONDS; stopping it at the next batch boundary");
    past.store(true, Ordering::SeqCst);
    stop.request();
}

/// A run that ended for good without a version keeps no checkpoints: nothing will resume it.
async fn delete_checkpoints(shared: &Shared, claim: &Claim) {
    let run_id = claim.run_id.to_string();
    match crate::publish::versions::prune_checkpoints(&shared.store, &claim.model, &run_id, 0, None).await {
        Ok(n) if n > 0 => info!(checkpoints = n, "deleted the checkpoints of a run that ended without a version"),
        Ok(_) => {}
        Err(e) => warn!(error.message = %format!("{e:#}"), "cannot delete the ended run's checkpoints"),
    }
}

/// What happened around the run while it trained.
struct RunEnded {
    lease_lost: bool,
    past_deadline: bool,
}

/// Renews the lease every third of its length, each try bounded by a third. When it is gone (taken
/// over), or the next try could only end past the lease (so another worker may then hold it), the
/// run is stopped: within one lease of the last renewal.
async fn heartbeat(shared: Arc<Shared>, claim: Claim, stop: StopFlag, lost: Arc<AtomicBool>) {
    let lease = shared.lease();
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(lease / 3).await;
        // Bounded by the renewal interval: a database that stops answering without closing the
        // connection (packets dropped) must fail the heartbeat, not hang it past the lease.
        match bounded(lease / 3, coord::heartbeat(&shared.pool, &claim, lease)).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                warn!("lease lost: another worker owns the run now; stopping");
                break;
            }
            // The next renewal could only land past the lease's end, when another worker may
            // already own the run: stop now, inside the lease.
            Err(e) if renewed.elapsed() + lease / 3 >= lease => {
                warn!(error.message = %e, "cannot renew the lease for a whole lease length; stopping the run");
                break;
            }
            Err(e) => warn!(error.message = %e, "cannot renew the lease; retrying"),
        }
    }
    metrics::counter!("audotics_leases_lost_total", "model" => claim.model.clone()).increment(1);
    lost.store(true, Ordering::SeqCst);
    stop.request();
}

/// Ends a run whose owners vanished mid-attempt (lease expired without a release) on every one of
/// its `RUN_MAX_ATTEMPTS` attempts, without training it again: whatever it does — run out of
/// memory, say — kills the worker, and every request behind it would wait forever.
async fn give_up_crashed(shared: &Shared, claim: &Claim) -> &'static str {
    let attempts = claim.attempt - 1;
    let message = format!(
        "the run's owner vanished without releasing its lease on {} of its {attempts} attempts \
         (a crash, an out-of-memory kill, or a pause past the lease; last owner {}): not tried again",
        claim.crashes,
        claim.previous_owner.as_deref().unwrap_or("unknown"),
    );
    error!(crashes = claim.crashes, attempts, "run failed for good: it keeps crashing its workers");
    metrics::counter!("audotics_crashed_runs_failed_total", "model" => claim.model.clone()).increment(1);
    fail_run(shared, claim, "crashed", message, attempts, serde_json::json!({"crashes": claim.crashes})).await
}

/// Ends a run that has been going for longer than `RUN_MAX_SECONDS` (since it was first claimed).
async fn give_up_deadline(shared: &Shared, claim: &Claim) -> &'static str {
    let max = shared.settings.run_max_seconds;
    let message = format!(
        "the run passed its deadline: RUN_MAX_SECONDS = {max} since it was first claimed, over {} attempts; stopped at a batch boundary",
        claim.attempt
    );
    error!(run_max_seconds = max, "run failed for good: past its deadline");
    metrics::counter!("audotics_runs_past_deadline_total", "model" => claim.model.clone()).increment(1);
    fail_run(shared, claim, "deadline", message, claim.attempt, serde_json::json!({"run_max_seconds": max})).await
}

/// Fails the run for good with `outcome`: the ledger row, `model-failed` (with `extra` fields) to
/// every request it claimed, in one transaction with the run's end.
async fn fail_run(
    shared: &Shared,
    claim: &Claim,
    outcome: &str,
    message: String,
    attempts: i32,
    extra: serde_json::Value,
) -> &'static str {
    let end = ledger::RunEnd { error: Some(message.clone()), ..Default::default() };
    let recorded = ledger::record_end(&shared.pool, claim.run_id, ledger::RunStatus::Failed, &end, Some(claim.token));
    if let Err(e) = recorded.await {
        warn!(error.message = %e, "cannot record the failed run's end in the training_runs ledger");
    }
    let mut event = events::model_failed(&claim.model, claim.run_id, outcome, &message, attempts);
    if let serde_json::Value::Object(fields) = extra {
        for (k, v) in fields {
            event.body[k] = v;
        }
    }
    record_failure(shared, claim, event, message).await
}

/// Ends the run as `failed`, answering its requests with the `model-failed` `event`.
async fn record_failure(shared: &Shared, claim: &Claim, event: EventDraft, message: String) -> &'static str {
    let state = ledger::RunStatus::Failed.as_str();
    let finish = Finish { state, answer: "model-failed", version: None, error: Some(message), event, published: None };
    record_finish(shared, claim, finish, state).await
}

/// Records how the run ended (retrying while the database is unreachable); returns the status.
async fn conclude(shared: &Shared, claim: &Claim, result: anyhow::Result<RunOutcome>, ended: RunEnded) -> &'static str {
    if ended.lease_lost {
        warn!("the run's lease was lost; its new owner finishes it");
        return "lease_lost";
    }
    if ended.past_deadline && !matches!(result, Ok(RunOutcome::Published(_) | RunOutcome::Rejected(_))) {
        return give_up_deadline(shared, claim).await;
    }
    let model = claim.model.as_str();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            let message = format!("{e:#}");
            if (claim.attempt as usize) < shared.settings.max_attempts {
                let base = shared.settings.retry_seconds as f64 * 2f64.powi(claim.attempt - 1);
                let delay = Duration::from_secs_f64(base * rand::rng().random_range(0.75..1.25));
                warn!(error.message = %message, retry_in = ?delay, "run attempt failed; it will be retried");
                with_retry(shared, || Box::pin(coord::retry_later(&shared.pool, claim, &message, delay))).await;
                return "retrying";
            }
            error!(error.message = %message, attempts = claim.attempt, "run failed for good");
            let event = events::model_failed(model, claim.run_id, "failed", &message, claim.attempt);
            return record_failure(shared, claim, event, message).await;
        }
    };
    let (label, answer, version, event, published) = match &outcome {
        RunOutcome::Published(p) => {
            let newest = NewestVersion {
                data_watermark: p
                    .metadata
                    .data
                    .watermark
                    .newest_interaction_ms
                    .and_then(chrono::DateTime::from_timestamp_millis),
                recall_at_10: p.metadata.final_metrics.recall_at_10,
            };
            ("succeeded", "model-ready", Some(p.version.clone()), events::model_ready(p), Some(newest))
        }
        RunOutcome::Rejected(r) => {
            ("rejected", "model-rejected", Some(r.version.clone()), events::model_rejected(model, r), None)
        }
        RunOutcome::InsufficientData { reason, .. } => {
            let event = events::model_failed(model, claim.run_id, "insufficient_data", reason, claim.attempt);
            ("insufficient_data", "model-failed", None, event, None)
        }
        RunOutcome::ResourceLimit(r) => {
            metrics::counter!("audotics_runs_over_budget_total", "model" => claim.model.clone()).increment(1);
            ("resource_limit", "model-failed", None, events::model_over_budget(model, claim, r), None)
        }
        RunOutcome::Stopped { epochs_completed, .. } => {
            let released = with_retry(shared, || Box::pin(coord::release(&shared.pool, claim))).await;
            info!(
                epochs_completed,
                released,
                clock_ok = shared.clock_ok(),
                "run stopped (shutdown, or this worker's clock is off); lease released for another worker"
            );
            return "released";
        }
    };
    let finish =
        Finish { state: outcome.status().as_str(), answer, version, error: outcome.reason(), event, published };
    record_finish(shared, claim, finish, label).await
}

/// Ends the run in one transaction with its answers and outbox event; `status`, or `lease_lost`
/// when another worker took the run over first.
///
/// A run that ends for good without a published version (failed, rejected, insufficient data,
/// over budget) deletes its checkpoints first, so that its answer means they are gone. Deleting
/// after the answer let a requester see a failed run's files, and a crash in between kept them for
/// good; a crash between deleting and recording leaves the run to be claimed again, and it ends the
/// same way (past its deadline or attempts, or trained again from the start). The lease is renewed
/// before deleting: a worker paused past its lease must not delete the checkpoints the run's new
/// owner resumes from, and the renewal keeps the run this worker's for a lease length.
async fn record_finish(shared: &Shared, claim: &Claim, finish: Finish, status: &'static str) -> &'static str {
    let without_version = finish.published.is_none();
    let lease = shared.lease();
    let deleted_first =
        without_version && with_retry(shared, || Box::pin(coord::heartbeat(&shared.pool, claim, lease))).await;
    if deleted_first {
        delete_checkpoints(shared, claim).await;
    }
    let recorded = with_retry(shared, || Box::pin(coord::finish(&shared.pool, claim, finish.clone()))).await;
    if recorded {
        if without_version && !deleted_first {
            // The database did not confirm the lease in time, but the end is recorded now: the
            // checkpoints are this run's, and nothing will resume from them.
            delete_checkpoints(shared, claim).await;
        }
        shared.outbox_wake.notify_one();
        status
    } else {
        warn!("the run's lease was taken over before its end could be recorded; its new owner finishes it");
        "lease_lost"
    }
}

/// Retries a coordination write while the database is unreachable, for up to a lease length (after
/// that the lease has expired and the run belongs to whoever claims it next). `false` on giving up.
async fn with_retry<'a, F>(shared: &Shared, mut f: F) -> bool
where
    F: FnMut() -> futures::future::BoxFuture<'a, sqlx::Result<bool>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match bounded(shared.lease(), f()).await {
            Ok(done) => return done,
            Err(e) if started.elapsed() < shared.lease() * 2 => {
                metrics::counter!("audotics_database_errors_total", "operation" => "conclude").increment(1);
                warn!(error.message = %e, retry_in = ?delay, "cannot record the run's end; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                error!(error.message = %e, "cannot record the run's end; its lease will expire and the run be redone");
                return false;
            }
        }
    }
}
