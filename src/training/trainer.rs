//! The training loop: synchronous and CPU/GPU bound, so callers run it off the async runtime
//! (`spawn_blocking`). Per epoch: sample pairs, train on shuffled batches, evaluate on held-out
//! interactions, then hand the state to the observer (which checkpoints it and may stop the run).

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::data::features::{NUM_FEATURES, Standardizer};
use crate::training::cpu_step::CpuStep;
use crate::training::eval::{EvalSet, RankingMetrics};
use crate::training::loss::{self, LossConfig, LossKind, PairBatch};
use crate::training::model::{BatchStats, DropoutMasks, Encoder, EncoderConfig, HostDropout, l2_normalize};
use crate::training::optim::Adam;
use crate::training::pairs::{self, CoListenIndex, MiningStats, PairSampler, SamplingConfig, UserTracks};

/// Everything that determines a run's result, given the data. Stored with the run so that a resumed
/// run continues with exactly the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub validation_split: f64,
    pub learning_rate: f64,
    pub encoder: EncoderConfig,
    pub loss: LossConfig,
    pub sampling: SamplingConfig,
    pub positive_kinds: Vec<String>,
    pub seed: u64,
    /// Evaluate at most this many users per epoch (a fixed seeded sample).
    pub eval_users: usize,
    /// Validation loss over at most this many held-out pairs.
    pub max_validation_pairs: usize,
    /// Which listens are held out for evaluation. Runs recorded before this setting existed held
    /// out a random share per user.
    #[serde(default)]
    pub holdout: Holdout,
    /// Stop after this many epochs without a validation Recall@10 better than the best by more
    /// than `min_delta` (0: train every epoch). Runs recorded before it existed never stopped early.
    #[serde(default)]
    pub patience: usize,
    #[serde(default)]
    pub min_delta: f64,
}

impl TrainConfig {
    /// Whether a run with this history stops here (see [`should_stop_early`]).
    pub fn early_stop(&self, history: &History) -> bool {
        should_stop_early(&history.recall_at_10, self.patience, self.min_delta)
    }
}

/// How the held-out listens are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Holdout {
    /// A seeded share of each user's distinct positive tracks (data without meaningful timestamps).
    #[default]
    Random,
    /// The newest share of the history by timestamp: predict each user's next new tracks.
    Time,
}

impl Holdout {
    pub fn as_str(self) -> &'static str {
        match self {
            Holdout::Random => "random",
            Holdout::Time => "time",
        }
    }
}

/// Why training ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every epoch of `epochs` was trained.
    #[default]
    MaxEpochs,
    /// `patience` epochs passed without an improvement larger than `min_delta`.
    EarlyStopping,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::MaxEpochs => "max_epochs",
            StopReason::EarlyStopping => "early_stopping",
        }
    }
}

/// The epoch (1-based) whose weights are published: the first to reach the best validation
/// Recall@10, where an epoch counts as better only when it beats the best so far by more than
/// `min_delta`. `None` before the first epoch.
pub fn best_epoch(recall_at_10: &[f64], min_delta: f64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, &r) in recall_at_10.iter().enumerate() {
        match best {
            Some((_, b)) if r <= b + min_delta => {}
            _ => best = Some((i + 1, r)),
        }
    }
    best.map(|(epoch, _)| epoch)
}

/// Whether a run with these curves stops now: `patience` epochs have passed since the best one. A
/// function of the history alone, so a resumed run stops at the same epoch.
pub fn should_stop_early(recall_at_10: &[f64], patience: usize, min_delta: f64) -> bool {
    patience > 0 && best_epoch(recall_at_10, min_delta).is_some_and(|best| recall_at_10.len() - best >= patience)
}

/// The data in the form training needs, derived deterministically from a [`Dataset`].
pub struct PreparedData {
    pub standardizer: Standardizer,
    /// `[num_tracks, 11]` standardised features, resident on the training device.
    pub features: Tensor,
    pub mining: MiningStats,
    pub train: UserTracks,
    pub heldout: UserTracks,
    /// Training users per track (popularity).
    pub track_counts: Vec<u32>,
    pub validation_pairs: Vec<[u32; 2]>,
    /// How the held-out listens were chosen.
    pub holdout: HoldoutSummary,
}

