//! One training run, end to end: resolve the run (new or resumed), load the data, train off the async
//! runtime with a checkpoint after every epoch, then write the version's artifacts — recording the
//! run in the Postgres ledger whenever a database is configured.

mod blocking;
pub mod lineage;
mod outcome;
pub mod run_record;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use sqlx::PgPool;
use tracing::{Instrument, error, info, info_span, warn};

pub use outcome::{Published, RejectedVersion, ResourceRefusal, RunOutcome};
pub use run_record::{DataSpec, MinimumSizes, PostgresSpec, RunRecord, load_run_record, save_run_record};

use crate::data::source::LoadOptions;
use crate::data::{Dataset, synthetic};
use crate::db::{self, ledger};
use crate::publish::{gate, layout, store::ModelStore};
use crate::system::device::DeviceChoice;
use crate::training::checkpoint;
use crate::training::resources::MemoryBudget;
use crate::training::trainer::TrainConfig;
use blocking::{BlockingRun, Trained};

/// A cooperative stop request (Ctrl-C, SIGTERM, a lost lease): the run stops at the next batch
/// boundary and writes a checkpoint of that exact position.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The run's lease was gone before it started: another worker took the run over (this one was
/// paused, or stuck on an outage, past its lease) and may already have finished it. Nothing was
/// trained or written to the ledger; the caller leaves the run to its new owner.
#[derive(Debug)]
pub struct LeaseGone;

impl std::fmt::Display for LeaseGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the run's lease was gone before it started: another worker owns it now")
    }
}

impl std::error::Error for LeaseGone {}

/// What to run.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// The model key: the top-level folder of the store (`content-based`).
    pub model: String,
    pub config: TrainConfig,
    pub data: DataSpec,
    /// The real database URL (never stored); required when `data` is Postgres.
    pub database_url: Option<String>,
    /// An open, migrated pool to use instead of connecting to `database_url` (the worker's).
    pub pool: Option<PgPool>,
    pub minimums: MinimumSizes,
    pub device: DeviceChoice,
    /// Continue this run instead of starting a new one (its stored settings win).
    pub resume: Option<String>,
    /// Run under this id: resumed when its `run.json` exists in the store, created otherwise (the
    /// worker's scheduler assigns ids, and a taken-over run continues where it stopped).
    pub run_id: Option<uuid::Uuid>,
    /// The worker's lease on the run (`run_jobs.lease_token`): the ledger's end row is written only
    /// while it holds. `None` for CLI runs.
    pub lease_token: Option<uuid::Uuid>,
    /// Quality gate: refuse to publish when Recall@10 is below the current version's, scored on
    /// this run's held-out listens, by more than this (absolute). `None`: no comparison with the
    /// current version (CLI runs); the floors (`min_lift`) apply either way.
    pub quality_tolerance: Option<f64>,
    /// Quality gate: the relative margin over popularity and raw features (see [`gate`]), and
    /// whether those floors decide.
    pub min_lift: f64,
    pub quality_floors: bool,
    /// Versions to keep in the store after a publish (`--keep-versions`).
    pub keep_versions: usize,
    /// Checkpoints a run keeps while it trains (`--keep-checkpoints`).
    pub keep_checkpoints: usize,
    /// When a new run started, for its version name: the database's clock at claim time for worker
    /// runs (version order must not depend on a worker's clock); `None`: this process's clock.
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Who asked: `cli` or `worker`, recorded in the ledger.
    pub trigger: &'static str,
    pub show_progress: bool,
    pub stop: StopFlag,
    /// Refuse to train when the run's estimated peak memory exceeds this (`None`: unbounded).
    pub memory_budget: Option<MemoryBudget>,
    /// When a run may warm-start from the latest version, and when it must retrain fully.
    pub lineage: lineage::LineageSettings,
    /// A request asked for a full retrain (`params.full`).
    pub requested_full: bool,
    /// No training: embed the tracks added since the latest version with its weights and publish
    /// (`params.refresh`, `train --refresh`).
    pub refresh: bool,
}

