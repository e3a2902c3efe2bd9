//! One optimiser step of any kind, fused on the CPU or through autograd, and the embeddings a
//! state gives every track.
//!
//! Random draws per step, in order: the content encoder's dropout masks (kinds with content),
//! then the hybrid's identity and album dropout. The content kind draws exactly what it always
//! drew, so its runs are unchanged by the kinds beside it. On a device the content masks come from
//! the device's generator instead (`super::device`), and the host generator draws only the tables'.

use candle_core::{DType, Device, Tensor, Var};

use super::{Trainer, TrainingState, pair_loss};
use crate::system::cores::on_all_cores;
use crate::training::host::host_values;
use crate::training::loss;
use crate::training::model::tables::{TableDropout, TableMix};
use crate::training::model::{DropoutMasks, EncoderConfig, HostDropout, ModelKind, l2_normalize};

/// A step's loss: read already (the fused step), or a scalar still on the device, for the loop to
/// sum there and read later (see [`super::device::PendingLoss`]).
pub(super) enum StepLoss {
    Read(f32),
    OnDevice(Tensor),
}

/// One step's pairs: host indices (the fused step and the table rows read them), and the same
/// indices as slices of the epoch's resident device tensors when the trainer keeps them there.
pub(super) struct StepPairs<'p> {
    pub ta: &'p [u32],
    pub tb: &'p [u32],
    pub on_device: Option<(Tensor, Tensor)>,
}

impl StepPairs<'_> {
    /// The indices as tensors on `device`: the resident slices, or uploaded now.
    fn tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        match &self.on_device {
            Some(pair) => Ok(pair.clone()),
            None => Ok((loss::track_tensor(self.ta, device)?, loss::track_tensor(self.tb, device)?)),
        }
    }
}

/// A step's dropout masks: from the run's host generator (the CPU's way, and the fused step's
/// input), or drawn on the device.
enum Masks {
    Host(HostDropout),
    Device(DropoutMasks),
}

impl Masks {
    fn host(&self) -> &HostDropout {
        match self {
            Masks::Host(host) => host,
            Masks::Device(_) => unreachable!("the fused step runs on the CPU, which draws host masks"),
        }
    }

    fn into_tensors(self, config: &EncoderConfig, rows: usize, device: &Device) -> candle_core::Result<DropoutMasks> {
        match self {
            Masks::Host(host) => host.to_tensors(config, rows, device, DType::F32),
            Masks::Device(masks) => Ok(masks),
        }
    }
}

