//! The training loop: synchronous and CPU/GPU bound, so callers run it off the async runtime
//! (`spawn_blocking`). Per epoch: sample pairs, train on shuffled batches, evaluate on held-out
//! interactions, then hand the state to the observer (which checkpoints it and may stop the run).

mod config;
mod device;
mod prepared;
mod state;
mod step;

pub use config::{Holdout, StopReason, TrainConfig, best_epoch, should_stop_early};
pub use device::{DevicePath, LOSS_READBACK_STEPS};
pub use prepared::{ColdHoldout, ColdSummary, HoldoutSummary, PreparedData};
pub use state::{EpochCursor, EpochHistory, EpochMetrics, TrainingState};

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::system::cores::on_all_cores;
use crate::training::cpu_step::CpuStep;
use crate::training::eval::{EvalSet, RankingMetrics};
use crate::training::loss::{self, LossConfig, LossKind, PairBatch};
use crate::training::model::{BatchStats, DropoutMasks, Encoder, l2_normalize};
use crate::training::pairs::PairSampler;
use step::{StepLoss, StepPairs};

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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
    /// The number of the user's training tracks sharing an artist with the candidate: a
    /// platform's "more by this artist" rule. Absent from versions published before it existed.
    #[serde(default)]
    pub shared_artist: RankingMetrics,
    /// The same with the album ("more from this album"). Absent from versions before it existed.
    #[serde(default)]
    pub shared_album: RankingMetrics,
    /// The same, ranking only the cold tracks, when there is a cold hold-out. Item-CF and
    /// popularity are absent: a track nobody has played has no co-listens and no count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold: Option<ColdBaselines>,
}

/// Baselines that can rank tracks without listens, on the cold hold-out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColdBaselines {
    pub raw_features: RankingMetrics,
    pub shared_artist: RankingMetrics,
    pub shared_album: RankingMetrics,
    pub random: RankingMetrics,
}

/// The trainer for one run: data, settings and the fixed evaluation set.
pub struct Trainer<'a> {
    config: &'a TrainConfig,
    data: &'a PreparedData,
    sampler: PairSampler,
    eval: EvalSet<'a>,
    /// The cold-track evaluation, when the run holds tracks out.
    cold_eval: Option<EvalSet<'a>>,
    logq: Option<Tensor>,
    /// The fused CPU step (`None` on a GPU, or when autograd is asked for).
    cpu_step: Option<CpuStep>,
    /// Where masks are drawn, how often the loss is read, whether pair indices stay resident.
    path: DevicePath,
}

impl<'a> Trainer<'a> {
    pub fn new(config: &'a TrainConfig, data: &'a PreparedData) -> anyhow::Result<Self> {
        let sampler = PairSampler::new(config.sampling.clone(), &data.train, data.num_tracks());
        let eval = EvalSet::new(&data.train, &data.heldout, config.eval_users, config.seed);
        let cold_eval = data.cold.as_ref().map(|cold| {
            EvalSet::new(&data.train, &cold.heldout, config.eval_users, config.seed).only_candidates(&cold.is_cold)
        });
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
        Ok(Self { config, data, sampler, eval, cold_eval, logq, cpu_step, path: DevicePath::for_device(device) })
    }