/// What every run of a process starts from (the `train` flags): the CLI's one run, and each of the
/// worker's runs before a request's parameters apply.
#[derive(Debug, Clone)]
pub struct RunDefaults {
    pub config: TrainConfig,
    /// The table settings a run of a collaborative or hybrid model key uses (the worker maps keys
    /// to kinds; `config.tables` is set for the CLI's one run).
    pub tables: crate::training::model::tables::TableConfig,
    /// `--centering-weight` as given; unset, each kind's default applies ([`Self::config_for`]).
    pub centering_weight: Option<f64>,
    pub minimums: MinimumSizes,
    pub device: DeviceChoice,
    pub min_lift: f64,
    pub quality_floors: bool,
    pub keep_versions: usize,
    pub keep_checkpoints: usize,
    /// How the database is named in what is published (never its URL).
    pub data_source_label: String,
    /// Whether playlist co-membership counts as co-occurrence.
    pub playlists: bool,
    pub lineage: lineage::LineageSettings,
}

impl RunDefaults {
    /// `config` for a run of `kind`: its tables' settings, and the kind's centering weight unless
    /// one was given.
    pub fn config_for(&self, kind: crate::training::model::ModelKind) -> TrainConfig {
        self.config.clone().for_kind(kind, self.tables, self.centering_weight)
    }

    /// The platform's data, read up to what is there when the run starts.
    pub fn postgres_data(&self) -> DataSpec {
        DataSpec::Postgres(PostgresSpec {
            database: self.data_source_label.clone(),
            playlists: self.playlists,
            interactions_until_ms: None,
            tracks_until_ms: None,
        })
    }

    /// A new run of `model` on `data` with `config`: a CLI run on this process's clock, with no
    /// lease, no current-version comparison and no memory budget until the caller sets them.
    pub fn job(&self, model: String, config: TrainConfig, data: DataSpec, stop: StopFlag) -> TrainJob {
        TrainJob {
            model,
            config,
            data,
            database_url: None,
            pool: None,
            minimums: self.minimums,
            device: self.device,
            resume: None,
            run_id: None,
            lease_token: None,
            quality_tolerance: None,
            min_lift: self.min_lift,
            quality_floors: self.quality_floors,
            keep_versions: self.keep_versions,
            keep_checkpoints: self.keep_checkpoints,
            started_at: None,
            trigger: "cli",
            show_progress: false,
            stop,
            memory_budget: None,
            lineage: self.lineage,
            requested_full: false,
            refresh: false,
        }
    }
}

/// Runs `job` against `store`.
pub async fn run(store: &ModelStore, job: TrainJob) -> anyhow::Result<RunOutcome> {
    let pool = match (&job.pool, &job.database_url) {
        (Some(pool), _) => Some(pool.clone()),
        (None, Some(url)) => {
            let pool = db::connect(url).await?;
            db::migrate(&pool).await?;
            Some(pool)
        }
        (None, None) => None,
    };
    let (mut record, record_tag) = match (&job.resume, job.run_id) {
        (Some(run_id), _) => load_run_record(store, &job.model, run_id).await?,
        (None, Some(id)) if store.exists(&layout::run_record(&job.model, &id.to_string())).await? => {
            load_run_record(store, &job.model, &id.to_string()).await?
        }
        (None, id) => {
            let id = id.unwrap_or_else(uuid::Uuid::now_v7);
            let started = job.started_at.unwrap_or_else(chrono::Utc::now);
            let m = RunRecord::started_at(
                id,
                started,
                &job.model,
                job.config.clone(),
                job.data.clone(),
                job.minimums,
                job.device,
            );
            match save_run_record(store, &m, None).await? {
                Some(tag) => (m, tag),
                // Another owner of this run wrote it first: its record is the run's.
                None => load_run_record(store, &job.model, &m.run_id).await?,
            }
        }
    };
    anyhow::ensure!(
        !matches!(record.data, DataSpec::Postgres(_)) || pool.is_some(),
        "run {} reads the platform's database: give --database-url (or DATABASE_URL)",
        record.run_id
    );
    let span = info_span!("training_run", run_id = %record.run_id, model = %record.model, version = %record.version);
    async {
        info!(resumed = job.resume.is_some(), store = %store.root_url(), "run started");
        let run_id = record.run_uuid()?;
        if let Some(pool) = &pool {
            let config = serde_json::to_value(&record.config)?;
            let recorded = ledger::record_start(
                pool,
                run_id,
                &record.model,
                &record.version,
                job.trigger,
                &config,
                job.lease_token,
            )
            .await
            .context("cannot record the run in the training_runs ledger")?;
            if !recorded {
                warn!("the run's lease is gone before it started: leaving the run to its new owner");
                return Err(LeaseGone.into());
            }
        }
        let result = execute(store, &job, &mut record, record_tag, pool.as_ref()).await;
        if let Some(pool) = &pool {
            record_end(pool, run_id, &result, job.lease_token).await?;
        }
        result
    }
    .instrument(span)
    .await
}

