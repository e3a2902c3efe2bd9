//! One training run, end to end: resolve the run (new or resumed), load the data, train off the async
//! runtime with a checkpoint after every epoch, then write the version's artifacts.
//!
//! A run is identified by its `run_id` and records its settings in `<model>/runs/<run-id>/run.json`
//! before training starts, so `--resume <run-id>` can rebuild exactly the same data and settings and
//! continue from the newest checkpoint. The version name is fixed when the run is created, so a
//! resumed run publishes under the same version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use chrono::{SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span, warn};

use crate::artifacts::{self, DataSummary, ModelMetadata, TRAINER_VERSION, Watermark};
use crate::checkpoint;
use crate::data::{Dataset, synthetic};
use crate::device::{self, DeviceChoice};
use crate::storage::{ModelStore, layout};
use crate::telemetry::EpochProgress;
use crate::train::{Control, EpochMetrics, PreparedData, TrainConfig, TrainObserver, Trainer, TrainingState};

/// Where a run's data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSpec {
    /// Generated in-process: the embedded default when no database is configured.
    Synthetic(synthetic::SyntheticSpec),
}

/// A cooperative stop request (Ctrl-C, SIGTERM): the run stops after the epoch in progress, whose
/// checkpoint is written first.
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
    pub device: DeviceChoice,
    /// Continue this run instead of starting a new one (its stored settings win).
    pub resume: Option<String>,
    pub show_progress: bool,
    pub stop: StopFlag,
}

/// `run.json`: a run's identity and settings, written before training starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    pub run_id: String,
    pub model: String,
    pub version: String,
    pub created_at: String,
    pub config: TrainConfig,
    pub data: DataSpec,
    pub device: DeviceChoice,
    pub trainer_version: String,
}

impl RunManifest {
    fn new(job: &TrainJob) -> Self {
        let run_id = uuid::Uuid::now_v7();
        let now = Utc::now();
        // Sortable by time; the uuid's random tail keeps two runs in one second apart.
        let version = format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), &run_id.simple().to_string()[26..]);
        Self {
            run_id: run_id.to_string(),
            model: job.model.clone(),
            version,
            created_at: now.to_rfc3339_opts(SecondsFormat::Millis, true),
            config: job.config.clone(),
            data: job.data.clone(),
            device: job.device,
            trainer_version: TRAINER_VERSION.to_string(),
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
}

/// A published version.
#[derive(Debug)]
pub struct Published {
    pub run_id: String,
    pub version: String,
    pub metadata: ModelMetadata,
    /// Artifact name → full URL.
    pub artifacts: BTreeMap<String, String>,
}

/// Runs `job` against `store`.
pub async fn run(store: &ModelStore, job: TrainJob) -> anyhow::Result<RunOutcome> {
    let manifest = match &job.resume {
        Some(run_id) => load_manifest(store, &job.model, run_id).await?,
        None => {
            let manifest = RunManifest::new(&job);
            let key = layout::run_manifest(&manifest.model, &manifest.run_id);
            store.put(&key, serde_json::to_vec_pretty(&manifest)?).await?;
            manifest
        }
    };
    let span =
        info_span!("training_run", run_id = %manifest.run_id, model = %manifest.model, version = %manifest.version);
    async move {
        info!(resumed = job.resume.is_some(), store = %store.root_url(), "run started");
        let resume_from = latest_checkpoint(store, &manifest).await?;
        let dataset = load_dataset(&manifest.data).await?;
        info!(
            rss_mib = crate::procstat::rss_bytes().unwrap_or(0) >> 20,
            peak_rss_mib = crate::procstat::peak_rss_bytes().unwrap_or(0) >> 20,
            "data loaded"
        );
        let context = BlockingRun {
            store: store.clone(),
            runtime: tokio::runtime::Handle::current(),
            manifest: manifest.clone(),
            resume_from,
            show_progress: job.show_progress,
            stop: job.stop.clone(),
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
            Trained::Done(files) => publish(store, &manifest, *files).await,
        }
    }
    .instrument(span)
    .await
}