    /// A fresh state of this run's kind, sized by its catalogue; a collaborative model's tracks
    /// without training listens start (and stay) at zero.
    pub fn fresh_state(&self, device: &Device) -> anyhow::Result<TrainingState> {
        let mut state = TrainingState::for_inputs(self.config, &self.data.inputs, device)?;
        if let Some(learned) = self.learned_rows() {
            state.tables.zero_unlearned_identity(&learned);
        }
        Ok(state)
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

    /// Trains the way a GPU does (autograd, masks drawn by the device, the loss read every
    /// [`LOSS_READBACK_STEPS`] steps, resident pair indices) wherever the tensors are: on the CPU,
    /// how the tests drive that path without a GPU. `path` overrides the device's defaults.
    pub fn use_device_path(mut self, path: DevicePath) -> Self {
        self.cpu_step = None;
        self.path = path;
        self
    }

    /// Pairs one epoch yields at most (for progress reporting and the insufficient-data check).
    pub fn pairs_per_epoch(&self) -> usize {
        self.sampler.max_pairs(&self.data.train)
    }

    /// The baselines' figures on the evaluation sets (on all cores: see [`on_all_cores`]).
    pub fn baselines(&self) -> anyhow::Result<Baselines> {
        on_all_cores(|| self.baselines_unless(&|| false))?.context("baselines stopped though nothing asked")
    }

    /// [`Self::baselines`] on the caller's rayon pool, or `None` once `stop()` says so (checked
    /// between baselines and within item-CF, the longest): for computing them beside training,
    /// which a stop request must not wait for.
    pub fn baselines_unless(&self, stop: &(dyn Fn() -> bool + Sync)) -> anyhow::Result<Option<Baselines>> {
        let raw = l2_normalize(&self.data.features)?;
        let popularity: Vec<f32> = self.data.track_counts.iter().map(|&c| c as f32).collect();
        let n = self.data.num_tracks();
        let tags = &self.data.tags;
        let shared_artist = |eval: &EvalSet| eval.evaluate_shared_labels(n, tags.artists.len(), |t| tags.artists_of(t));
        let shared_album = |eval: &EvalSet| eval.evaluate_shared_labels(n, tags.albums.len(), |t| tags.albums_of(t));
        // `None` once a stop came: asked before each baseline (item-CF, the longest, also asks
        // before each chunk of users).
        let go = || (!stop()).then_some(());
        let cold_baselines = |cold: &EvalSet| -> Option<candle_core::Result<ColdBaselines>> {
            go()?;
            let raw_features = cold.evaluate_embeddings(&raw);
            go()?;
            let shared_artist = shared_artist(cold);
            go()?;
            let shared_album = shared_album(cold);
            go()?;
            let random = cold.evaluate_random(n, self.config.seed);
            Some(raw_features.map(|raw_features| ColdBaselines { raw_features, shared_artist, shared_album, random }))
        };
        let all = || -> Option<candle_core::Result<Baselines>> {
            let cold = match &self.cold_eval {
                Some(cold) => Some(cold_baselines(cold)?),
                None => None,
            };
            go()?;
            let raw_features = self.eval.evaluate_embeddings(&raw);
            let item_cf = self.eval.evaluate_item_cf_unless(n, stop)?;
            go()?;
            let popularity = self.eval.evaluate_global_scores(&popularity);
            go()?;
            let random = self.eval.evaluate_random(n, self.config.seed);
            go()?;
            let shared_artist = shared_artist(&self.eval);
            go()?;
            let shared_album = shared_album(&self.eval);
            Some((|| {
                let (raw_features, cold) = (raw_features?, cold.transpose()?);
                Ok(Baselines { raw_features, popularity, item_cf, random, shared_artist, shared_album, cold })
            })())
        };
        Ok(all().transpose()?)
    }

    /// The catalogue's vocabularies and table rows.
    pub fn inputs(&self) -> &crate::training::model::vocab::TrackInputs {
        &self.data.inputs
    }

    /// The fixed evaluation set (users and their held-out tracks), for extra baselines.
    pub fn eval_set(&self) -> &EvalSet<'a> {
        &self.eval
    }

