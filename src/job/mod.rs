//! One training run, end to end: resolve the run (new or resumed), load the data, train off the async
//! runtime with a checkpoint after every epoch, then write the version's artifacts — recording the
//! run in the Postgres ledger whenever a database is configured.

mod blocking;
pub mod manifest;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use serde_json::json;
use sqlx::PgPool;
use tracing::{Instrument, error, info, info_span, warn};

pub use manifest::{DataSpec, MinimumSizes, PostgresSpec, RunManifest};

use crate::data::source::LoadOptions;
use crate::data::{Dataset, synthetic};
use crate::db::{self, ledger};
use crate::publish::artifacts::ModelMetadata;
use crate::publish::{gate, layout, store::ModelStore};
use crate::system::device::DeviceChoice;
use crate::system::procstat::human;
use crate::training::checkpoint;
use crate::training::resources::{MemoryBudget, MemoryEstimate};
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
}

/// What every run of a process starts from (the `train` flags): the CLI's one run, and each of the
/// worker's runs before a request's parameters apply.
#[derive(Debug, Clone)]
pub struct RunDefaults {
    pub config: TrainConfig,
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
}

impl RunDefaults {
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
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// All epochs done and the version's artifacts written.
    Published(Box<Published>),
    /// Stopped on request after `epochs_completed` epochs; `--resume <run_id>` continues it.
    Stopped { run_id: String, epochs_completed: usize },
    /// The data is below the minimum sizes; nothing was trained.
    InsufficientData { run_id: String, reason: String },
    /// Trained, but the quality gate kept the current version; nothing was uploaded.
    Rejected(Box<Rejected>),
    /// The run would need more memory than the budget; nothing was trained. Retrying cannot help.
    ResourceLimit(Box<ResourceRefusal>),
}

/// A run refused before training because its estimated peak memory exceeds the budget.
#[derive(Debug, Clone)]
pub struct ResourceRefusal {
    pub run_id: String,
    pub estimate: MemoryEstimate,
    pub budget: MemoryBudget,
}

impl ResourceRefusal {
    pub fn reason(&self) -> String {
        format!(
            "estimated peak memory {} (data and process {}, training step {}, validation {}, evaluation and export {}) exceeds the worker's memory budget {} ({}); lower params.batch_size or raise WORKER_MEMORY_LIMIT",
            human(self.estimate.peak_bytes),
            human(self.estimate.in_use_bytes),
            human(self.estimate.train_step_bytes),
            human(self.estimate.validation_bytes),
            human(self.estimate.evaluate_and_export_bytes),
            human(self.budget.bytes),
            self.budget.source.as_str(),
        )
    }
}

/// A version the quality gate refused.
#[derive(Debug)]
pub struct Rejected {
    pub run_id: String,
    pub version: String,
    pub reason: String,
    pub metadata: ModelMetadata,
    /// Every check, the figures it compared, and the current version's score on this run's
    /// held-out listens.
    pub gate: gate::GateReport,
}

