//! The blocking half of a run (everything that touches candle) and the publication of its files.

use anyhow::Context;
use bytes::Bytes;
use chrono::Utc;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::{Published, RunManifest, RunOutcome, StopFlag};
use crate::data::Dataset;
use crate::publish::artifacts::{self, DataSummary, ModelMetadata, TRAINER_VERSION};
use crate::publish::export::{HostWeights, keras, model_card, tfjs};
use crate::publish::gate;
use crate::publish::versions::{VersionInfo, apply_retention, publish_version};
use crate::publish::{layout, store::ModelStore};
use crate::system::device;
use crate::system::telemetry::EpochProgress;
use crate::training::checkpoint;
use crate::training::resources::{self, DataSizes, MemoryBudget, MemoryEstimate};
use crate::training::trainer::{
    Control, EpochMetrics, PreparedData, StopReason, TrainObserver, Trainer, TrainingState, best_epoch,
};

/// The blocking half of a run: everything that touches candle.
pub(super) struct BlockingRun {
    pub store: ModelStore,
    pub runtime: tokio::runtime::Handle,
    pub manifest: RunManifest,
    /// The newest checkpoint: `((completed epochs, steps into the next), bytes)`.
    pub resume_from: Option<((usize, usize), bytes::Bytes)>,
    pub show_progress: bool,
    pub stop: StopFlag,
    pub memory_budget: Option<MemoryBudget>,
    pub keep_checkpoints: usize,
    /// The lease holder's fence in checkpoint names (see [`checkpoint::owned_file_name_of`]).
    pub owner: Option<String>,
    /// What the version must beat to be published.
    pub gate: gate::GateSettings,
}

pub(super) enum Trained {
    Done(Box<VersionFiles>),
    Stopped { epochs_completed: usize },
    InsufficientData { reason: String },
    OverBudget { estimate: MemoryEstimate, budget: MemoryBudget },
}

/// The serialised artifacts of a finished run, in upload order (metadata last).
pub(super) struct VersionFiles {
    pub(super) metadata: ModelMetadata,
    files: Vec<(String, Bytes)>,
}

impl BlockingRun {
    pub fn train(self, dataset: Dataset) -> anyhow::Result<Trained> {
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
            rss_mib = crate::system::procstat::rss_bytes().unwrap_or(0) >> 20,
            "data prepared"
        );
        let shortfall =
            self.manifest.minimums.shortfall(data.num_tracks(), data.mining.users, dataset.interactions.len());
        if let Some(reason) = shortfall.or_else(|| {
            (trainer.pairs_per_epoch() == 0).then(|| "no user has two distinct positive tracks to pair".to_string())
        }) {
            return Ok(Trained::InsufficientData { reason });
        }
        if let Some(budget) = self.memory_budget {
            let sizes = DataSizes {
                tracks: data.num_tracks(),
                pairs_per_epoch: trainer.pairs_per_epoch(),
                validation_pairs: data.validation_pairs.len(),
            };
            let estimate = resources::estimate(config, sizes, budget.in_use_now());
            info!(
                peak_mib = estimate.peak_bytes >> 20,
                in_use_mib = estimate.in_use_bytes >> 20,
                train_step_mib = estimate.train_step_bytes >> 20,
                validation_mib = estimate.validation_bytes >> 20,
                evaluate_and_export_mib = estimate.evaluate_and_export_bytes >> 20,
                budget_mib = budget.bytes >> 20,
                budget_source = budget.source.as_str(),
                "memory estimate"
            );
            if estimate.peak_bytes > budget.bytes {
                return Ok(Trained::OverBudget { estimate, budget });
            }
        }
        let h = &data.holdout;
        info!(
            holdout = h.kind.as_str(),
            fraction = h.fraction,
            cutoff = h.cutoff.as_deref().unwrap_or(""),
            heldout_pairs = h.heldout_pairs,
            evaluated_users = trainer.eval_set().users.len(),
            "held-out listens"
        );
        let started = std::time::Instant::now();
        let baselines = trainer.baselines()?;
        info!(
            random_recall_at_10 = baselines.random.recall_at_10,
            popularity_recall_at_10 = baselines.popularity.recall_at_10,
            raw_recall_at_10 = baselines.raw_features.recall_at_10,
            item_cf_recall_at_10 = baselines.item_cf.recall_at_10,
            item_cf_recall_at_10_se = baselines.item_cf.recall_at_10_se,
            seconds = started.elapsed().as_secs_f64(),
            peak_rss_mib = crate::system::procstat::peak_rss_bytes().unwrap_or(0) >> 20,
            "baselines"
        );

