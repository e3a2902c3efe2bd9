//! The worker's clock against the database's. Leases, deadlines, version names and `latest.json`'s
//! order already come from the database's clock, but S3 signs every request with the worker's own
//! time, and a server refuses signatures more than 15 minutes off: a worker whose clock is wrong
//! would fail every run it claims, an attempt each, and fail runs for good that a healthy worker
//! could have published. So a worker whose clock is more than `WORKER_MAX_CLOCK_SKEW_SECONDS` off
//! the database's claims no run (it still records requests and publishes events, which do not
//! depend on its clock), stops the run it holds at the next batch boundary and releases it, and says
//! why on `/readyz`, in its log and in `audotics_clock_skew_seconds`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use super::Shared;

/// How often the clock is compared with the database's.
const EVERY: Duration = Duration::from_secs(15);

/// What the last comparison found.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ClockState {
    /// This worker's clock minus the database's, in seconds (`None` before the first comparison).
    pub skew_seconds: Option<f64>,
    /// Whether the skew is within the limit (or the check is off).
    pub ok: bool,
}

/// This worker's clock minus the database's, in seconds, taking the middle of the round trip.
pub(crate) async fn skew(pool: &sqlx::PgPool) -> sqlx::Result<f64> {
    let before = unix_seconds();
    let database: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8").fetch_one(pool).await?;
    let after = unix_seconds();
    Ok((before + after) / 2.0 - database)
}

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Compares the clocks every [`EVERY`] until shutdown (the first comparison is made at start).
pub(super) async fn watch(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        check(&shared).await;
    }
}

/// One comparison: updates the shared state, the gauge, and (on a change) the log; stops the run in
/// progress when the clock has just gone out of bounds.
pub(super) async fn check(shared: &Shared) {
    let max = shared.settings.max_clock_skew_seconds as f64;
    let measured = match super::runner::bounded(Duration::from_secs(5), skew(&shared.pool)).await {
        Ok(s) => s,
        Err(e) => {
            // Nothing learned: the last verdict stands (a database that does not answer stops
            // claims and runs by itself).
            warn!(error.message = %e, "cannot compare this worker's clock with the database's");
            return;
        }
    };
    metrics::gauge!("audotics_clock_skew_seconds").set(measured);
    let ok = max == 0.0 || measured.abs() <= max;
    let was = {
        let mut state = shared.clock.lock().expect("clock lock");
        let was = (state.skew_seconds.is_some(), state.ok);
        *state = ClockState { skew_seconds: Some(measured), ok };
        was
    };
    metrics::gauge!("audotics_clock_skew_exceeded").set(if ok { 0.0 } else { 1.0 });
    match (was, ok) {
        ((_, true), false) | ((false, _), false) => {
            error!(
                skew_seconds = measured,
                max_skew_seconds = max,
                "this worker's clock is off the database's by more than WORKER_MAX_CLOCK_SKEW_SECONDS: it claims no \
                 run until it is corrected (S3 refuses requests signed at the wrong time); fix the host's time \
                 synchronisation (NTP)"
            );
            shared.request_run_stop();
        }
        ((true, false), true) => {
            info!(skew_seconds = measured, "this worker's clock is back within bounds; claiming runs again")
        }
        ((false, _), true) => {
            info!(skew_seconds = measured, max_skew_seconds = max, "clock compared with the database's")
        }
        _ => {}
    }
}