/// The hold-out as metadata, the model card and logs report it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldoutSummary {
    pub kind: Holdout,
    /// The share asked for (`--validation-split`): of each user's tracks (random) or of the
    /// timestamped positive interactions (time).
    pub fraction: f64,
    /// Time hold-out: listens at or after this instant (RFC 3339) are held out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<String>,
    /// Time hold-out: positives in the held-out period, and those dropped because the track was not
    /// new to the user or the user had fewer than two training tracks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_period_positives: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_known_tracks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_cold_users: Option<usize>,
    /// Held-out (user, track) pairs.
    pub heldout_pairs: usize,
}

impl PreparedData {
    pub fn new(dataset: &Dataset, config: &TrainConfig, device: &Device) -> anyhow::Result<Self> {
        let standardizer = Standardizer::fit(&dataset.catalogue.features);
        let n = dataset.catalogue.len();
        let features =
            Tensor::from_vec(standardizer.apply_all(&dataset.catalogue.features), (n, NUM_FEATURES), device)?;
        let (mining, train, heldout, mut holdout) = match config.holdout {
            Holdout::Random => {
                let index = CoListenIndex::build(&dataset.interactions, &config.positive_kinds);
                let (train, heldout) = index.split(config.validation_split, config.seed);
                (index.stats, train, heldout, HoldoutSummary::default())
            }
            Holdout::Time => {
                let split =
                    pairs::split_by_time(&dataset.interactions, &config.positive_kinds, config.validation_split);
                let cutoff = (split.cutoff_ms != i64::MAX)
                    .then(|| chrono::DateTime::from_timestamp_millis(split.cutoff_ms).map(|t| t.to_rfc3339()))
                    .flatten();
                let summary = HoldoutSummary {
                    cutoff,
                    heldout_period_positives: Some(split.heldout_period_positives),
                    dropped_known_tracks: Some(split.heldout_known_tracks),
                    dropped_cold_users: Some(split.heldout_cold_user_tracks),
                    ..HoldoutSummary::default()
                };
                (split.index.stats, split.index.tracks, split.heldout, summary)
            }
        };
        holdout.kind = config.holdout;
        holdout.fraction = config.validation_split;
        holdout.heldout_pairs = heldout.len();
        let track_counts = pairs::track_counts(&train, n);
        let validation_pairs = pairs::validation_pairs(&train, &heldout, config.max_validation_pairs, config.seed);
        Ok(Self { standardizer, features, mining, train, heldout, track_counts, validation_pairs, holdout })
    }

    pub fn num_tracks(&self) -> usize {
        self.track_counts.len()
    }
}

/// Metrics of one finished epoch (1-based `epoch`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub loss: f64,
    pub val_loss: f64,
    pub ranking: RankingMetrics,
    /// Mean cosine between two random tracks' embeddings (‖mean embedding‖²): near 1 means the
    /// embeddings have collapsed onto one direction.
    pub mean_pairwise_cosine: f64,
    pub pairs: usize,
    pub pairs_per_second: f64,
    pub train_seconds: f64,
    /// Process CPU time (all threads) spent in the training phase, where `/proc` can tell.
    pub train_cpu_seconds: Option<f64>,
    pub seconds: f64,
}

/// Per-epoch curves, as the metadata's `training_history` reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub loss: Vec<f64>,
    pub val_loss: Vec<f64>,
    pub recall_at_10: Vec<f64>,
    pub ndcg_at_10: Vec<f64>,
    pub mean_pairwise_cosine: Vec<f64>,
    pub pairs_per_second: Vec<f64>,
    pub seconds: Vec<f64>,
}

impl History {
    fn push(&mut self, m: &EpochMetrics) {
        self.loss.push(m.loss);
        self.val_loss.push(m.val_loss);
        self.recall_at_10.push(m.ranking.recall_at_10);
        self.ndcg_at_10.push(m.ranking.ndcg_at_10);
        self.mean_pairwise_cosine.push(m.mean_pairwise_cosine);
        self.pairs_per_second.push(m.pairs_per_second);
        self.seconds.push(m.seconds);
    }
}