        let mut state = TrainingState::new(config, &device)?;
        let mut saved_at = None;
        if let Some(((epoch, step), bytes)) = &self.resume_from {
            saved_at = Some(
                checkpoint::restore(bytes, &mut state, config)
                    .with_context(|| format!("restoring checkpoint of epoch {epoch}"))?,
            );
            metrics::counter!("audotics_runs_resumed_total", "model" => self.manifest.model.clone()).increment(1);
            info!(epoch, step, "resumed from checkpoint");
        }
        // A run resumed after its early-stopping epoch was checkpointed has already stopped.
        let stopped_before = config.early_stop(&state.history);
        let mut observer = Checkpointer {
            run: &self,
            progress: EpochProgress::new(self.show_progress),
            saved_at,
            early_stopped: stopped_before,
        };
        let finished = stopped_before || trainer.run(&mut state, &mut observer)?;
        let (saved_at, early_stopped) = (observer.saved_at.take(), observer.early_stopped);
        drop(observer);
        if !finished && !early_stopped {
            return Ok(Trained::Stopped { epochs_completed: state.epoch });
        }
        let stop_reason = if early_stopped { StopReason::EarlyStopping } else { StopReason::MaxEpochs };

        // The published weights are the best epoch's, restored from its checkpoint (kept for this).
        let best_epoch =
            best_epoch(&state.history.recall_at_10, config.min_delta).context("a finished run has an epoch")?;
        let best = match best_epoch == state.epoch {
            true => None,
            false => Some(self.restore_epoch(best_epoch, &device)?),
        };
        let weights = best.as_ref().unwrap_or(&state);
        let embeddings = weights.encoder.embed(&data.features)?;
        let final_metrics = trainer.evaluate(&embeddings)?;
        info!(
            best_epoch,
            epochs_trained = state.epoch,
            stop_reason = stop_reason.as_str(),
            recall_at_10 = final_metrics.recall_at_10,
            "training ended; publishing the best epoch's weights"
        );
        // The date of the last checkpoint, not "now": a publish retried after a crash must produce
        // byte-identical files, or the immutable version would refuse them.
        let training_date = saved_at.context("a finished run has a checkpoint")?;
        let current = match self.gate.tolerance {
            Some(_) => self.score_current(&trainer, &dataset)?,
            None => None,
        };
        let gate = gate::judge(&final_metrics, &baselines, current, self.gate);
        for check in &gate.checks {
            info!(check = %check.name, passed = check.passed, required = check.required, "{}", check.detail);
        }
        let scores = Scores { final_metrics, baselines, best_epoch, stop_reason, gate };
        let metadata = self.metadata(&dataset, &data, &state, scores, &device, &training_date);
        let files = version_files(weights, &embeddings, &metadata)?;
        Ok(Trained::Done(Box::new(VersionFiles { metadata, files })))
    }

    /// The version `latest.json` names, scored on this run's held-out pairs: its published
    /// embeddings, matched to this catalogue by track id (tracks it does not know rank last).
    /// `None` for a model's first version, or when the latest is this run's own (a retried publish).
    fn score_current(&self, trainer: &Trainer, dataset: &Dataset) -> anyhow::Result<Option<gate::CurrentScore>> {
        use crate::publish::versions::read_latest;
        let m = &self.manifest;
        let Some(latest) = self.runtime.block_on(read_latest(&self.store, &m.model))? else {
            return Ok(None);
        };
        if latest.version == m.version {
            return Ok(None);
        }
        let get = |name: &str| {
            self.runtime.block_on(self.store.get(&layout::version_object(&m.model, &latest.version, name)))
        };
        let metadata: serde_json::Value = serde_json::from_slice(&get(layout::METADATA)?)
            .with_context(|| format!("the current version {}'s metadata", latest.version))?;
        let ids: Vec<&str> =
            metadata["track_ids"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
        let tensors = candle_core::safetensors::load_buffer(&get(layout::EMBEDDINGS)?, &candle_core::Device::Cpu)?;
        let old = tensors.get("embeddings").context("the current version's embeddings file has no `embeddings`")?;
        let (rows, dim) = old.dims2()?;
        anyhow::ensure!(rows == ids.len(), "the current version has {rows} embeddings for {} track ids", ids.len());
        let old: Vec<f32> = old.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let row_of: std::collections::HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let n = dataset.catalogue.len();
        let (mut matched, mut known) = (vec![0f32; n * dim], vec![false; n]);
        for (j, id) in dataset.catalogue.track_ids.iter().enumerate() {
            if let Some(&i) = row_of.get(id.as_str()) {
                matched[j * dim..(j + 1) * dim].copy_from_slice(&old[i * dim..(i + 1) * dim]);
                known[j] = true;
            }
        }
        let embeddings = candle_core::Tensor::from_vec(matched, (n, dim), &candle_core::Device::Cpu)?;
        let metrics = trainer.eval_set().evaluate_embeddings_known(&embeddings, &known)?;
        let known_tracks = known.iter().filter(|k| **k).count();
        info!(
            current_version = %latest.version,
            recall_at_10 = metrics.recall_at_10,
            known_tracks,
            "the current version scored on this run's held-out listens"
        );
        Ok(Some(gate::CurrentScore { version: latest.version, metrics, known_tracks }))
    }

    /// The state at the end of epoch `epoch`, from its checkpoint (whichever owner wrote it).
    fn restore_epoch(&self, epoch: usize, device: &candle_core::Device) -> anyhow::Result<TrainingState> {
        let m = &self.manifest;
        let keys = self.runtime.block_on(self.store.list(&layout::checkpoints_dir(&m.model, &m.run_id)))?;
        let key = keys
            .iter()
            .find(|k| k.rsplit('/').next().and_then(checkpoint::position_of) == Some((epoch, 0)))
            .with_context(|| format!("the checkpoint of the best epoch ({epoch}) is missing"))?;
        let bytes = self.runtime.block_on(self.store.get(key))?;
        let mut state = TrainingState::new(&m.config, device)?;
        checkpoint::restore(&bytes, &mut state, &m.config).with_context(|| format!("restoring {key}"))?;
        Ok(state)
    }

    fn metadata(
        &self,
        dataset: &Dataset,
        data: &PreparedData,
        state: &TrainingState,
        scores: Scores,
        device: &candle_core::Device,
        training_date: &str,
    ) -> ModelMetadata {
        let Scores { final_metrics, baselines, best_epoch, stop_reason, gate } = scores;
        let m = &self.manifest;
        let (feature_names, feature_means, feature_stds) = artifacts::feature_columns(&data.standardizer);
        ModelMetadata {
            model_type: artifacts::MODEL_TYPE.to_string(),
            model_name: m.model.clone(),
            model_version: m.version.clone(),
            run_id: m.run_id.clone(),
            training_date: training_date.to_string(),
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
                holdout: data.holdout.clone(),
                watermark: dataset.watermark.clone(),
            },
            device: device::describe(device),
            seed: m.config.seed,
            trainer_version: TRAINER_VERSION.to_string(),
            epochs_completed: state.epoch,
            best_epoch,
            stop_reason,
            quality_gate: Some(gate),
        }
    }
}