/// A published version.
#[derive(Debug)]
pub struct Published {
    pub run_id: String,
    pub version: String,
    pub metadata: ModelMetadata,
    /// Artifact name → full URL (`manifest` included).
    pub artifacts: BTreeMap<String, String>,
    /// URL of the version's folder.
    pub location: String,
    pub manifest_sha256: String,
    /// Whether `latest.json` names this version now.
    pub is_latest: bool,
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
    let (mut manifest, manifest_tag) = match (&job.resume, job.run_id) {
        (Some(run_id), _) => load_manifest(store, &job.model, run_id).await?,
        (None, Some(id)) if store.exists(&layout::run_manifest(&job.model, &id.to_string())).await? => {
            load_manifest(store, &job.model, &id.to_string()).await?
        }
        (None, id) => {
            let id = id.unwrap_or_else(uuid::Uuid::now_v7);
            let started = job.started_at.unwrap_or_else(chrono::Utc::now);
            let m = RunManifest::started_at(
                id,
                started,
                &job.model,
                job.config.clone(),
                job.data.clone(),
                job.minimums,
                job.device,
            );
            match save_manifest(store, &m, None).await? {
                Some(tag) => (m, tag),
                // Another owner of this run wrote it first: its manifest is the run's.
                None => load_manifest(store, &job.model, &m.run_id).await?,
            }
        }
    };
    anyhow::ensure!(
        !matches!(manifest.data, DataSpec::Postgres(_)) || pool.is_some(),
        "run {} reads the platform's database: give --database-url (or DATABASE_URL)",
        manifest.run_id
    );
    let span =
        info_span!("training_run", run_id = %manifest.run_id, model = %manifest.model, version = %manifest.version);
    async {
        info!(resumed = job.resume.is_some(), store = %store.root_url(), "run started");
        let run_id = manifest.run_uuid()?;
        if let Some(pool) = &pool {
            let config = serde_json::to_value(&manifest.config)?;
            ledger::record_start(pool, run_id, &manifest.model, &manifest.version, job.trigger, &config)
                .await
                .context("cannot record the run in the training_runs ledger")?;
        }
        let result = execute(store, &job, &mut manifest, manifest_tag, pool.as_ref()).await;
        if let Some(pool) = &pool {
            record_end(pool, run_id, &result, job.lease_token).await?;
        }
        result
    }
    .instrument(span)
    .await
}

/// Loads the data, trains and publishes.
async fn execute(
    store: &ModelStore,
    job: &TrainJob,
    manifest: &mut RunManifest,
    manifest_tag: Option<String>,
    pool: Option<&PgPool>,
) -> anyhow::Result<RunOutcome> {
    let resume_from = latest_checkpoint(store, manifest).await?;
    let dataset = load_dataset(manifest, pool).await?;
    if let DataSpec::Postgres(spec) = &mut manifest.data
        && spec.interactions_until_ms.is_none()
    {
        // Pin the history and the catalogue this run trains on, so a resume reads the same rows.
        spec.interactions_until_ms = Some(dataset.watermark.newest_interaction_ms.unwrap_or(i64::MIN));
        spec.tracks_until_ms = Some(dataset.watermark.newest_track_created_ms.unwrap_or(0));
        anyhow::ensure!(
            save_manifest(store, manifest, Some(manifest_tag)).await?.is_some(),
            "{} changed since this worker read it: another worker took the run over (this one's lease \
             was lost), so this one stops without writing the run's state",
            layout::run_manifest(&manifest.model, &manifest.run_id)
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
        manifest: manifest.clone(),
        resume_from,
        show_progress: job.show_progress,
        stop: job.stop.clone(),
        memory_budget: job.memory_budget,
        keep_checkpoints: job.keep_checkpoints,
        owner: job.lease_token.map(|t| t.simple().to_string()[..12].to_string()),
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
            info!(epochs_completed, "run stopped on request; resume with --resume {}", manifest.run_id);
            Ok(RunOutcome::Stopped { run_id: manifest.run_id.clone(), epochs_completed })
        }
        Trained::InsufficientData { reason } => {
            warn!(%reason, "insufficient data: nothing trained");
            Ok(RunOutcome::InsufficientData { run_id: manifest.run_id.clone(), reason })
        }
        Trained::OverBudget { estimate, budget } => {
            let refusal = ResourceRefusal { run_id: manifest.run_id.clone(), estimate, budget };
            warn!(reason = %refusal.reason(), "resource limit: nothing trained");
            Ok(RunOutcome::ResourceLimit(Box::new(refusal)))
        }
        Trained::Done(files) => {
            let gate = files.metadata.quality_gate.clone().context("a trained version has the gate's verdict")?;
            if !gate.passed {
                let reason = format!("quality gate: {}", gate.reason());
                warn!(%reason, "version not published");
                return Ok(RunOutcome::Rejected(Box::new(Rejected {
                    run_id: manifest.run_id.clone(),
                    version: manifest.version.clone(),
                    reason,
                    metadata: files.metadata,
                    gate,
                })));
            }
            blocking::publish(store, manifest, *files, job.keep_versions).await
        }
    }
}