/// Everything that changes during training; a checkpoint is exactly this.
pub struct TrainingState {
    pub encoder: Encoder,
    pub optimizer: Adam,
    /// Drives pair sampling and dropout; initialisation consumed its first draws.
    pub rng: ChaCha8Rng,
    /// Epochs completed so far.
    pub epoch: usize,
    pub history: History,
    /// Set when the run stopped part-way through epoch `epoch + 1`: where to continue it.
    pub cursor: Option<EpochCursor>,
}

/// A position inside an epoch: enough to continue it exactly as if it had never stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochCursor {
    /// The generator as the epoch started: re-sampling the epoch's pairs from it gives the same pairs.
    pub rng_at_start: ChaCha8Rng,
    /// The next batch (step) to train.
    pub next_step: usize,
    pub loss_sum: f64,
    pub batches: usize,
    pub trained: usize,
}

impl TrainingState {
    /// A fresh state: the encoder initialised from the seed.
    pub fn new(config: &TrainConfig, device: &Device) -> anyhow::Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let encoder = Encoder::new(config.encoder, &mut rng, device, DType::F32)?;
        let optimizer = Adam::new(encoder.trainable().to_vec(), config.learning_rate)?;
        Ok(Self { encoder, optimizer, rng, epoch: 0, history: History::default(), cursor: None })
    }
}

/// What the observer tells the loop after each epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop now: after an epoch its checkpoint is already saved; after a batch, the loop hands the
    /// state (with its [`EpochCursor`]) to [`TrainObserver::interrupted`].
    Stop,
}

/// Receives progress; `epoch_finished` typically checkpoints the state.
pub trait TrainObserver {
    fn epoch_started(&mut self, _epoch: usize, _pairs: usize) {}
    /// After each optimiser step; `Stop` ends the run at this batch boundary.
    fn batch_finished(&mut self, _pairs: usize) -> Control {
        Control::Continue
    }
    fn epoch_finished(&mut self, state: &TrainingState, metrics: &EpochMetrics) -> anyhow::Result<Control>;
    /// The run stopped inside an epoch; `state.cursor` says where (typically checkpointed).
    fn interrupted(&mut self, _state: &TrainingState) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Reference metrics of what a platform could run instead of the model, on the same held-out
/// listens, computed once per run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Baselines {
    /// Standardised raw features as embeddings.
    pub raw_features: RankingMetrics,
    /// Training users per track.
    pub popularity: RankingMetrics,
    /// Item-based collaborative filtering: cosine-normalised co-occurrence of training positives,
    /// queried with the user's training tracks. Absent from versions published before it existed.
    #[serde(default)]
    pub item_cf: RankingMetrics,
    /// Seeded random scores: the floor of floors.
    #[serde(default)]
    pub random: RankingMetrics,
}

/// The trainer for one run: data, settings and the fixed evaluation set.
pub struct Trainer<'a> {
    config: &'a TrainConfig,
    data: &'a PreparedData,
    sampler: PairSampler,
    eval: EvalSet<'a>,
    logq: Option<Tensor>,
    /// The fused CPU step (`None` on a GPU, or when autograd is asked for).
    cpu_step: Option<CpuStep>,
}

impl<'a> Trainer<'a> {
    pub fn new(config: &'a TrainConfig, data: &'a PreparedData) -> anyhow::Result<Self> {
        let sampler = PairSampler::new(config.sampling.clone(), &data.train, data.num_tracks());
        let eval = EvalSet::new(&data.train, &data.heldout, config.eval_users, config.seed);
        let logq = if config.loss.logq_correction && config.loss.kind == LossKind::Contrastive {
            let lq = loss::log_sampling_probability(&data.track_counts);
            Some(Tensor::from_vec(lq, data.num_tracks(), data.features.device())?)
        } else {
            None
        };
        let device = data.features.device();
        let cpu_step = (device.is_cpu() && data.features.dtype() == DType::F32)
            .then(|| CpuStep::new(config.encoder, config.loss.clone(), &data.features, logq.as_ref()))
            .transpose()?;
        Ok(Self { config, data, sampler, eval, logq, cpu_step })
    }