/// What the lineage decision reads of the version `latest.json` names: `None` when there is none,
/// or when it is this run's own (a publish retried after it advanced `latest.json`).
async fn latest_summary(
    store: &ModelStore,
    model: &str,
    this_version: &str,
) -> anyhow::Result<Option<lineage::ParentSummary>> {
    let Some(latest) = crate::publish::versions::read_latest(store, model).await? else { return Ok(None) };
    if latest.version == this_version {
        return Ok(None);
    }
    let key = layout::version_object(model, &latest.version, layout::METADATA);
    let summary =
        serde_json::from_slice(&store.get(&key).await?).with_context(|| format!("{key} is not valid metadata"))?;
    Ok(Some(summary))
}

/// Loads the data, trains and publishes.
async fn execute(
    store: &ModelStore,
    job: &TrainJob,
    record: &mut RunRecord,
    record_tag: Option<String>,
    pool: Option<&PgPool>,
) -> anyhow::Result<RunOutcome> {
    let resume_from = latest_checkpoint(store, record).await?;
    let dataset = load_dataset(record, pool).await?;
    let mut changed = false;
    if let DataSpec::Postgres(spec) = &mut record.data
        && spec.interactions_until_ms.is_none()
    {
        // Pin the history and the catalogue this run trains on, so a resume reads the same rows.
        spec.interactions_until_ms = Some(dataset.watermark.newest_interaction_ms.unwrap_or(i64::MIN));
        spec.tracks_until_ms = Some(dataset.watermark.newest_track_created_ms.unwrap_or(0));
        changed = true;
    }
    if record.lineage.is_none() {
        // Decided once, on this data, and kept: a resumed run warm-starts from the same parent.
        let plan = if job.refresh {
            let parent = latest_summary(store, &record.model, &record.version)
                .await?
                .with_context(|| format!("nothing to refresh: model {} has no version yet", record.model))?;
            let plan = lineage::refresh_plan(&parent)?;
            // A refresh embeds with the parent's weights, so with exactly its settings.
            record.config = serde_json::from_value(parent.hyperparameters.clone())
                .with_context(|| format!("version {}'s hyperparameters", parent.model_version))?;
            plan
        } else {
            let parent = match job.lineage.warm_start {
                lineage::WarmStart::Off => None,
                lineage::WarmStart::Auto => latest_summary(store, &record.model, &record.version).await?,
            };
            lineage::decide(
                &job.lineage,
                parent.as_ref(),
                job.requested_full,
                record.config.model_kind,
                record.config.encoder.embedding_size,
                &dataset.interactions,
            )
        };
        info!(mode = ?plan.mode, parent = plan.parent_version.as_deref().unwrap_or(""), reason = %plan.reason, "lineage decided");
        record.config = lineage::config_for_plan(record.config.clone(), &plan, &job.lineage);
        record.lineage = Some(plan);
        changed = true;
    }
    if changed {
        anyhow::ensure!(
            save_run_record(store, record, Some(record_tag)).await?.is_some(),
            "{} changed since this worker read it: another worker took the run over (this one's lease \
             was lost), so this one stops without writing the run's state",
            layout::run_record(&record.model, &record.run_id)
        );
    }
    info!(
        rss_mib = crate::system::procstat::rss_bytes().unwrap_or(0) >> 20,
        peak_rss_mib = crate::system::procstat::peak_rss_bytes().unwrap_or(0) >> 20,
        "data loaded"
    );
    let context = BlockingRun {
        store: store.clone(),
        runtime: tokio::runtime::Handle::current(),
        record: record.clone(),
        resume_from,
        show_progress: job.show_progress,
        stop: job.stop.clone(),
        memory_budget: job.memory_budget,
        keep_checkpoints: job.keep_checkpoints,
        owner: job.lease_token.map(|t| t.simple().to_string()[..12].to_string()),
        published_metadata: Default::default(),
        gate: gate::GateSettings {
            min_lift: job.min_lift,
            floors: job.quality_floors,
            tolerance: job.quality_tolerance,
        },
    };
    let span = tracing::Span::current();
    let trained = tokio::task::spawn_blocking(move || span.in_scope(|| context.train(dataset)))
        .await
        .context("training task panicked")??;
    match trained {
        Trained::Stopped { epochs_completed } => {
            info!(epochs_completed, "run stopped on request; resume with --resume {}", record.run_id);
            Ok(RunOutcome::Stopped { run_id: record.run_id.clone(), epochs_completed })
        }
        Trained::InsufficientData { reason } => {
            warn!(%reason, "insufficient data: nothing trained");
            Ok(RunOutcome::InsufficientData { run_id: record.run_id.clone(), reason })
        }
        Trained::OverBudget { estimate, budget } => {
            let refusal = ResourceRefusal { run_id: record.run_id.clone(), estimate, budget };
            warn!(reason = %refusal.reason(), "resource limit: nothing trained");
            Ok(RunOutcome::ResourceLimit(Box::new(refusal)))
        }
        Trained::Done(files) => {
            let gate = files.metadata.quality_gate.clone().context("a trained version has the gate's verdict")?;
            if !gate.passed {
                let reason = format!("quality gate: {}", gate.reason());
                warn!(%reason, "version not published");
                return Ok(RunOutcome::Rejected(Box::new(RejectedVersion {
                    run_id: record.run_id.clone(),
                    version: record.version.clone(),
                    reason,
                    metadata: files.metadata,
                    gate,
                })));
            }
            blocking::publish(store, record, *files, job.keep_versions).await
        }
    }
}

