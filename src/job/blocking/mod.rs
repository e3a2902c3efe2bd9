//! The blocking half of a run (everything that touches candle) and the publication of its files.
//!
//! Files: this one (the run's steps: prepare, check, train or refresh, pick the best epoch, judge),
//! `checkpointer` (a checkpoint per epoch; the best one read back), `current` (the live version
//! scored for the gate, and reading a published version's files), `parent` (a warm run's or a
//! refresh's parent model), `neighbours` (the similar-tracks table, compared with the parent's),
//! `version` (metadata, files, upload).

mod checkpointer;
mod current;
mod neighbours;
mod parent;
mod version;

pub(super) use version::{VersionFiles, publish};

use anyhow::Context;
use tracing::info;

use super::{RunRecord, StopFlag};
use crate::data::Dataset;
use crate::publish::gate;
use crate::publish::lineage::{Lineage, TrainingMode};
use crate::publish::store::ModelStore;
use crate::system::device;
use crate::system::telemetry::EpochProgress;
use crate::training::checkpoint;
use crate::training::model::tables::table_rows;
use crate::training::resources::{self, DataSizes, MemoryBudget, MemoryEstimate};
use crate::training::trainer::{Baselines, PreparedData, StopReason, Trainer, TrainingState, best_epoch};
use crate::training::warm;
use checkpointer::Checkpointer;
use version::Scores;

/// The blocking half of a run: everything that touches candle.
pub(super) struct BlockingRun {
    pub store: ModelStore,
    pub runtime: tokio::runtime::Handle,
    pub record: RunRecord,
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
    /// The last published version's metadata read (see [`Self::version_metadata`]).
    pub published_metadata: std::sync::Mutex<Option<(String, std::sync::Arc<serde_json::Value>)>>,
}

pub(super) enum Trained {
    Done(Box<VersionFiles>),
    Stopped { epochs_completed: usize },
    InsufficientData { reason: String },
    OverBudget { estimate: MemoryEstimate, budget: MemoryBudget },
}

impl BlockingRun {
    /// Trains the run to its end (or a stop) and builds the version's files from its best epoch.
    pub fn train(self, dataset: Dataset) -> anyhow::Result<Trained> {
        let config = &self.record.config;
        let device = device::select(self.record.device)?;
        info!(device = %device::describe(&device), "device selected");
        let parent = self.warm_parent()?;
        let data = PreparedData::with_standardizer(
            &dataset,
            config,
            &device,
            parent.as_ref().map(|p| p.standardizer.clone()),
        )?;
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
        if let Some(refused) = self.refuse(&dataset, &data, &trainer) {
            return Ok(refused);
        }
        log_holdout(&data, &trainer);
        let optimizer = self.parent_optimizer()?;
        let (initial, carried_over) = match &parent {
            Some(parent) => {
                let track_ids = &dataset.catalogue.track_ids;
                let (state, carried) = warm::start(&trainer, &device, parent, optimizer.as_ref(), track_ids)?;
                for c in &carried {
                    info!(table = %c.table, copied_rows = c.copied_rows, new_rows = c.new_rows, "warm start");
                }
                (state, carried)
            }
            None => (trainer.fresh_state(&device)?, Vec::new()),
        };
        let optimizer_from = optimizer.map(|o| o.origin);
        if self.record.lineage.as_ref().is_some_and(|l| l.mode == TrainingMode::Refresh) {
            let parent = parent.as_ref().context("a refresh reads its parent")?;
            let baselines = baselines(&trainer)?;
            return self.refresh(&trainer, &data, &dataset, initial, parent, baselines, carried_over, &device);
        }
        // The baselines matter only once training ends (the report and the gate), and training
        // batches of ≤ 512 on one thread leaves the other cores idle: they are computed beside it
        // (10 of a 100k-track warm run's 76 s when they ran first).
        let stop = self.stop.clone();
        let (epochs, beside) = std::thread::scope(|scope| {
            let beside = scope.spawn(|| baselines_beside_training(&trainer, &stop));
            let epochs = self.run_epochs(&trainer, initial);
            (epochs, beside.join())
        });
        let beside = beside.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        let ended = match epochs? {
            Epochs::Ended(ended) => ended,
            Epochs::StopRequested { epochs_completed } => return Ok(Trained::Stopped { epochs_completed }),
        };
        // Given up for a stop request that came once training had ended anyway: computed now.
        let baselines = match beside {
            Some(baselines) => baselines,
            None => baselines(&trainer)?,
        };

        // The published weights are the best epoch's, restored from its checkpoint (kept for this).
        let state = &ended.state;
        let best_epoch =
            best_epoch(&state.history.recall_at_10, config.min_delta).context("a finished run has an epoch")?;
        let best = match best_epoch == state.epoch {
            true => None,
            false => Some(self.restore_epoch(best_epoch, &data.inputs, &device)?),
        };
        let weights = best.as_ref().unwrap_or(state);
        let embeddings = trainer.embed(weights)?;
        let end = RunEnd {
            state,
            weights,
            best_epoch,
            stop_reason: ended.stop_reason,
            training_date: ended.training_date.clone(),
            carried_over,
            new_tracks: None,
            optimizer_from,
        };
        self.finish(&trainer, &data, &dataset, embeddings, baselines, end, &device)
    }

