//! `audotics-trainer worker`: consumes `retrain` requests, coalesces them per model, trains under a
//! Postgres lease, publishes the version and announces it.
//!
//! The pieces, each a task of its own:
//! - [`consumer`]: the broker supervisor — connect (rebuilding the connection when it drops), declare the
//!   topology, consume; every request is recorded in Postgres *before* it is acked, malformed ones
//!   are dead-lettered with their reason;
//! - [`runner`]: the scheduler — claim a run (a takeover, a due retry, or a new run that coalesces
//!   every pending request of its model), train it off the async runtime with lease heartbeats, and
//!   end it in one transaction with its outbox event;
//! - [`outbox`]: publishes outbox events with publisher confirms;
//! - [`refresher`]: the optional refresh timer, which records a refresh request when a model's
//!   catalogue gained tracks since its latest version;
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//!
//! Shutdown (SIGTERM/SIGINT): stop consuming, stop the run at the next batch boundary (checkpoint),
//! release its lease, flush the outbox, exit 0 — or exit 1 when the grace period runs out first.

mod admission;
mod clock;
mod consumer;
pub mod events;
mod http;
mod outbox;
mod refresher;
mod runner;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, RwLock, watch};
use tracing::{error, info, warn};

use crate::broker::BrokerSettings;
use crate::job::{RunDefaults, StopFlag};
use crate::publish::store::ModelStore;
use crate::training::model::ModelKind;

/// What the worker is told (the `worker` flags, in plain form); each run starts from `runs`.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// Model keys this worker trains; requests for others are dead-lettered.
    pub models: Vec<String>,
    /// The kind each key trains (a key without an entry: content).
    pub model_kinds: std::collections::BTreeMap<String, ModelKind>,
    /// This worker's name in leases and logs (`None`: host name and process id).
    pub worker_id: Option<String>,
    pub lease_seconds: usize,
    pub grace_seconds: usize,
    /// Quality gate: how far below the current version's re-scored Recall@10 a new one may be.
    pub quality_tolerance: f64,
    pub max_attempts: usize,
    pub run_max_seconds: u64,
    pub retry_seconds: u64,
    pub delivery_limit: usize,
    pub dead_letter_max_messages: usize,
    pub prefetch: usize,
    pub poll_seconds: usize,
    pub broker_max_outage_seconds: usize,
    /// Memory the worker's runs may use; `None`: the tightest limit in force.
    pub memory_limit: Option<u64>,
    pub outbox_max_attempts: usize,
    pub retention_days: usize,
    /// 0: no clock check.
    pub max_clock_skew_seconds: u64,
    /// The refresh timer's period ([`refresher`]); 0: off.
    pub refresh_every_seconds: u64,
    pub http_addr: String,
    /// Required: the worker records requests and runs there.
    pub database_url: Option<String>,
    pub store_url: String,
    pub runs: RunDefaults,
}

/// State shared by the worker's tasks.
pub(crate) struct Shared {
    pub settings: WorkerSettings,
    pub worker_id: String,
    pub database_url: String,
    pub pool: sqlx::PgPool,
    pub store: ModelStore,
    pub broker: BrokerSettings,
    /// The confirm-mode channel the outbox publishes on (replaced when the connection is rebuilt).
    pub publish_channel: RwLock<Option<lapin::Channel>>,
    pub broker_connected: AtomicBool,
    /// Set once on SIGTERM/SIGINT.
    pub shutdown: watch::Sender<bool>,
    /// Wakes the scheduler (a request was recorded) and the outbox (an event was written).
    pub scheduler_wake: Notify,
    pub outbox_wake: Notify,
    /// The stop flag of the run in progress.
    pub run_stop: std::sync::Mutex<Option<StopFlag>>,
    /// What every run and request is checked against before it trains.
    pub memory_budget: Option<crate::training::resources::MemoryBudget>,
    /// This worker's clock against the database's ([`clock`]).
    pub clock: std::sync::Mutex<clock::ClockState>,
}

impl Shared {
    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.settings.lease_seconds as u64)
    }

    pub fn poll(&self) -> Duration {
        Duration::from_secs(self.settings.poll_seconds as u64)
    }

    /// Whether this worker's clock is close enough to the database's to claim runs.
    pub fn clock_ok(&self) -> bool {
        self.clock.lock().expect("clock lock").ok
    }
}