    /// The cold-track evaluation set, when tracks were held out cold.
    pub fn cold_eval_set(&self) -> Option<&EvalSet<'a>> {
        self.cold_eval.as_ref()
    }

    /// Held-out ranking metrics of normalised embeddings `[num_tracks, E]` (from [`Self::embed`]):
    /// tracks without a learned row (collaborative) rank last and add nothing to queries.
    /// Runs on all cores ([`on_all_cores`]), as every evaluation does: it ends every epoch.
    pub fn evaluate(&self, embeddings: &Tensor) -> candle_core::Result<RankingMetrics> {
        match self.learned_rows() {
            Some(learned) => self.evaluate_known(embeddings, &learned),
            None => on_all_cores(|| self.eval.evaluate_embeddings(embeddings)),
        }
    }

    /// Held-out metrics of embeddings of which only the `known` tracks count (they rank the others
    /// last): a collaborative model's, or the latest version's scored for the gate. On all cores.
    pub fn evaluate_known(&self, embeddings: &Tensor, known: &[bool]) -> candle_core::Result<RankingMetrics> {
        on_all_cores(|| self.eval.evaluate_embeddings_known(embeddings, known))
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
        let (anchors, partners): (Vec<u32>, Vec<u32>) = pairs.iter().map(|p| (p[0], p[1])).unzip();
        let trained_before = cursor.trained;
        let steps = pairs.len().div_ceil(self.config.batch_size);
        // A step of `len` pairs trains unless it is a lone pair of the contrastive loss (no
        // in-batch negatives); `None` for a step that trains nothing.
        let batch = |step: usize| -> Option<(usize, usize)> {
            let start = step * self.config.batch_size;
            let len = self.config.batch_size.min(pairs.len() - start);
            (len >= 2 || self.config.loss.kind != LossKind::Contrastive).then_some((start, len))
        };
        let device = self.data.features.device();
        if self.path.masks_on_device && self.config.model_kind.has_content() {
            device::seed_epoch(device, self.config.seed, state.epoch)?;
            let rows_of = |step| batch(step).map(|(_, len)| 2 * len);
            device::skip_masks(&self.config.encoder, device, cursor.next_step, rows_of)?;
        }
        let resident = match self.path.resident_pairs {
            true => Some((loss::track_tensor(&anchors, device)?, loss::track_tensor(&partners, device)?)),
            false => None,
        };
        let mut pending = device::PendingLoss::new(self.path.loss_readback_steps);
        while cursor.next_step < steps {
            let step = cursor.next_step;
            cursor.next_step += 1;
            let Some((start, len)) = batch(step) else { continue };
            let on_device = match &resident {
                Some((a, b)) => Some((a.narrow(0, start, len)?, b.narrow(0, start, len)?)),
                None => None,
            };
            let step_pairs =
                StepPairs { ta: &anchors[start..start + len], tb: &partners[start..start + len], on_device };
            match self.train_step(state, step_pairs)? {
                StepLoss::Read(loss) => cursor.loss_sum += loss as f64,
                StepLoss::OnDevice(loss) => pending.add(&loss, &mut cursor.loss_sum)?,
            }
            cursor.batches += 1;
            cursor.trained += len;
            if observer.batch_finished(len) == Control::Stop && cursor.next_step < steps {
                pending.flush(&mut cursor.loss_sum)?;
                state.cursor = Some(cursor);
                return Ok(None);
            }
        }
        pending.flush(&mut cursor.loss_sum)?;
        let EpochCursor { loss_sum, batches, trained, .. } = cursor;
        let train_seconds = started.elapsed().as_secs_f64();
        let train_cpu_seconds = cpu_started.zip(crate::system::procstat::cpu_seconds()).map(|(a, b)| b - a);
        let val_loss = self.validation_loss(state)?;
        let embeddings = self.embed(state)?;
        let ranking = self.evaluate(&embeddings)?;
        let cold_ranking = self.evaluate_cold(&embeddings)?;
        let mean_pairwise_cosine = embeddings.mean(0)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        Ok(Some(EpochMetrics {
            epoch: state.epoch + 1,
            loss: loss_sum / batches.max(1) as f64,
            val_loss,
            ranking,
            cold_ranking,
            mean_pairwise_cosine,
            pairs: trained,
            pairs_per_second: (trained - trained_before) as f64 / train_seconds.max(1e-9),
            train_seconds,
            train_cpu_seconds,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// The loss on the fixed validation pairs, in inference mode, batched like training.
    fn validation_loss(&self, state: &TrainingState) -> anyhow::Result<f64> {
        let pairs = &self.data.validation_pairs;
        if pairs.len() < 2 {
            return Ok(f64::NAN);
        }
        let (anchors, partners) = split_pairs(pairs, self.data.features.device())?;
        let (mut sum, mut batches) = (0.0, 0usize);
        let mut pending = device::PendingLoss::new(self.path.loss_readback_steps);
        for start in (0..pairs.len()).step_by(self.config.batch_size) {
            let len = self.config.batch_size.min(pairs.len() - start);
            if len < 2 {
                continue;
            }
            let ta = anchors.narrow(0, start, len)?;
            let tb = partners.narrow(0, start, len)?;
            let z = l2_normalize(&self.inference_rows(state, &Tensor::cat(&[&ta, &tb], 0)?)?)?;
            pending.add(&pair_loss(&z, &ta, &tb, &self.config.loss, self.logq.as_ref())?, &mut sum)?;
            batches += 1;
        }
        pending.flush(&mut sum)?;
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
mod tests;