impl Trainer<'_> {
    /// Trains one batch of pairs; returns its loss.
    pub(super) fn train_step(&self, state: &mut TrainingState, pairs: StepPairs) -> anyhow::Result<StepLoss> {
        let kind = self.config.model_kind;
        let (ta, tb) = (pairs.ta, pairs.tb);
        let rows = 2 * ta.len();
        let device = self.data.features.device();
        let masks = match (kind.has_content(), self.path.masks_on_device) {
            (true, false) => Masks::Host(HostDropout::sample(&self.config.encoder, rows, &mut state.rng)),
            (true, true) => Masks::Device(DropoutMasks::draw_on_device(&self.config.encoder, rows, device)?),
            (false, _) => Masks::Host(HostDropout::none()),
        };
        if kind.is_content() {
            return self.content_step(state, &pairs, masks);
        }
        let table_config = self.config.table_config();
        let dropout = TableDropout::sample(kind, &table_config, rows, &mut state.rng);
        let tracks: Vec<u32> = ta.iter().chain(tb).copied().collect();
        let mixes = TableMix::build(&state.tables, &self.data.inputs, &tracks, &dropout);
        let learning_rate = table_config.learning_rate;
        if let Some(step) = &self.cpu_step {
            let encoder = kind.has_content().then_some((&state.encoder, &mut state.optimizer, masks.host()));
            let loss = step.train_batch_with_tables(encoder, &mut state.tables, &mixes, learning_rate, ta, tb)?;
            return Ok(StepLoss::Read(loss));
        }
        // Autograd: the touched rows become variables; the mixing matrices sum them per batch row.
        let mut table_vars = Vec::new();
        let mut extra: Option<Tensor> = None;
        for (i, (mix, table)) in mixes.iter().zip(&state.tables.tables).enumerate() {
            let (Some(mix), Some(table)) = (mix, table) else { continue };
            let (rows, mixing) = mix.tensors(table, device)?;
            let var = Var::from_tensor(&rows)?;
            let term = mixing.matmul(var.as_tensor())?;
            extra = Some(match extra {
                Some(sum) => (sum + term)?,
                None => term,
            });
            table_vars.push((i, var));
        }
        let extra = extra.expect("a kind with tables has at least one");
        let (ta_t, tb_t) = pairs.tensors(device)?;
        let (s, stats) = match kind.has_content() {
            true => {
                let x = self.data.features.index_select(&Tensor::cat(&[&ta_t, &tb_t], 0)?, 0)?;
                let masks = masks.into_tensors(&self.config.encoder, rows, device)?;
                let (h, stats) = state.encoder.forward_train(&x, &masks)?;
                ((h + &extra)?, Some(stats))
            }
            false => (extra, None),
        };
        let loss = pair_loss(&l2_normalize(&s)?, &ta_t, &tb_t, &self.config.loss, self.logq.as_ref())?;
        let grads = loss.backward()?;
        if let Some(stats) = stats {
            state.optimizer.step(&grads)?;
            state.encoder.update_moving_stats(&stats)?;
        }
        let mut gradients: [Option<Vec<f32>>; 3] = [None, None, None];
        for (i, var) in &table_vars {
            let g = grads.get(var.as_tensor()).map(|g| g.to_device(&candle_core::Device::Cpu)).transpose()?;
            gradients[*i] = Some(match g {
                Some(g) => host_values(&g.contiguous()?)?,
                None => vec![0.0; var.elem_count()],
            });
        }
        state.tables.step(&mixes, &gradients, learning_rate);
        Ok(StepLoss::OnDevice(loss))
    }

    /// The content kind's step, exactly as before the kinds existed.
    fn content_step(&self, state: &mut TrainingState, pairs: &StepPairs, masks: Masks) -> anyhow::Result<StepLoss> {
        if let Some(step) = &self.cpu_step {
            return Ok(StepLoss::Read(step.train_batch(
                &state.encoder,
                &mut state.optimizer,
                pairs.ta,
                pairs.tb,
                masks.host(),
            )?));
        }
        let device = self.data.features.device();
        let (ta, tb) = pairs.tensors(device)?;
        let masks = masks.into_tensors(&self.config.encoder, 2 * ta.dim(0)?, device)?;
        let (loss, stats) = super::training_loss(
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
        Ok(StepLoss::OnDevice(loss))
    }

    /// The pre-normalisation inference output of `tracks` (no dropout): the content encoder's output
    /// plus the table terms, per the kind.
    pub(super) fn inference_rows(&self, state: &TrainingState, tracks: &Tensor) -> candle_core::Result<Tensor> {
        let kind = self.config.model_kind;
        let content = match kind.has_content() {
            true => Some(state.encoder.forward_eval(&self.data.features.index_select(tracks, 0)?)?),
            false => None,
        };
        if kind.is_content() {
            return Ok(content.expect("the content kind has content"));
        }
        let ids: Vec<u32> = tracks.to_device(&candle_core::Device::Cpu)?.to_vec1()?;
        let mixes = TableMix::build(&state.tables, &self.data.inputs, &ids, &TableDropout::none(ids.len()));
        let extra = state.tables.mixed(&mixes, ids.len());
        let e = self.config.encoder.embedding_size;
        let extra = Tensor::from_vec(extra, (ids.len(), e), self.data.features.device())?;
        match content {
            Some(h) => h + extra,
            None => Ok(extra),
        }
    }

    /// L2-normalised embeddings of every catalogue track `[num_tracks, E]`. A collaborative track
    /// without training listens has a zero row (see [`Self::fresh_state`]), so a zero embedding.
    pub fn embed(&self, state: &TrainingState) -> candle_core::Result<Tensor> {
        let kind = self.config.model_kind;
        if kind.is_content() {
            return state.encoder.embed(&self.data.features);
        }
        let (n, e) = (self.data.num_tracks(), self.config.encoder.embedding_size);
        let mut s = match kind.has_content() {
            true => host_values(
                &state.encoder.forward_eval_chunked(&self.data.features)?.to_device(&candle_core::Device::Cpu)?,
            )?,
            false => vec![0.0f32; n * e],
        };
        state.tables.add_all(&self.data.inputs, &mut s);
        l2_normalize(&Tensor::from_vec(s, (n, e), self.data.features.device())?)
    }

    /// Which tracks have a learned embedding: all of them for kinds with content; for the
    /// collaborative kind, those with training listens.
    pub fn learned_rows(&self) -> Option<Vec<bool>> {
        (self.config.model_kind == ModelKind::Collaborative)
            .then(|| self.data.track_counts.iter().map(|&c| c > 0).collect())
    }

    /// Cold-track metrics of a state's embeddings, when there is a cold hold-out and the kind can
    /// embed a track without listens (not the collaborative kind).
    pub fn evaluate_cold(&self, embeddings: &Tensor) -> candle_core::Result<Option<super::RankingMetrics>> {
        match (&self.cold_eval, self.config.model_kind) {
            (Some(cold), kind) if kind != ModelKind::Collaborative => {
                Ok(Some(on_all_cores(|| cold.evaluate_embeddings(embeddings))?))
            }
            _ => Ok(None),
        }
    }
}