async fn record_end(
    pool: &PgPool,
    run_id: uuid::Uuid,
    result: &anyhow::Result<RunOutcome>,
    lease_token: Option<uuid::Uuid>,
) -> anyhow::Result<()> {
    let (status, end) = match result {
        Ok(RunOutcome::Published(p)) => {
            let m = &p.metadata;
            let end = ledger::RunEnd {
                data_watermark_ms: m.data.watermark.newest_interaction_ms,
                interaction_count: Some(m.data.watermark.interactions as i64),
                counts: Some(serde_json::to_value(&m.data)?),
                metrics: Some(
                    json!({"final": m.final_metrics, "baselines": m.baselines, "quality_gate": m.quality_gate}),
                ),
                artifact_location: Some(p.location.clone()),
                error: None,
            };
            (ledger::RunStatus::Succeeded, end)
        }
        Ok(RunOutcome::Stopped { .. }) => (ledger::RunStatus::Stopped, ledger::RunEnd::default()),
        Ok(RunOutcome::Rejected(r)) => (
            ledger::RunStatus::Rejected,
            ledger::RunEnd {
                metrics: Some(json!({
                    "final": r.metadata.final_metrics,
                    "baselines": r.metadata.baselines,
                    "quality_gate": r.gate,
                })),
                error: Some(r.reason.clone()),
                ..Default::default()
            },
        ),
        Ok(RunOutcome::InsufficientData { reason, .. }) => {
            (ledger::RunStatus::InsufficientData, ledger::RunEnd { error: Some(reason.clone()), ..Default::default() })
        }
        Ok(RunOutcome::ResourceLimit(r)) => {
            (ledger::RunStatus::Failed, ledger::RunEnd { error: Some(r.reason()), ..Default::default() })
        }
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

/// Writes `run.json` only if it is as this worker last read it (`read`: `None` when it must not
/// exist yet, else its entity tag): the fence that keeps a worker whose lease was taken over from
/// overwriting the new owner's manifest. `None` when someone else wrote it in between, else the
/// new entity tag.
pub async fn save_manifest(
    store: &ModelStore,
    manifest: &RunManifest,
    read: Option<Option<String>>,
) -> anyhow::Result<Option<Option<String>>> {
    let key = layout::run_manifest(&manifest.model, &manifest.run_id);
    let bytes = serde_json::to_vec_pretty(manifest)?.into();
    store.put_if_unchanged_tagged(&key, bytes, read).await.with_context(|| format!("writing {key}"))
}

/// Reads `run.json` with its entity tag (for [`save_manifest`]).
pub async fn load_manifest(
    store: &ModelStore,
    model: &str,
    run_id: &str,
) -> anyhow::Result<(RunManifest, Option<String>)> {
    let key = layout::run_manifest(model, run_id);
    let (bytes, tag) = store
        .get_versioned(&key)
        .await
        .with_context(|| format!("cannot resume run {run_id}: no {key} in {}", store.root_url()))?;
    let manifest = serde_json::from_slice(&bytes).with_context(|| format!("{key} is not a valid run manifest"))?;
    Ok((manifest, tag))
}

/// The newest checkpoint of the run, if any: `((completed epochs, steps into the next), bytes)`.
async fn latest_checkpoint(
    store: &ModelStore,
    manifest: &RunManifest,
) -> anyhow::Result<Option<((usize, usize), bytes::Bytes)>> {
    let keys = store.list(&layout::checkpoints_dir(&manifest.model, &manifest.run_id)).await?;
    let newest = keys
        .iter()
        .filter_map(|k| Some((checkpoint::position_of(k.rsplit('/').next()?)?, k)))
        .max_by_key(|(position, _)| *position);
    match newest {
        Some((position, key)) => Ok(Some((position, store.get(key).await?))),
        None => Ok(None),
    }
}

async fn load_dataset(manifest: &RunManifest, pool: Option<&PgPool>) -> anyhow::Result<Dataset> {
    let span = info_span!("load_data");
    async {
        match &manifest.data {
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
                    positive_kinds: manifest.config.positive_kinds.clone(),
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
