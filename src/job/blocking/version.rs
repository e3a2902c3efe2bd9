//! A trained version: its metadata, its files in upload order, and their publication.

use anyhow::Context;
use bytes::Bytes;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::BlockingRun;
use crate::data::Dataset;
use crate::job::{Published, RunOutcome, RunRecord};
use crate::publish::artifacts::{self, DataSummary, ModelMetadata, TRAINER_VERSION};
use crate::publish::export::tables::TableModel;
use crate::publish::export::{HostWeights, keras, model_card, tfjs};
use crate::publish::gate;
use crate::publish::versions::{VersionInfo, apply_retention, publish_version};
use crate::publish::{layout, store::ModelStore};
use crate::system::device;
use crate::training::eval::RankingMetrics;
use crate::training::model::vocab::TrackInputs;
use crate::training::neighbours::Neighbours;
use crate::training::trainer::{Baselines, PreparedData, StopReason, TrainingState};

/// The serialised artifacts of a finished run, in upload order (metadata last).
pub(in crate::job) struct VersionFiles {
    pub(in crate::job) metadata: ModelMetadata,
    files: Vec<(String, Bytes)>,
}

impl VersionFiles {
    /// Every artifact of the version with `metadata`, from the weights it publishes, in upload
    /// order; the metadata comes last.
    pub(super) fn new(
        state: &TrainingState,
        embeddings: &candle_core::Tensor,
        metadata: ModelMetadata,
        tables: Option<(&TrackInputs, Option<&[bool]>)>,
        neighbours: Option<&Neighbours>,
    ) -> anyhow::Result<Self> {
        let version = &metadata.model_version;
        // The kind's own files: its weights, its Keras and TF.js models and, for the table kinds,
        // the vocabularies; the embeddings, card and metadata are the same for every kind.
        let (weights, keras, (tfjs_model, tfjs_shard), vocabularies) = match tables {
            Some((inputs, learned)) => {
                let kind = metadata.hyperparameters.model_kind;
                let model = TableModel::new(kind, &state.encoder, &state.tables, inputs)?;
                (
                    artifacts::weights_bytes_with_tables(kind, &state.encoder, &state.tables, version)?,
                    model.keras_archive(&metadata.training_date)?,
                    model.tfjs()?,
                    Some(serde_json::to_vec_pretty(&artifacts::vocabularies_json(inputs, learned))?),
                )
            }
            None => {
                let host = HostWeights::from_encoder(&state.encoder)?;
                (
                    artifacts::weights_bytes(&state.encoder, version)?,
                    keras::archive(&host, &metadata.training_date)?,
                    tfjs::model(&host)?,
                    None,
                )
            }
        };
        let mut files: Vec<(&str, Vec<u8>)> = vec![
            (layout::WEIGHTS, weights),
            (layout::EMBEDDINGS, artifacts::embeddings_bytes(embeddings, version)?),
            (layout::KERAS, keras),
            (TFJS_SHARD, tfjs_shard),
            (layout::TFJS_MODEL, tfjs_model),
        ];
        files.extend(vocabularies.map(|v| (artifacts::VOCABULARIES, v)));
        if let Some(table) = neighbours {
            files.push((layout::NEIGHBOURS, artifacts::neighbours_bytes(table, version)?));
        }
        files.extend([
            (model_card::CURVES_SVG, model_card::curves_svg(&metadata).into_bytes()),
            (layout::MODEL_CARD, model_card::markdown(&metadata).into_bytes()),
            (layout::METADATA, serde_json::to_vec_pretty(&metadata)?),
        ]);
        let files = files.into_iter().map(|(n, b)| (n.to_string(), Bytes::from(b))).collect();
        Ok(Self { metadata, files })
    }
}

/// The published model's held-out metrics, the baselines', and which epoch it is.
pub(super) struct Scores {
    pub(super) final_metrics: RankingMetrics,
    pub(super) final_cold_metrics: Option<RankingMetrics>,
    pub(super) learned_tracks: Option<usize>,
    pub(super) baselines: Baselines,
    pub(super) best_epoch: usize,
    pub(super) stop_reason: StopReason,
    pub(super) gate: gate::GateReport,
}

/// The TF.js weight shard's name inside the version (next to `tfjs/model.json`).
const TFJS_SHARD: &str = "tfjs/group1-shard1of1.bin";

impl BlockingRun {
    /// The version's `metadata.json`.
    pub(super) fn metadata(
        &self,
        dataset: &Dataset,
        data: &PreparedData,
        state: &TrainingState,
        scores: Scores,
        device: &candle_core::Device,
        training_date: &str,
    ) -> ModelMetadata {
        let Scores { final_metrics, final_cold_metrics, learned_tracks, baselines, best_epoch, stop_reason, gate } =
            scores;
        let m = &self.record;
        let (feature_names, feature_means, feature_stds) = artifacts::feature_columns(&data.standardizer);
        ModelMetadata {
            model_type: m.config.model_kind.as_str().to_string(),
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
            final_cold_metrics,
            learned_tracks,
            baselines,
            architecture: artifacts::architecture_of(m.config.model_kind, &m.config.encoder, &m.config.table_config()),
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
                cold_holdout: data.cold_summary(m.config.cold_tracks),
                watermark: dataset.watermark.clone(),
            },
            device: device::describe(device),
            seed: m.config.seed,
            trainer_version: TRAINER_VERSION.to_string(),
            epochs_completed: state.epoch,
            best_epoch,
            stop_reason,
            quality_gate: Some(gate),
            neighbours: None, // set once the table is built
            lineage: None,    // set by the caller, who knows what the warm start carried over
        }
    }
}

/// Uploads the version (artifacts, then `manifest.json`, then `latest.json`) and applies retention.
pub(in crate::job) async fn publish(
    store: &ModelStore,
    record: &RunRecord,
    files: VersionFiles,
    keep_versions: usize,
) -> anyhow::Result<RunOutcome> {
    let span = info_span!("publish_version");
    async move {
        let m = &files.metadata;
        let info = VersionInfo {
            model: &record.model,
            version: &record.version,
            run_id: &record.run_id,
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
                let key = layout::version_object(&record.model, &record.version, layout::METADATA);
                serde_json::from_slice(&store.get(&key).await?)
                    .with_context(|| format!("{key} is not valid metadata"))?
            }
        };
        let m = &metadata;
        metrics::histogram!("audotics_publish_seconds", "model" => record.model.clone())
            .record(started.elapsed().as_secs_f64());
        info!(
            recall_at_10 = m.final_metrics.recall_at_10,
            raw_features_recall_at_10 = m.baselines.raw_features.recall_at_10,
            popularity_recall_at_10 = m.baselines.popularity.recall_at_10,
            location = %store.url_of(&layout::version_dir(&record.model, &record.version)),
            "version written"
        );
        if let Err(e) = apply_retention(store, &record.model, keep_versions).await {
            // The version is published; failing to tidy older ones is not a failed run.
            warn!(error.message = %format!("{e:#}"), "retention failed; older versions and checkpoints are left in place");
        }
        Ok(RunOutcome::Published(Box::new(Published {
            run_id: record.run_id.clone(),
            version: record.version.clone(),
            location: store.url_of(&layout::version_dir(&record.model, &record.version)),
            artifacts: published.urls.clone(),
            manifest_sha256: published.manifest_sha256.clone(),
            is_latest: published.is_latest,
            metadata,
        })))
    }
    .instrument(span)
    .await
}
