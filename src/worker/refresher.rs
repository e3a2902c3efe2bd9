//! The refresh timer (`WORKER_REFRESH_EVERY_SECONDS`, off by default): new tracks get embeddings
//! within one period without anyone asking. Every period, for each content or hybrid model this
//! worker serves, it compares the catalogue with the pin of the model's newest version (the newest
//! `"Track"."createdAt"` its run read, from its model-ready event) and, when a track was created
//! after it, records a refresh request (`params.refresh`) as if one had arrived from the broker; the
//! scheduler then runs it like any other.
//!
//! Safe with any number of workers: the request's `event_id` names the version it refreshes
//! ([`timer_refresh_id`]), so workers ticking together record it once, and the timer asks once per
//! version (a refresh that fails is retried by the run's own attempts, not by the timer, until a
//! newer version exists). No request is recorded while the model has an unanswered one: that
//! request's run publishes a version, which the next tick compares. A collaborative model cannot
//! be refreshed (it has nothing to embed a track it never trained on with), so the timer skips it.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::Shared;
use crate::db::coord::{TimerRefresh, newest_version, record_timer_refresh, timer_refresh_id};
use crate::training::model::ModelKind;

/// What one tick found for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tick {
    NoVersion,
    UpToDate,
    /// New tracks: what asking for a refresh did.
    Asked(TimerRefresh),
}

impl Tick {
    fn as_str(self) -> &'static str {
        match self {
            Tick::NoVersion => "no_version",
            Tick::UpToDate => "up_to_date",
            Tick::Asked(TimerRefresh::Recorded) => "requested",
            Tick::Asked(TimerRefresh::RequestPending) => "request_pending",
            Tick::Asked(TimerRefresh::AlreadyAsked) => "already_asked",
        }
    }
}

/// Ticks every `refresh_every_seconds` until shutdown; returns at once when the timer is off.
pub(crate) async fn run(shared: Arc<Shared>) {
    let every = shared.settings.refresh_every_seconds;
    if every == 0 {
        return;
    }
    let kind_of = |key: &str| shared.settings.model_kinds.get(key).copied().unwrap_or_default();
    let (models, skipped): (Vec<String>, Vec<String>) =
        shared.settings.models.iter().cloned().partition(|key| kind_of(key) != ModelKind::Collaborative);
    if !skipped.is_empty() {
        warn!(models = ?skipped, "the refresh timer skips collaborative models: a refresh needs audio to embed a new track");
    }
    info!(every_seconds = every, models = ?models, "refresh timer on");
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(every)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // The catalogue's newest track, read once per tick for every model.
        let newest_track = match crate::db::load::newest_track_created_ms(&shared.pool).await {
            Ok(newest) => newest,
            Err(e) => {
                database_error(&format!("{e:#}"));
                continue;
            }
        };
        for model in &models {
            match tick(&shared, model, newest_track, every).await {
                Ok(outcome) => {
                    metrics::counter!("audotics_refresh_timer_ticks_total", "model" => model.clone(), "outcome" => outcome.as_str())
                        .increment(1);
                    info!(model = %model, outcome = outcome.as_str(), "refresh timer");
                    if outcome == Tick::Asked(TimerRefresh::Recorded) {
                        shared.scheduler_wake.notify_one();
                    }
                }
                Err(e) => database_error(&e.to_string()),
            }
        }
    }
}

fn database_error(message: &str) {
    metrics::counter!("audotics_database_errors_total", "operation" => "refresh_timer").increment(1);
    warn!(error.message = %message, "refresh timer: cannot read the database; next tick in one period");
}

/// One model's tick: did the catalogue gain a track after the newest version's pin (`None`: a
/// version announced without one — ask once), and if so, ask for a refresh.
async fn tick(shared: &Shared, model: &str, newest_track: Option<i64>, every: u64) -> sqlx::Result<Tick> {
    let Some(latest) = newest_version(&shared.pool, model).await? else {
        return Ok(Tick::NoVersion);
    };
    let gained = match (newest_track, latest.newest_track_created_ms) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(newest), Some(pin)) => newest > pin,
    };
    if !gained {
        return Ok(Tick::UpToDate);
    }
    let asked = record_timer_refresh(&shared.pool, model, &latest.version, every).await?;
    if asked == TimerRefresh::Recorded {
        info!(model, event_id = %timer_refresh_id(model, &latest.version), "refresh timer: new tracks; refresh requested");
    }
    Ok(Tick::Asked(asked))
}