/// Runs the worker until shutdown.
pub async fn run(settings: WorkerSettings) -> anyhow::Result<ExitCode> {
    let metrics = http::install_metrics()?;
    let database_url = settings.database_url.clone().context(
        "the worker needs the platform's database: give --database-url (or DATABASE_URL); it records requests and runs there",
    )?;
    let store = ModelStore::open(&settings.store_url)?;
    let pool = connect_database(&database_url).await?;
    let worker_id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
    let broker = BrokerSettings {
        url: settings.amqp_url.clone(),
        delivery_limit: settings.delivery_limit as i64,
        dead_letter_max_messages: settings.dead_letter_max_messages as i64,
        prefetch: settings.prefetch.min(u16::MAX as usize) as u16,
        connection_name: format!("audotics-trainer worker {worker_id}"),
    };
    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--http-addr)", settings.http_addr))?;
    info!(
        worker_id = %worker_id,
        models = ?settings.models,
        store = %store.root_url(),
        database = %crate::system::telemetry::redact_url(&database_url),
        broker = %crate::system::telemetry::redact_url(&settings.amqp_url),
        http = %listener.local_addr()?,
        "worker starting"
    );
    let memory_budget = crate::training::resources::MemoryBudget::detect(settings.memory_limit);
    match memory_budget {
        Some(b) => {
            info!(budget_mib = b.bytes >> 20, source = b.source.as_str(), "memory budget for runs");
            metrics::gauge!("audotics_memory_budget_bytes", "source" => b.source.as_str()).set(b.bytes as f64);
        }
        None => warn!("no memory limit can be read (no cgroup, RLIMIT_AS or /proc/meminfo): runs are not bounded"),
    }
    let (shutdown, _) = watch::channel(false);
    let max_clock_skew_seconds = settings.max_clock_skew_seconds;
    let shared = Arc::new(Shared {
        settings,
        worker_id,
        database_url,
        pool,
        store,
        broker,
        publish_channel: RwLock::new(None),
        broker_connected: AtomicBool::new(false),
        shutdown,
        scheduler_wake: Notify::new(),
        outbox_wake: Notify::new(),
        run_stop: std::sync::Mutex::new(None),
        memory_budget,
        clock: std::sync::Mutex::new(clock::ClockState { skew_seconds: None, ok: max_clock_skew_seconds == 0 }),
    });
    spawn_signal_handler(shared.clone());
    clock::check(&shared).await;
    tokio::spawn(clock::watch(shared.clone()));
    tokio::spawn(http::serve(listener, shared.clone(), metrics));
    let outbox = tokio::spawn(outbox::run(shared.clone()));
    tokio::spawn(prune_state(shared.clone()));
    tokio::spawn(refresher::run(shared.clone()));
    let runner = tokio::spawn(runner::run(shared.clone()));
    let consumer = consumer::run(shared.clone());

    // The consumer returns on shutdown, or with an error when the broker stayed unreachable.
    let consumed = consumer.await;
    if let Err(e) = &consumed {
        error!(error.message = %format!("{e:#}"), "broker supervisor gave up; shutting down");
        let _ = shared.shutdown.send(true);
        shared.request_run_stop();
    }
    let grace = Duration::from_secs(shared.settings.grace_seconds as u64);
    let drained = tokio::time::timeout(grace, async {
        if let Err(e) = runner.await {
            error!(error.message = %e, "scheduler task panicked");
        }
        shared.outbox_wake.notify_one();
        if let Err(e) = outbox.await {
            error!(error.message = %e, "outbox task panicked");
        }
    })
    .await;
    match (drained, consumed) {
        (Ok(()), Ok(())) => {
            info!("worker stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
        (Err(_), _) => {
            error!(grace_seconds = shared.settings.grace_seconds, "grace period over before the run stopped; exiting");
            Ok(ExitCode::FAILURE)
        }
        (Ok(()), Err(_)) => Ok(ExitCode::FAILURE),
    }
}

impl Shared {
    /// Asks the run in progress (if any) to stop at its next batch boundary.
    pub fn request_run_stop(&self) {
        if let Some(stop) = self.run_stop.lock().expect("run_stop lock").as_ref() {
            stop.request();
        }
    }
}

/// Connects to Postgres and migrates, retrying while it is unreachable (a worker may start before
/// its database).
async fn connect_database(url: &str) -> anyhow::Result<sqlx::PgPool> {
    use backon::{ExponentialBuilder, Retryable};
    let attempt = || async {
        let pool = crate::db::connect(url).await?;
        crate::db::migrate(&pool).await?;
        anyhow::Ok(pool)
    };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(10))
                .with_max_times(12)
                .with_jitter(),
        )
        .notify(|e, after| warn!(error.message = %format!("{e:#}"), retry_in = ?after, "database not ready"))
        .await
}

/// Prunes the state tables to `STATE_RETENTION_DAYS` at start and hourly; one worker at a time does
/// (an advisory lock), the others skip that round.
async fn prune_state(shared: Arc<Shared>) {
    let horizon = Duration::from_secs(shared.settings.retention_days as u64 * 24 * 3600);
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        match runner::bounded(Duration::from_secs(300), crate::db::prune::prune(&shared.pool, horizon)).await {
            Ok(Some(pruned)) => {
                for (table, n) in [
                    ("retrain_requests", pruned.retrain_requests),
                    ("outbox", pruned.outbox),
                    ("run_jobs", pruned.run_jobs),
                    ("training_runs", pruned.training_runs),
                ] {
                    metrics::counter!("audotics_state_rows_pruned_total", "table" => table).increment(n);
                }
                info!(?pruned, retention_days = shared.settings.retention_days, "state tables pruned");
            }
            Ok(None) => info!("another worker is pruning the state tables"),
            Err(e) => {
                metrics::counter!("audotics_database_errors_total", "operation" => "prune").increment(1);
                warn!(error.message = %e, "cannot prune the state tables; next round in an hour");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("{}-{}", if host.is_empty() { "worker" } else { &host }, std::process::id())
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once (status 130).
fn spawn_signal_handler(shared: Arc<Shared>) {
    crate::system::signals::on_stop_signals(move || {
        warn!(grace_seconds = shared.settings.grace_seconds, "shutdown requested: stop consuming, checkpoint, release");
        let _ = shared.shutdown.send(true);
        shared.request_run_stop();
        shared.scheduler_wake.notify_one();
    });
}

/// Whether the flag is set, for readiness.
pub(crate) fn flag(b: &AtomicBool) -> bool {
    b.load(Ordering::SeqCst)
}