/// Every artifact of a version, in upload order; the metadata comes last.
fn version_files(
    state: &TrainingState,
    embeddings: &candle_core::Tensor,
    metadata: &ModelMetadata,
) -> anyhow::Result<Vec<(String, Bytes)>> {
    let version = &metadata.model_version;
    let host = HostWeights::from_encoder(&state.encoder)?;
    let (tfjs_model, tfjs_shard) = tfjs::model(&host)?;
    let files: Vec<(&str, Vec<u8>)> = vec![
        (layout::WEIGHTS, artifacts::weights_bytes(&state.encoder, version)?),
        (layout::EMBEDDINGS, artifacts::embeddings_bytes(embeddings, version)?),
        (layout::KERAS, keras::archive(&host, &metadata.training_date)?),
        (TFJS_SHARD, tfjs_shard),
        (layout::TFJS_MODEL, tfjs_model),
        (model_card::CURVES_SVG, model_card::curves_svg(metadata).into_bytes()),
        (layout::MODEL_CARD, model_card::markdown(metadata).into_bytes()),
        (layout::METADATA, serde_json::to_vec_pretty(metadata)?),
    ];
    Ok(files.into_iter().map(|(n, b)| (n.to_string(), Bytes::from(b))).collect())
}

/// The published model's held-out metrics, the baselines', and which epoch it is.
struct Scores {
    final_metrics: crate::training::eval::RankingMetrics,
    baselines: crate::training::trainer::Baselines,
    best_epoch: usize,
    stop_reason: StopReason,
    gate: gate::GateReport,
}