/// Records how the run ended in the ledger, unless the run's lease moved on (its new owner records it).
async fn record_end(
    pool: &PgPool,
    run_id: uuid::Uuid,
    result: &anyhow::Result<RunOutcome>,
    lease_token: Option<uuid::Uuid>,
) -> anyhow::Result<()> {
    let (status, end) = match result {
        Ok(outcome) => (outcome.status(), outcome.ledger_end()?),
        Err(e) => (ledger::RunStatus::Failed, ledger::RunEnd { error: Some(format!("{e:#}")), ..Default::default() }),
    };
    match ledger::record_end(pool, run_id, status, &end, lease_token).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            warn!(status = status.as_str(), "the run's lease is gone: its new owner records its end in the ledger");
            Ok(())
        }
        Err(e) => {
            error!(error.message = %e, "cannot record the end of the run in the training_runs ledger");
            Err(e).context("cannot record the end of the run in the training_runs ledger")
        }
    }
}

/// The newest checkpoint of the run, if any: `((completed epochs, steps into the next), bytes)`.
async fn latest_checkpoint(
    store: &ModelStore,
    record: &RunRecord,
) -> anyhow::Result<Option<((usize, usize), bytes::Bytes)>> {
    let keys = store.list(&layout::checkpoints_dir(&record.model, &record.run_id)).await?;
    let newest = keys
        .iter()
        .filter_map(|k| Some((checkpoint::position_of(k.rsplit('/').next()?)?, k)))
        .max_by_key(|(position, _)| *position);
    match newest {
        Some((position, key)) => Ok(Some((position, store.get(key).await?))),
        None => Ok(None),
    }
}

async fn load_dataset(record: &RunRecord, pool: Option<&PgPool>) -> anyhow::Result<Dataset> {
    let span = info_span!("load_data");
    async {
        match &record.data {
            DataSpec::Synthetic(spec) => {
                let spec = spec.clone();
                warn!(
                    tracks = spec.tracks,
                    users = spec.users,
                    interactions = spec.interactions,
                    "no database configured: training on SYNTHETIC data"
                );
                Ok(tokio::task::spawn_blocking(move || synthetic::generate(&spec)).await?)
            }
            DataSpec::Postgres(spec) => {
                let pool = pool.context("no database connection")?;
                let options = LoadOptions {
                    playlists: spec.playlists,
                    positive_kinds: record.config.positive_kinds.clone(),
                    interactions_until_ms: spec.interactions_until_ms,
                    tracks_until_ms: spec.tracks_until_ms,
                };
                db::load::load(pool, &options, &spec.database).await
            }
        }
    }
    .instrument(span)
    .await
}