async fn load_manifest(store: &ModelStore, model: &str, run_id: &str) -> anyhow::Result<RunManifest> {
    let key = layout::run_manifest(model, run_id);
    let bytes = store
        .get(&key)
        .await
        .with_context(|| format!("cannot resume run {run_id}: no {key} in {}", store.root_url()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{key} is not a valid run manifest"))
}

/// The newest checkpoint of the run, if any: `(epoch, bytes)`.
async fn latest_checkpoint(
    store: &ModelStore,
    manifest: &RunManifest,
) -> anyhow::Result<Option<(usize, bytes::Bytes)>> {
    let keys = store.list(&layout::checkpoints_dir(&manifest.model, &manifest.run_id)).await?;
    let newest = keys
        .iter()
        .filter_map(|k| Some((checkpoint::epoch_of(k.rsplit('/').next()?)?, k)))
        .max_by_key(|(epoch, _)| *epoch);
    match newest {
        Some((epoch, key)) => Ok(Some((epoch, store.get(key).await?))),
        None => Ok(None),
    }
}

async fn load_dataset(spec: &DataSpec) -> anyhow::Result<Dataset> {
    let _span = info_span!("load_data").entered();
    match spec {
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
    }
}

/// The blocking half of a run: everything that touches candle.
struct BlockingRun {
    store: ModelStore,
    runtime: tokio::runtime::Handle,
    manifest: RunManifest,
    resume_from: Option<(usize, bytes::Bytes)>,
    show_progress: bool,
    stop: StopFlag,
}

enum Trained {
    Done(Box<VersionFiles>),
    Stopped { epochs_completed: usize },
}

/// The serialised artifacts of a finished run.
struct VersionFiles {
    metadata: ModelMetadata,
    weights: Vec<u8>,
    embeddings: Vec<u8>,
}

impl BlockingRun {
    fn train(self, dataset: Dataset) -> anyhow::Result<Trained> {
        let config = &self.manifest.config;
        let device = device::select(self.manifest.device)?;
        info!(device = %device::describe(&device), "device selected");
        let data = PreparedData::new(&dataset, config, &device)?;
        let trainer = Trainer::new(config, &data)?;
        info!(
            tracks = data.num_tracks(),
            users = data.mining.users,
            training_user_tracks = data.train.len(),
            heldout_user_tracks = data.heldout.len(),
            pairs_per_epoch = trainer.pairs_per_epoch(),
            skipped_non_positive = data.mining.non_positive_interactions,
            rss_mib = crate::procstat::rss_bytes().unwrap_or(0) >> 20,
            "data prepared"
        );
        anyhow::ensure!(
            trainer.pairs_per_epoch() > 0,
            "insufficient data: no user has two distinct positive tracks to pair"
        );
        let baselines = trainer.baselines()?;
        info!(
            raw_recall_at_10 = baselines.raw_features.recall_at_10,
            popularity_recall_at_10 = baselines.popularity.recall_at_10,
            peak_rss_mib = crate::procstat::peak_rss_bytes().unwrap_or(0) >> 20,
            "baselines"
        );

        let mut state = TrainingState::new(config, &device)?;
        if let Some((epoch, bytes)) = &self.resume_from {
            checkpoint::restore(bytes, &mut state, config)
                .with_context(|| format!("restoring checkpoint of epoch {epoch}"))?;
            info!(epoch, "resumed from checkpoint");
        }
        let mut observer = Checkpointer { run: &self, progress: EpochProgress::new(self.show_progress) };
        let finished = trainer.run(&mut state, &mut observer)?;
        drop(observer);
        if !finished {
            return Ok(Trained::Stopped { epochs_completed: state.epoch });
        }

        let embeddings = state.encoder.embed(&data.features)?;
        let final_metrics = trainer.evaluate(&embeddings)?;
        let metadata = self.metadata(&dataset, &data, &state, final_metrics, baselines, &device);
        Ok(Trained::Done(Box::new(VersionFiles {
            weights: artifacts::weights_bytes(&state.encoder, &self.manifest.version)?,
            embeddings: artifacts::embeddings_bytes(&embeddings, &self.manifest.version)?,
            metadata,
        })))
    }

    fn metadata(
        &self,
        dataset: &Dataset,
        data: &PreparedData,
        state: &TrainingState,
        final_metrics: crate::eval::RankingMetrics,
        baselines: crate::train::Baselines,
        device: &candle_core::Device,
    ) -> ModelMetadata {
        let m = &self.manifest;
        let (feature_names, feature_means, feature_stds) = artifacts::feature_columns(&data.standardizer);
        let newest = dataset.interactions.newest_timestamp_ms().and_then(|ms| Utc.timestamp_millis_opt(ms).single());
        ModelMetadata {
            model_type: artifacts::MODEL_TYPE.to_string(),
            model_name: m.model.clone(),
            model_version: m.version.clone(),
            run_id: m.run_id.clone(),
            training_date: Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
            feature_names,
            feature_means,
            feature_stds,
            track_ids: dataset.catalogue.track_ids.clone(),
            num_tracks: dataset.catalogue.len(),
            embedding_size: m.config.encoder.embedding_size,
            training_history: state.history.clone(),
            final_metrics,
            baselines,
            architecture: artifacts::architecture(&m.config.encoder),
            hyperparameters: m.config.clone(),
            loss: m.config.loss.kind.to_string(),
            data: DataSummary {
                source: dataset.source.clone(),
                synthetic: dataset.source.is_synthetic(),
                num_tracks: dataset.catalogue.len(),
                num_users: dataset.interactions.user_ids.len(),
                num_interactions: dataset.interactions.len(),
                mining: data.mining.clone(),
                training_user_tracks: data.train.len(),
                heldout_user_tracks: data.heldout.len(),
                watermark: Watermark {
                    newest_interaction_at: newest.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
                    interactions: dataset.interactions.len(),
                },
            },
            device: device::describe(device),
            seed: m.config.seed,
            trainer_version: TRAINER_VERSION.to_string(),
            epochs_completed: state.epoch,
        }
    }
}

/// Writes a checkpoint after every epoch, logs the epoch, drives the progress bar, and stops the
/// loop when a stop was requested.
struct Checkpointer<'a> {
    run: &'a BlockingRun,
    progress: EpochProgress,
}

impl TrainObserver for Checkpointer<'_> {
    fn epoch_started(&mut self, epoch: usize, pairs: usize) {
        self.progress.start_epoch(epoch, self.run.manifest.config.epochs, pairs);
    }

    fn batch_finished(&mut self, pairs: usize) {
        self.progress.advance(pairs);
    }

    fn epoch_finished(&mut self, state: &TrainingState, m: &EpochMetrics) -> anyhow::Result<Control> {
        let run = self.run;
        let bytes = checkpoint::to_bytes(state, &run.manifest.config)?;
        let key = layout::checkpoint(&run.manifest.model, &run.manifest.run_id, state.epoch);
        run.runtime.block_on(run.store.put(&key, bytes)).with_context(|| format!("writing checkpoint {key}"))?;
        info!(
            epoch = m.epoch,
            epochs = run.manifest.config.epochs,
            loss = m.loss,
            val_loss = m.val_loss,
            recall_at_10 = m.ranking.recall_at_10,
            ndcg_at_10 = m.ranking.ndcg_at_10,
            mean_pairwise_cosine = m.mean_pairwise_cosine,
            pairs_per_second = m.pairs_per_second.round(),
            seconds = m.seconds,
            peak_rss_mib = crate::procstat::peak_rss_bytes().unwrap_or(0) >> 20,
            "epoch finished"
        );
        Ok(if run.stop.is_requested() { Control::Stop } else { Control::Continue })
    }
}