/// The TF.js weight shard's name inside the version (next to `tfjs/model.json`).
const TFJS_SHARD: &str = "tfjs/group1-shard1of1.bin";

/// Writes a checkpoint after every epoch, logs the epoch, drives the progress bar, and stops the
/// loop when a stop was requested.
struct Checkpointer<'a> {
    run: &'a BlockingRun,
    progress: EpochProgress,
    /// When the newest checkpoint was written (the version's `training_date`).
    saved_at: Option<String>,
    /// The run stopped early: `patience` epochs without an improvement.
    early_stopped: bool,
}

impl TrainObserver for Checkpointer<'_> {
    fn epoch_started(&mut self, epoch: usize, pairs: usize) {
        self.progress.start_epoch(epoch, self.run.manifest.config.epochs, pairs);
    }

    fn batch_finished(&mut self, pairs: usize) -> Control {
        self.progress.advance(pairs);
        if self.run.stop.is_requested() { Control::Stop } else { Control::Continue }
    }

    fn interrupted(&mut self, state: &TrainingState) -> anyhow::Result<()> {
        let key = self.save(state)?;
        let step = state.cursor.as_ref().map_or(0, |c| c.next_step);
        info!(epoch = state.epoch + 1, step, checkpoint = %key, "stopped inside the epoch; checkpoint written");
        Ok(())
    }

    fn epoch_finished(&mut self, state: &TrainingState, m: &EpochMetrics) -> anyhow::Result<Control> {
        let run = self.run;
        self.save(state)?;
        let model = run.manifest.model.clone();
        metrics::gauge!("audotics_epoch_loss", "model" => model.clone()).set(m.loss);
        metrics::gauge!("audotics_epoch_recall_at_10", "model" => model.clone()).set(m.ranking.recall_at_10);
        metrics::gauge!("audotics_pairs_per_second", "model" => model.clone()).set(m.pairs_per_second);
        metrics::counter!("audotics_epochs_total", "model" => model).increment(1);
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
            peak_rss_mib = crate::system::procstat::peak_rss_bytes().unwrap_or(0) >> 20,
            "epoch finished"
        );
        let config = &run.manifest.config;
        if config.early_stop(&state.history) {
            self.early_stopped = true;
            info!(
                epoch = m.epoch,
                patience = config.patience,
                min_delta = config.min_delta,
                best_epoch = best_epoch(&state.history.recall_at_10, config.min_delta),
                "early stopping: no better Recall@10 for `patience` epochs"
            );
            return Ok(Control::Stop);
        }
        Ok(if run.stop.is_requested() { Control::Stop } else { Control::Continue })
    }
}