    /// Scores the published weights, judges them and builds the version's files.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        trainer: &Trainer,
        data: &PreparedData,
        dataset: &Dataset,
        embeddings: candle_core::Tensor,
        baselines: Baselines,
        end: RunEnd,
        device: &candle_core::Device,
    ) -> anyhow::Result<Trained> {
        let config = &self.record.config;
        let RunEnd { state, weights, best_epoch, stop_reason, training_date, carried_over, new_tracks, optimizer_from } =
            end;
        let final_metrics = trainer.evaluate(&embeddings)?;
        info!(
            best_epoch,
            epochs_trained = state.epoch,
            stop_reason = stop_reason.as_str(),
            recall_at_10 = final_metrics.recall_at_10,
            "training ended; publishing the best epoch's weights"
        );
        let current = match self.gate.tolerance {
            Some(_) => self.score_current(trainer, dataset)?,
            None => None,
        };
        let gate = gate::judge(&final_metrics, &baselines, current, self.gate);
        for check in &gate.checks {
            info!(check = %check.name, passed = check.passed, required = check.required, "{}", check.detail);
        }
        let final_cold_metrics = trainer.evaluate_cold(&embeddings)?;
        let learned = trainer.learned_rows();
        let learned_tracks = learned.as_ref().map(|l| l.iter().filter(|k| **k).count());
        let scores =
            Scores { final_metrics, final_cold_metrics, learned_tracks, baselines, best_epoch, stop_reason, gate };
        let table = self.neighbour_table(&embeddings, learned.as_deref(), dataset)?;
        let mut metadata = self.metadata(dataset, data, state, scores, device, &training_date);
        metadata.lineage = self.record.lineage.clone().map(|plan| Lineage {
            epochs_since_full: plan.epochs_before + state.epoch,
            plan,
            carried_over,
            new_tracks,
            optimizer_from,
        });
        let table = table.map(|(table, summary)| {
            metadata.neighbours = Some(summary);
            table
        });
        let tables = (!config.model_kind.is_content()).then_some((&data.inputs, learned.as_deref()));
        Ok(Trained::Done(Box::new(VersionFiles::new(weights, &embeddings, metadata, tables, table.as_ref())?)))
    }

    /// A refresh: no epoch; the parent's weights embed this catalogue, and every track the parent
    /// published keeps the parent's row bit for bit, so only the new tracks' rows are new.
    #[allow(clippy::too_many_arguments)]
    fn refresh(
        &self,
        trainer: &Trainer,
        data: &PreparedData,
        dataset: &Dataset,
        state: TrainingState,
        parent: &warm::ParentModel,
        baselines: Baselines,
        carried_over: Vec<warm::CarriedOver>,
        device: &candle_core::Device,
    ) -> anyhow::Result<Trained> {
        let computed = trainer.embed(&state)?;
        let (n, dim) = computed.dims2()?;
        let mut rows: Vec<f32> = computed.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1()?;
        let new_tracks = warm::keep_published_rows(&mut rows, &dataset.catalogue.track_ids, parent)?;
        info!(new_tracks, parent = %parent.version, "refresh: the parent's weights embed the new tracks");
        let embeddings = candle_core::Tensor::from_vec(rows, (n, dim), computed.device())?;
        // The run's creation time, not "now": a retried publish must produce the same bytes.
        let created = chrono::DateTime::parse_from_rfc3339(&self.record.created_at)?;
        let end = RunEnd {
            state: &state,
            weights: &state,
            best_epoch: 0,
            stop_reason: StopReason::NotTrained,
            training_date: created.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
            carried_over,
            new_tracks: Some(new_tracks),
            optimizer_from: None,
        };
        self.finish(trainer, data, dataset, embeddings, baselines, end, device)
    }

    /// Why this run must not train at all: data below the minimum sizes, nothing to pair, or a
    /// memory estimate above the worker's budget.
    fn refuse(&self, dataset: &Dataset, data: &PreparedData, trainer: &Trainer) -> Option<Trained> {
        let shortfall =
            self.record.minimums.shortfall(data.num_tracks(), data.mining.users, dataset.interactions.len());
        if let Some(reason) = shortfall.or_else(|| {
            (trainer.pairs_per_epoch() == 0).then(|| "no user has two distinct positive tracks to pair".to_string())
        }) {
            return Some(Trained::InsufficientData { reason });
        }
        let budget = self.memory_budget?;
        let sizes = DataSizes {
            tracks: data.num_tracks(),
            pairs_per_epoch: trainer.pairs_per_epoch(),
            validation_pairs: data.validation_pairs.len(),
            table_rows: table_rows(self.record.config.model_kind, &data.inputs),
        };
        let estimate = resources::estimate(&self.record.config, sizes, budget.in_use_now());
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
        (estimate.peak_bytes > budget.bytes).then_some(Trained::OverBudget { estimate, budget })
    }

    /// Trains from the newest checkpoint (or the seed) until the last epoch, early stopping, or a
    /// stop request (its checkpoint is written).
    /// Trains from `state` (fresh or warm; a checkpoint, when resuming, replaces it).
    fn run_epochs(&self, trainer: &Trainer, mut state: TrainingState) -> anyhow::Result<Epochs> {
        let config = &self.record.config;
        let mut saved_at = None;
        if let Some(((epoch, step), bytes)) = &self.resume_from {
            saved_at = Some(
                checkpoint::restore(bytes, &mut state, config)
                    .with_context(|| format!("restoring checkpoint of epoch {epoch}"))?,
            );
            metrics::counter!("audotics_runs_resumed_total", "model" => self.record.model.clone()).increment(1);
            info!(epoch, step, "resumed from checkpoint");
        }
        // A run resumed after its early-stopping epoch was checkpointed has already stopped.
        let stopped_before = config.early_stop(&state.history);
        let mut observer = Checkpointer {
            run: self,
            progress: EpochProgress::new(self.show_progress),
            saved_at,
            early_stopped: stopped_before,
        };
        let finished = stopped_before || trainer.run(&mut state, &mut observer)?;
        let (saved_at, early_stopped) = (observer.saved_at.take(), observer.early_stopped);
        drop(observer);
        if !finished && !early_stopped {
            return Ok(Epochs::StopRequested { epochs_completed: state.epoch });
        }
        let stop_reason = if early_stopped { StopReason::EarlyStopping } else { StopReason::MaxEpochs };
        // The date of the last checkpoint, not "now": a publish retried after a crash must produce
        // byte-identical files, or the immutable version would refuse them.
        let training_date = saved_at.context("a finished run has a checkpoint")?;
        Ok(Epochs::Ended(Box::new(EpochsEnded { state, stop_reason, training_date })))
    }
}

