//! The blocking half of a run (everything that touches candle) and the publication of its files.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::Utc;
use tracing::{Instrument, info, info_span};

use super::{Published, RunManifest, RunOutcome, StopFlag};
use crate::artifacts::{self, DataSummary, ModelMetadata, TRAINER_VERSION};
use crate::checkpoint;
use crate::data::Dataset;
use crate::device;
use crate::storage::{ModelStore, layout};
use crate::telemetry::EpochProgress;
use crate::train::{Control, EpochMetrics, PreparedData, TrainObserver, Trainer, TrainingState};

/// The blocking half of a run: everything that touches candle.
pub(super) struct BlockingRun {
    pub store: ModelStore,
    pub runtime: tokio::runtime::Handle,
    pub manifest: RunManifest,
    pub resume_from: Option<(usize, bytes::Bytes)>,
    pub show_progress: bool,
    pub stop: StopFlag,
}

pub(super) enum Trained {
    Done(Box<VersionFiles>),
    Stopped { epochs_completed: usize },
    InsufficientData { reason: String },
}

/// The serialised artifacts of a finished run.
pub(super) struct VersionFiles {
    metadata: ModelMetadata,
    weights: Vec<u8>,
    embeddings: Vec<u8>,
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
            rss_mib = crate::procstat::rss_bytes().unwrap_or(0) >> 20,
            "data prepared"
        );
        let shortfall =
            self.manifest.minimums.shortfall(data.num_tracks(), data.mining.users, dataset.interactions.len());
        if let Some(reason) = shortfall.or_else(|| {
            (trainer.pairs_per_epoch() == 0).then(|| "no user has two distinct positive tracks to pair".to_string())
        }) {
            return Ok(Trained::InsufficientData { reason });
        }
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
                watermark: dataset.watermark.clone(),
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
pub(super) async fn publish(
    store: &ModelStore,
    manifest: &RunManifest,
    files: VersionFiles,
) -> anyhow::Result<RunOutcome> {
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
            location: store.url_of(&layout::version_dir(model, version)),
        })))
    }
    .instrument(span)
    .await
}