impl Checkpointer<'_> {
    /// Writes the state's checkpoint (complete or partial); returns its key.
    fn save(&mut self, state: &TrainingState) -> anyhow::Result<String> {
        let run = self.run;
        let saved_at = Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
        let bytes = checkpoint::to_bytes(state, &run.manifest.config, &saved_at)?;
        self.saved_at = Some(saved_at);
        let key = layout::checkpoint_named(
            &run.manifest.model,
            &run.manifest.run_id,
            &checkpoint::owned_file_name_of(state, run.owner.as_deref()),
        );
        run.runtime.block_on(run.store.put(&key, bytes)).with_context(|| format!("writing checkpoint {key}"))?;
        // Only the newest few are ever resumed from: 1000 epochs of E = 1024 would be ~38 GB.
        let m = &run.manifest;
        let best = best_epoch(&state.history.recall_at_10, m.config.min_delta);
        let pruned =
            crate::publish::versions::prune_checkpoints(&run.store, &m.model, &m.run_id, run.keep_checkpoints, best);
        if let Err(e) = run.runtime.block_on(pruned) {
            warn!(error.message = %format!("{e:#}"), "cannot delete the run's older checkpoints; retrying after the next");
        }
        Ok(key)
    }
}

/// Uploads the version (artifacts, then manifest, then `latest.json`) and applies retention.
pub(super) async fn publish(
    store: &ModelStore,
    manifest: &RunManifest,
    files: VersionFiles,
    keep_versions: usize,
) -> anyhow::Result<RunOutcome> {
    let span = info_span!("publish_version");
    async move {
        let m = &files.metadata;
        let info = VersionInfo {
            model: &manifest.model,
            version: &manifest.version,
            run_id: &manifest.run_id,
            created_at: &m.training_date,
            watermark: &m.data.watermark,
            metrics: json!({"final": m.final_metrics, "baselines": m.baselines}),
        };
        let started = std::time::Instant::now();
        let published = publish_version(store, &info, files.files).await?;
        // An adopted version's files are the other execution's: announce its metadata, not ours
        // (same weights and metrics — training is deterministic — but other timings).
        let metadata = match published.adopted {
            false => files.metadata,
            true => {
                let key = layout::version_object(&manifest.model, &manifest.version, layout::METADATA);
                serde_json::from_slice(&store.get(&key).await?)
                    .with_context(|| format!("{key} is not valid metadata"))?
            }
        };
        let m = &metadata;
        metrics::histogram!("audotics_publish_seconds", "model" => manifest.model.clone())
            .record(started.elapsed().as_secs_f64());
        info!(
            recall_at_10 = m.final_metrics.recall_at_10,
            raw_features_recall_at_10 = m.baselines.raw_features.recall_at_10,
            popularity_recall_at_10 = m.baselines.popularity.recall_at_10,
            location = %store.url_of(&layout::version_dir(&manifest.model, &manifest.version)),
            "version written"
        );
        if let Err(e) = apply_retention(store, &manifest.model, keep_versions).await {
            // The version is published; failing to tidy older ones is not a failed run.
            warn!(error = %format!("{e:#}"), "retention failed; older versions and checkpoints are left in place");
        }
        Ok(RunOutcome::Published(Box::new(Published {
            run_id: manifest.run_id.clone(),
            version: manifest.version.clone(),
            location: store.url_of(&layout::version_dir(&manifest.model, &manifest.version)),
            artifacts: published.urls.clone(),
            manifest_sha256: published.manifest_sha256.clone(),
            is_latest: published.is_latest,
            metadata,
        })))
    }
    .instrument(span)
    .await
}