/// Writes the version's objects; the metadata goes last, so its presence means the version is whole.
async fn publish(store: &ModelStore, manifest: &RunManifest, files: VersionFiles) -> anyhow::Result<RunOutcome> {
    let span = info_span!("publish_version");
    async move {
        let (model, version) = (&manifest.model, &manifest.version);
        let mut artifacts = BTreeMap::new();
        for (name, bytes) in [
            (layout::WEIGHTS, files.weights),
            (layout::EMBEDDINGS, files.embeddings),
            (layout::METADATA, serde_json::to_vec_pretty(&files.metadata)?),
        ] {
            let key = layout::version_object(model, version, name);
            store.put(&key, bytes).await.with_context(|| format!("writing {key}"))?;
            artifacts.insert(name.to_string(), store.url_of(&key));
        }
        info!(
            recall_at_10 = files.metadata.final_metrics.recall_at_10,
            raw_features_recall_at_10 = files.metadata.baselines.raw_features.recall_at_10,
            popularity_recall_at_10 = files.metadata.baselines.popularity.recall_at_10,
            location = %store.url_of(&layout::version_dir(model, version)),
            "version written"
        );
        Ok(RunOutcome::Published(Box::new(Published {
            run_id: manifest.run_id.clone(),
            version: version.clone(),
            metadata: files.metadata,
            artifacts,
        })))
    }
    .instrument(span)
    .await
}