/// What the published version is made of, however the run got there.
struct RunEnd<'s> {
    /// The last state (history, epochs) and the published weights (the best epoch's).
    state: &'s TrainingState,
    weights: &'s TrainingState,
    best_epoch: usize,
    stop_reason: StopReason,
    training_date: String,
    carried_over: Vec<warm::CarriedOver>,
    new_tracks: Option<usize>,
    optimizer_from: Option<String>,
}

/// Where training left the run.
enum Epochs {
    Ended(Box<EpochsEnded>),
    StopRequested { epochs_completed: usize },
}

/// The epochs of a run that trained to its end (the last epoch, or early stopping).
struct EpochsEnded {
    state: TrainingState,
    stop_reason: StopReason,
    /// When the last checkpoint was written: the version's `training_date`.
    training_date: String,
}

fn log_holdout(data: &PreparedData, trainer: &Trainer) {
    let h = &data.holdout;
    info!(
        holdout = h.kind.as_str(),
        fraction = h.fraction,
        cutoff = h.cutoff.as_deref().unwrap_or(""),
        heldout_pairs = h.heldout_pairs,
        evaluated_users = trainer.eval_set().users.len(),
        "held-out listens"
    );
}

/// What a platform could run instead of the model, scored on the same held-out listens.
fn baselines(trainer: &Trainer) -> anyhow::Result<Baselines> {
    let started = std::time::Instant::now();
    let baselines = trainer.baselines()?;
    log_baselines(&baselines, started, false);
    Ok(baselines)
}

/// [`baselines`] beside training, on the global pool (one thread when training runs on one, so
/// the other core computes them), or `None` when a stop was requested first.
fn baselines_beside_training(trainer: &Trainer, stop: &StopFlag) -> anyhow::Result<Option<Baselines>> {
    let started = std::time::Instant::now();
    let baselines = trainer.baselines_unless(&|| stop.is_requested())?;
    if let Some(b) = &baselines {
        log_baselines(b, started, true);
    }
    Ok(baselines)
}

fn log_baselines(baselines: &Baselines, started: std::time::Instant, beside_training: bool) {
    info!(
        random_recall_at_10 = baselines.random.recall_at_10,
        popularity_recall_at_10 = baselines.popularity.recall_at_10,
        raw_recall_at_10 = baselines.raw_features.recall_at_10,
        item_cf_recall_at_10 = baselines.item_cf.recall_at_10,
        item_cf_recall_at_10_se = baselines.item_cf.recall_at_10_se,
        seconds = started.elapsed().as_secs_f64(),
        beside_training,
        peak_rss_mib = crate::system::procstat::peak_rss_bytes().unwrap_or(0) >> 20,
        "baselines"
    );
}
