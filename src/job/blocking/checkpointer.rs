//! Checkpoints: one after every epoch (and where a stop lands inside one), pruned to the newest
//! few and the best; and the best epoch's state read back for publication.

use anyhow::Context;
use chrono::Utc;
use tracing::{info, warn};

use super::BlockingRun;
use crate::publish::layout;
use crate::publish::versions::prune_checkpoints;
use crate::system::telemetry::EpochProgress;
use crate::training::checkpoint;
use crate::training::model::vocab::TrackInputs;
use crate::training::trainer::{Control, EpochMetrics, TrainObserver, TrainingState, best_epoch};

/// Writes a checkpoint after every epoch, logs the epoch, drives the progress bar, and stops the
/// loop when a stop was requested.
pub(super) struct Checkpointer<'a> {
    pub(super) run: &'a BlockingRun,
    pub(super) progress: EpochProgress,
    /// When the newest checkpoint was written (the version's `training_date`).
    pub(super) saved_at: Option<String>,
    /// The run stopped early: `patience` epochs without an improvement.
    pub(super) early_stopped: bool,
}

impl TrainObserver for Checkpointer<'_> {
    fn epoch_started(&mut self, epoch: usize, pairs: usize) {
        self.progress.start_epoch(epoch, self.run.record.config.epochs, pairs);
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
        let model = run.record.model.clone();
        metrics::gauge!("audotics_epoch_loss", "model" => model.clone()).set(m.loss);
        metrics::gauge!("audotics_epoch_recall_at_10", "model" => model.clone()).set(m.ranking.recall_at_10);
        metrics::gauge!("audotics_pairs_per_second", "model" => model.clone()).set(m.pairs_per_second);
        metrics::counter!("audotics_epochs_total", "model" => model).increment(1);
        info!(
            epoch = m.epoch,
            epochs = run.record.config.epochs,
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
        let config = &run.record.config;
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
        let bytes = checkpoint::to_bytes(state, &run.record.config, &saved_at)?;
        self.saved_at = Some(saved_at);
        let key = layout::checkpoint_named(
            &run.record.model,
            &run.record.run_id,
            &checkpoint::owned_file_name_of(state, run.owner.as_deref()),
        );
        run.runtime.block_on(run.store.put(&key, bytes)).with_context(|| format!("writing checkpoint {key}"))?;
        // Only the newest few are ever resumed from: 1000 epochs of E = 1024 would be ~38 GB.
        let m = &run.record;
        let best = best_epoch(&state.history.recall_at_10, m.config.min_delta);
        let pruned = prune_checkpoints(&run.store, &m.model, &m.run_id, run.keep_checkpoints, best);
        if let Err(e) = run.runtime.block_on(pruned) {
            warn!(error.message = %format!("{e:#}"), "cannot delete the run's older checkpoints; retrying after the next");
        }
        Ok(key)
    }
}

impl BlockingRun {
    /// The state at the end of epoch `epoch`, from its checkpoint (whichever owner wrote it).
    pub(super) fn restore_epoch(
        &self,
        epoch: usize,
        inputs: &TrackInputs,
        device: &candle_core::Device,
    ) -> anyhow::Result<TrainingState> {
        let m = &self.record;
        let keys = self.runtime.block_on(self.store.list(&layout::checkpoints_dir(&m.model, &m.run_id)))?;
        let key = keys
            .iter()
            .find(|k| k.rsplit('/').next().and_then(checkpoint::position_of) == Some((epoch, 0)))
            .with_context(|| format!("the checkpoint of the best epoch ({epoch}) is missing"))?;
        let bytes = self.runtime.block_on(self.store.get(key))?;
        let mut state = TrainingState::for_inputs(&m.config, inputs, device)?;
        checkpoint::restore(&bytes, &mut state, &m.config).with_context(|| format!("restoring {key}"))?;
        Ok(state)
    }
}
