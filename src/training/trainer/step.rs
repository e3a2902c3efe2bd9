//! One optimiser step of any kind, fused on the CPU or through autograd, and the embeddings a
//! state gives every track.
//!
//! Random draws per step, in order: the content encoder's dropout masks (kinds with content),
//! then the hybrid's identity and album dropout. The content kind draws exactly what it always
//! drew, so its runs are unchanged by the kinds beside it.

use candle_core::{DType, Tensor, Var};

use super::{Trainer, TrainingState, pair_loss};
use crate::system::cores::on_all_cores;
use crate::training::host::host_values;
use crate::training::loss;
use crate::training::model::tables::{TableDropout, TableMix};
use crate::training::model::{DropoutMasks, HostDropout, ModelKind, l2_normalize};

impl Trainer<'_> {
    /// Trains one batch of pairs; returns its loss.
    pub(super) fn train_step(&self, state: &mut TrainingState, ta: &[u32], tb: &[u32]) -> anyhow::Result<f32> {
        let kind = self.config.model_kind;
        let rows = 2 * ta.len();
        let masks = match kind.has_content() {
            true => HostDropout::sample(&self.config.encoder, rows, &mut state.rng),
            false => HostDropout::none(),
        };
        if kind.is_content() {
            return self.content_step(state, ta, tb, &masks);
        }
        let table_config = self.config.table_config();
        let dropout = TableDropout::sample(kind, &table_config, rows, &mut state.rng);
        let tracks: Vec<u32> = ta.iter().chain(tb).copied().collect();
        let mixes = TableMix::build(&state.tables, &self.data.inputs, &tracks, &dropout);
        let learning_rate = table_config.learning_rate;
        if let Some(step) = &self.cpu_step {
            let encoder = kind.has_content().then_some((&state.encoder, &mut state.optimizer, &masks));
            return Ok(step.train_batch_with_tables(encoder, &mut state.tables, &mixes, learning_rate, ta, tb)?);
        }
        // Autograd: the touched rows become variables; the mixing matrices sum them per batch row.
        let device = self.data.features.device();
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
        let (ta_t, tb_t) = (loss::track_tensor(ta, device)?, loss::track_tensor(tb, device)?);
        let (s, stats) = match kind.has_content() {
            true => {
                let x = self.data.features.index_select(&Tensor::cat(&[&ta_t, &tb_t], 0)?, 0)?;
                let masks = masks.to_tensors(&self.config.encoder, rows, device, DType::F32)?;
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
        Ok(loss.to_scalar::<f32>()?)
    }

    /// The content kind's step, exactly as before the kinds existed.
    fn content_step(
        &self,
        state: &mut TrainingState,
        ta: &[u32],
        tb: &[u32],
        masks: &HostDropout,
    ) -> anyhow::Result<f32> {
        if let Some(step) = &self.cpu_step {
            return Ok(step.train_batch(&state.encoder, &mut state.optimizer, ta, tb, masks)?);
        }
        let device = self.data.features.device();
        let (ta, tb) = (loss::track_tensor(ta, device)?, loss::track_tensor(tb, device)?);
        let masks: DropoutMasks = masks.to_tensors(&self.config.encoder, 2 * ta.dim(0)?, device, DType::F32)?;
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
        Ok(loss.to_scalar::<f32>()?)
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