    /// `fused` or `autograd`: how this trainer's steps compute gradients.
    pub fn step_name(&self) -> &'static str {
        if self.cpu_step.is_some() { "fused" } else { "autograd" }
    }

    /// Trains through candle's autograd even on the CPU (the reference path; for comparisons).
    pub fn use_autograd(mut self) -> Self {
        self.cpu_step = None;
        self
    }

    /// Pairs one epoch yields at most (for progress reporting and the insufficient-data check).
    pub fn pairs_per_epoch(&self) -> usize {
        self.sampler.max_pairs(&self.data.train)
    }

    pub fn baselines(&self) -> anyhow::Result<Baselines> {
        let raw = l2_normalize(&self.data.features)?;
        let popularity: Vec<f32> = self.data.track_counts.iter().map(|&c| c as f32).collect();
        Ok(Baselines {
            raw_features: self.eval.evaluate_embeddings(&raw)?,
            popularity: self.eval.evaluate_global_scores(&popularity),
            item_cf: self.eval.evaluate_item_cf(self.data.num_tracks()),
            random: self.eval.evaluate_random(self.data.num_tracks(), self.config.seed),
        })
    }

    /// The fixed evaluation set (users and their held-out tracks), for extra baselines.
    pub fn eval_set(&self) -> &EvalSet<'a> {
        &self.eval
    }

    /// Held-out ranking metrics of normalised embeddings `[num_tracks, E]`.
    pub fn evaluate(&self, embeddings: &Tensor) -> candle_core::Result<RankingMetrics> {
        self.eval.evaluate_embeddings(embeddings)
    }

    /// Trains from `state` (fresh or restored) until `config.epochs` or until the observer stops.
    /// Returns whether all epochs are done.
    pub fn run(&self, state: &mut TrainingState, observer: &mut dyn TrainObserver) -> anyhow::Result<bool> {
        while state.epoch < self.config.epochs {
            let epoch = self.run_epoch(state, observer).with_context(|| format!("epoch {}", state.epoch + 1))?;
            let Some(metrics) = epoch else {
                observer.interrupted(state)?;
                return Ok(false);
            };
            state.epoch += 1;
            state.history.push(&metrics);
            if observer.epoch_finished(state, &metrics)? == Control::Stop {
                break;
            }
        }
        Ok(state.epoch >= self.config.epochs)
    }

    /// One epoch, or its remainder after a stop inside it. `None` when the observer stopped it at a
    /// batch boundary (`state.cursor` then says where to continue).
    fn run_epoch(
        &self,
        state: &mut TrainingState,
        observer: &mut dyn TrainObserver,
    ) -> anyhow::Result<Option<EpochMetrics>> {
        let started = Instant::now();
        let cpu_started = crate::system::procstat::cpu_seconds();
        let (pairs, mut cursor) = match state.cursor.take() {
            Some(cursor) => (self.sampler.sample_epoch(&self.data.train, &mut cursor.rng_at_start.clone()), cursor),
            None => {
                let rng_at_start = state.rng.clone();
                let pairs = self.sampler.sample_epoch(&self.data.train, &mut state.rng);
                (pairs, EpochCursor { rng_at_start, next_step: 0, loss_sum: 0.0, batches: 0, trained: 0 })
            }
        };
        anyhow::ensure!(!pairs.is_empty(), "no training pairs: every user has fewer than two positive training tracks");
        observer.epoch_started(state.epoch + 1, pairs.len());
        let device = self.data.features.device();
        let (anchors, partners): (Vec<u32>, Vec<u32>) = pairs.iter().map(|p| (p[0], p[1])).unzip();
        let trained_before = cursor.trained;
        let steps = pairs.len().div_ceil(self.config.batch_size);
        while cursor.next_step < steps {
            let start = cursor.next_step * self.config.batch_size;
            cursor.next_step += 1;
            let len = self.config.batch_size.min(pairs.len() - start);
            if len < 2 && self.config.loss.kind == LossKind::Contrastive {
                continue; // a single pair has no in-batch negatives
            }
            let (ta, tb) = (&anchors[start..start + len], &partners[start..start + len]);
            let loss = match &self.cpu_step {
                Some(step) => {
                    let masks = HostDropout::sample(&self.config.encoder, 2 * len, &mut state.rng);
                    step.train_batch(&state.encoder, &mut state.optimizer, ta, tb, &masks)?
                }
                None => {
                    let (ta, tb) = (loss::track_tensor(ta, device)?, loss::track_tensor(tb, device)?);
                    let masks =
                        DropoutMasks::sample(&self.config.encoder, 2 * len, &mut state.rng, device, DType::F32)?;
                    let (loss, stats) = training_loss(
                        &state.encoder,
                        &self.data.features,
                        &ta,
                        &tb,
                        &masks,
                        &self.config.loss,
                        self.logq.as_ref(),
                    )?;
                    state.optimizer.step(&loss.backward()?)?;
                    state.encoder.update_moving_stats(&stats)?;
                    loss.to_scalar::<f32>()?
                }
            };
            cursor.loss_sum += loss as f64;
            cursor.batches += 1;
            cursor.trained += len;
            if observer.batch_finished(len) == Control::Stop && cursor.next_step < steps {
                state.cursor = Some(cursor);
                return Ok(None);
            }
        }
        let EpochCursor { loss_sum, batches, trained, .. } = cursor;
        let train_seconds = started.elapsed().as_secs_f64();
        let train_cpu_seconds = cpu_started.zip(crate::system::procstat::cpu_seconds()).map(|(a, b)| b - a);
        let val_loss = self.validation_loss(&state.encoder)?;
        let embeddings = state.encoder.embed(&self.data.features)?;
        let ranking = self.evaluate(&embeddings)?;
        let mean_pairwise_cosine = embeddings.mean(0)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        Ok(Some(EpochMetrics {
            epoch: state.epoch + 1,
            loss: loss_sum / batches.max(1) as f64,
            val_loss,
            ranking,
            mean_pairwise_cosine,
            pairs: trained,
            pairs_per_second: (trained - trained_before) as f64 / train_seconds.max(1e-9),
            train_seconds,
            train_cpu_seconds,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// The loss on the fixed validation pairs, in inference mode, batched like training.
    fn validation_loss(&self, encoder: &Encoder) -> anyhow::Result<f64> {
        let pairs = &self.data.validation_pairs;
        if pairs.len() < 2 {
            return Ok(f64::NAN);
        }
        let (anchors, partners) = split_pairs(pairs, self.data.features.device())?;
        let (mut sum, mut batches) = (0.0, 0usize);
        for start in (0..pairs.len()).step_by(self.config.batch_size) {
            let len = self.config.batch_size.min(pairs.len() - start);
            if len < 2 {
                continue;
            }
            let ta = anchors.narrow(0, start, len)?;
            let tb = partners.narrow(0, start, len)?;
            let x = self.data.features.index_select(&Tensor::cat(&[&ta, &tb], 0)?, 0)?;
            let z = l2_normalize(&encoder.forward_eval(&x)?)?;
            sum += pair_loss(&z, &ta, &tb, &self.config.loss, self.logq.as_ref())?.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        Ok(sum / batches as f64)
    }
}

/// The training-mode loss of one batch of pairs (track indices `ta[i]`, `tb[i]`), with the BatchNorm
/// statistics to apply after the optimiser step. Anchors and partners go through the encoder as one
/// `[2B, 11]` batch, so BatchNorm's batch statistics cover both sides of every pair.
pub fn training_loss(
    encoder: &Encoder,
    features: &Tensor,
    ta: &Tensor,
    tb: &Tensor,
    masks: &DropoutMasks,
    config: &LossConfig,
    logq: Option<&Tensor>,
) -> candle_core::Result<(Tensor, BatchStats)> {
    let x = features.index_select(&Tensor::cat(&[ta, tb], 0)?, 0)?;
    let (h, stats) = encoder.forward_train(&x, masks)?;
    Ok((pair_loss(&l2_normalize(&h)?, ta, tb, config, logq)?, stats))
}

/// The loss given normalised embeddings `z`: anchors in its first half, partners in its second.
fn pair_loss(
    z: &Tensor,
    ta: &Tensor,
    tb: &Tensor,
    config: &LossConfig,
    logq: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let b = ta.dim(0)?;
    let za = z.narrow(0, 0, b)?;
    let zb = z.narrow(0, b, b)?;
    let logq_a = logq.map(|lq| lq.index_select(ta, 0)).transpose()?;
    let logq_b = logq.map(|lq| lq.index_select(tb, 0)).transpose()?;
    let batch = PairBatch { za: &za, zb: &zb, ta, tb, logq_a: logq_a.as_ref(), logq_b: logq_b.as_ref() };
    let objective = loss::batch_loss(config, &batch)?;
    // The cosine objective stays exactly the old trainer's.
    if config.centering_weight > 0.0 && config.kind == LossKind::Contrastive {
        objective + (z.mean(0)?.sqr()?.sum_all()? * config.centering_weight)?
    } else {
        Ok(objective)
    }
}

/// The two columns of a pair list as `[P]` u32 tensors on `device`.
fn split_pairs(pairs: &[[u32; 2]], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let a: Vec<u32> = pairs.iter().map(|p| p[0]).collect();
    let b: Vec<u32> = pairs.iter().map(|p| p[1]).collect();
    Ok((Tensor::from_vec(a, pairs.len(), device)?, Tensor::from_vec(b, pairs.len(), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Autograd gradients of the full training loss (BatchNorm in training mode, fixed dropout
    /// masks, L2 normalisation, masked in-batch softmax, logQ) against central finite differences,
    /// in f64 on a tiny model.
    fn check_gradients(kind: LossKind, logq: bool) {
        let device = Device::Cpu;
        let config = EncoderConfig { embedding_size: 3, dropout: 0.2 };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let encoder = Encoder::new(config, &mut rng, &device, DType::F64).unwrap();
        // Random values everywhere (biases, gamma and beta included) keep the check away from
        // degenerate points such as an all-zero output row, where L2 normalisation has no gradient.
        let mut uniform = |shape: &[usize]| {
            let values: Vec<f64> = (0..shape.iter().product()).map(|_| rng.random_range(-1.0..1.0)).collect();
            Tensor::from_vec(values, shape, &device).unwrap()
        };
        for var in encoder.trainable() {
            var.set(&uniform(var.dims())).unwrap();
        }
        let n_tracks = 9;
        let features = uniform(&[n_tracks, NUM_FEATURES]);
        // Track 4 appears twice as a partner: an accidental hit the mask must handle.
        let ta = Tensor::new(&[0u32, 1, 2, 3, 5], &device).unwrap();
        let tb = Tensor::new(&[4u32, 4, 6, 7, 8], &device).unwrap();
        let masks = DropoutMasks::sample(&config, 10, &mut rng, &device, DType::F64).unwrap();
        let lq = Tensor::new(&[-1.0f64, -2.0, -2.5, -1.5, -0.5, -3.0, -2.0, -1.0, -2.2], &device).unwrap();
        let loss_config = LossConfig { kind, temperature: 0.3, logq_correction: logq, centering_weight: 0.7 };
        let lq = logq.then_some(&lq);
        let loss_at = |enc: &Encoder| training_loss(enc, &features, &ta, &tb, &masks, &loss_config, lq).unwrap().0;
        let grads = loss_at(&encoder).backward().unwrap();
        let h = 1e-6;
        for (name, var) in crate::training::model::TRAINABLE_NAMES.iter().zip(encoder.trainable()) {
            let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let base = var.as_detached_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            // Up to 12 coordinates per tensor keep the test fast.
            let step = (base.len() / 12).max(1);
            for i in (0..base.len()).step_by(step) {
                let eval = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &device).unwrap()).unwrap();
                    let l = loss_at(&encoder).to_scalar::<f64>().unwrap();
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &device).unwrap()).unwrap();
                    l
                };
                let numeric = (eval(h) - eval(-h)) / (2.0 * h);
                let tol = 1e-6 + 1e-4 * numeric.abs().max(analytic[i].abs());
                assert!(
                    (numeric - analytic[i]).abs() < tol,
                    "{kind:?} logq={logq} {name}[{i}]: autograd {} vs finite differences {numeric}",
                    analytic[i]
                );
            }
        }
    }

    #[test]
    fn contrastive_gradients_match_finite_differences() {
        check_gradients(LossKind::Contrastive, false);
    }

    #[test]
    fn logq_contrastive_gradients_match_finite_differences() {
        check_gradients(LossKind::Contrastive, true);
    }

    #[test]
    fn cosine_gradients_match_finite_differences() {
        check_gradients(LossKind::Cosine, false);
    }

    /// Stops after `stop_after` batches (counting from the start of the run), at a batch boundary.
    struct StopAt {
        batches: usize,
        stop_after: usize,
        interrupted: Option<Vec<u8>>,
        config: TrainConfig,
    }

    impl TrainObserver for StopAt {
        fn batch_finished(&mut self, _pairs: usize) -> Control {
            self.batches += 1;
            if self.batches == self.stop_after { Control::Stop } else { Control::Continue }
        }
        fn epoch_finished(&mut self, _: &TrainingState, _: &EpochMetrics) -> anyhow::Result<Control> {
            Ok(Control::Continue)
        }
        fn interrupted(&mut self, state: &TrainingState) -> anyhow::Result<()> {
            self.interrupted = Some(crate::training::checkpoint::to_bytes(state, &self.config, "t")?);
            Ok(())
        }
    }

    fn weights(state: &TrainingState) -> Vec<Vec<f32>> {
        state.encoder.named_tensors().iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    }

    /// A small synthetic dataset and a run over it of a few dozen batches per epoch.
    fn small_run() -> (Dataset, TrainConfig) {
        let spec =
            crate::data::source::SyntheticSpec { tracks: 300, users: 40, interactions: 2_000, genres: 4, seed: 3 };
        let dataset = crate::data::synthetic::generate(&spec);
        let config = TrainConfig {
            epochs: 2,
            batch_size: 16,
            validation_split: 0.2,
            learning_rate: 1e-2,
            encoder: EncoderConfig { embedding_size: 8, dropout: 0.2 },
            loss: LossConfig {
                kind: LossKind::Contrastive,
                temperature: 0.1,
                logq_correction: true,
                centering_weight: 1.0,
            },
            sampling: SamplingConfig::default(),
            positive_kinds: crate::training::pairs::DEFAULT_POSITIVE_KINDS.map(String::from).to_vec(),
            seed: 5,
            eval_users: 20,
            max_validation_pairs: 100,
            holdout: Holdout::Random,
            patience: 0,
            min_delta: 0.0,
        };
        (dataset, config)
    }

    /// On the CPU the fused step trains; the autograd step (what a GPU runs) must train the same
    /// model, up to float rounding: the same pairs, masks and updates, step by step.
    #[test]
    fn the_autograd_step_trains_the_same_model_as_the_fused_one() {
        let (dataset, config) = small_run();
        let data = PreparedData::new(&dataset, &config, &Device::Cpu).unwrap();
        let train = |trainer: Trainer| {
            let mut state = TrainingState::new(&config, &Device::Cpu).unwrap();
            let mut never = StopAt { batches: 0, stop_after: usize::MAX, interrupted: None, config: config.clone() };
            assert!(trainer.run(&mut state, &mut never).unwrap());
            (weights(&state), state.history.loss)
        };
        let fused = Trainer::new(&config, &data).unwrap();
        assert_eq!(fused.step_name(), "fused");
        let autograd = Trainer::new(&config, &data).unwrap().use_autograd();
        assert_eq!(autograd.step_name(), "autograd");
        let initial = weights(&TrainingState::new(&config, &Device::Cpu).unwrap());
        let ((fused_weights, fused_loss), (autograd_weights, autograd_loss)) = (train(fused), train(autograd));
        for ((f, a), i) in fused_weights.iter().zip(&autograd_weights).zip(&initial) {
            let moved = a.iter().zip(i).fold(0.0f32, |m, (a, i)| m.max((a - i).abs()));
            let apart = f.iter().zip(a).fold(0.0f32, |m, (f, a)| m.max((f - a).abs()));
            assert!(moved > 1e-3 && apart < 1e-2 * moved, "moved {moved}, the two steps {apart} apart");
        }
        for (f, a) in fused_loss.iter().zip(&autograd_loss) {
            assert!((f - a).abs() < 1e-4 * a.abs(), "epoch losses {fused_loss:?} vs {autograd_loss:?}");
        }
    }

    #[test]
    fn a_run_stopped_inside_an_epoch_resumes_to_exactly_the_uninterrupted_model() {
        let (dataset, config) = small_run();
        let data = PreparedData::new(&dataset, &config, &Device::Cpu).unwrap();
        let trainer = Trainer::new(&config, &data).unwrap();
        let steps_per_epoch = trainer.pairs_per_epoch().div_ceil(config.batch_size);
        assert!(steps_per_epoch > 10, "{steps_per_epoch}");

        let mut straight = TrainingState::new(&config, &Device::Cpu).unwrap();
        let mut never = StopAt { batches: 0, stop_after: usize::MAX, interrupted: None, config: config.clone() };
        assert!(trainer.run(&mut straight, &mut never).unwrap());

        // Stop 5 batches into the second epoch, checkpoint, restore into a fresh state, finish.
        let mut first = TrainingState::new(&config, &Device::Cpu).unwrap();
        let stop_after = steps_per_epoch + 5;
        let mut stopper = StopAt { batches: 0, stop_after, interrupted: None, config: config.clone() };
        assert!(!trainer.run(&mut first, &mut stopper).unwrap());
        assert_eq!(first.epoch, 1);
        assert_eq!(first.cursor.as_ref().unwrap().next_step, 5);
        let bytes = stopper.interrupted.expect("a partial checkpoint");
        let mut resumed = TrainingState::new(&config, &Device::Cpu).unwrap();
        crate::training::checkpoint::restore(&bytes, &mut resumed, &config).unwrap();
        assert_eq!(resumed.cursor, first.cursor);
        assert!(trainer.run(&mut resumed, &mut never).unwrap());

        assert_eq!(weights(&resumed), weights(&straight), "resumed weights differ from the uninterrupted run");
        assert_eq!(resumed.history.loss, straight.history.loss);
        assert_eq!(resumed.history.recall_at_10, straight.history.recall_at_10);
    }

    #[test]
    fn the_best_epoch_is_the_first_to_reach_the_best_recall_by_more_than_min_delta() {
        let curve = [0.10, 0.14, 0.15, 0.149, 0.1505, 0.12];
        assert_eq!(best_epoch(&curve, 0.0), Some(5));
        // 0.1505 beats 0.15 by less than 0.001: epoch 3 stays the best.
        assert_eq!(best_epoch(&curve, 0.001), Some(3));
        assert_eq!(best_epoch(&[], 0.0), None);
        // A tie is no improvement: the first epoch to reach it is kept.
        assert_eq!(best_epoch(&[0.2, 0.2, 0.2], 0.0), Some(1));
    }

    #[test]
    fn early_stopping_stops_patience_epochs_after_the_planted_peak() {
        // Peak at epoch 4, then a plateau just under it.
        let curve = [0.05, 0.08, 0.10, 0.12, 0.119, 0.118, 0.1195, 0.117, 0.116];
        let stopped_at = (1..=curve.len()).find(|&n| should_stop_early(&curve[..n], 3, 0.0));
        assert_eq!(stopped_at, Some(7), "epoch 4 + patience 3");
        assert!((1..=curve.len()).all(|n| !should_stop_early(&curve[..n], 0, 0.0)), "patience 0 never stops");
        // Creeping gains: with min_delta 0 every epoch is the best and the run never stops; with
        // 0.025 only epoch 2 (0.08 > 0.05 + 0.025) counts, and patience 3 stops it at epoch 5.
        let creeping = [0.05, 0.08, 0.10, 0.101, 0.102, 0.103, 0.104];
        assert!((1..=creeping.len()).all(|n| !should_stop_early(&creeping[..n], 3, 0.0)));
        assert_eq!(best_epoch(&creeping, 0.025), Some(2));
        let stopped_at = (1..=creeping.len()).find(|&n| should_stop_early(&creeping[..n], 3, 0.025));
        assert_eq!(stopped_at, Some(5));
    }
}
