//! One training step on the CPU as straight-line code: forward, backward and Adam in a handful of
//! matrix products and loops over plain `f32` buffers.
//!
//! Through candle's autograd a step is ~400 tensor ops (BatchNorm, three Dense layers, dropout,
//! L2 normalisation, the loss, their backward ops, then Adam's ~10 ops per variable), each
//! allocating its output and dispatching through the op graph. At batch 64 that per-op overhead was
//! most of the step (BENCHMARKS.md). This module computes exactly the same function and gradients
//! with the model's backward pass written out by hand: 12 `gemm` calls (9 for the cosine loss; the microkernels candle
//! itself uses) and a few element-wise loops. The autograd path stays the reference: the tests
//! compare this step with it (loss, all eight gradients, the weights after Adam, the moving
//! statistics), and it is what runs on a GPU.
//!
//! Shapes: `n = 2B` rows (anchors then partners, one batch so that BatchNorm's statistics cover
//! both), `F = 11` features, hidden widths `H1 = 2E`, `H2 = E`, output `E`.

pub(crate) mod kernels;

use candle_core::Tensor;

use crate::data::features::NUM_FEATURES;
use crate::training::host::host_values;
use crate::training::loss::fused::SymmetricDiagonalCe;
use crate::training::loss::{LossConfig, LossKind};
use crate::training::model::tables::{TableMix, Tables};
use crate::training::model::{BN_EPSILON, Encoder, EncoderConfig, HostDropout};
use crate::training::optim::Adam;
use kernels::{Mat, column_sums, matmul, relu_dropout, repeat_rows, row_dots, scale_by};

/// The fused step for one run: the objective and host copies of the constant inputs.
pub struct CpuStep {
    encoder: EncoderConfig,
    loss: LossConfig,
    /// `[num_tracks, F]` standardised features.
    features: Vec<f32>,
    /// `log q` per track when the contrastive loss is logQ-corrected.
    logq: Option<Vec<f32>>,
}

/// What one batch's forward and backward pass produce.
pub struct StepOutput {
    pub loss: f32,
    /// In [`crate::training::model::TRAINABLE_NAMES`] order.
    pub gradients: Vec<Vec<f32>>,
    /// BatchNorm's batch mean and biased variance.
    pub batch_mean: Vec<f32>,
    pub batch_variance: Vec<f32>,
    /// The gradient at the pre-normalisation sum, when table terms were added to it.
    pub pre_norm_gradient: Option<Vec<f32>>,
}

impl CpuStep {
    /// `features`: `[num_tracks, F]` f32 on the CPU; `logq`: `[num_tracks]` f32, when used.
    pub fn new(
        encoder: EncoderConfig,
        loss: LossConfig,
        features: &Tensor,
        logq: Option<&Tensor>,
    ) -> candle_core::Result<Self> {
        let features = host_values(features)?;
        let logq = logq.map(host_values).transpose()?;
        Ok(Self { encoder, loss, features, logq })
    }

    /// Trains one batch of pairs (`ta[i]`, `tb[i]` track indices): forward, backward, Adam, then
    /// BatchNorm's moving statistics — what the autograd path does. Returns the batch's loss.
    pub fn train_batch(
        &self,
        encoder: &Encoder,
        optimizer: &mut Adam,
        ta: &[u32],
        tb: &[u32],
        masks: &HostDropout,
    ) -> candle_core::Result<f32> {
        let out = self.loss_and_gradients(encoder, ta, tb, masks)?;
        optimizer.step_host(&out.gradients)?;
        encoder.update_moving_stats_host(&out.batch_mean, &out.batch_variance)?;
        Ok(out.loss)
    }

    /// [`Self::train_batch`] for a kind with embedding tables: the batch's table terms (`mixes`,
    /// rows `ta` then `tb`) are added to the content output before normalisation (the hybrid) or
    /// are the whole embedding (collaborative, `encoder` unused); the touched rows then take a lazy
    /// Adam step at `table_learning_rate`.
    #[allow(clippy::too_many_arguments)]
    pub fn train_batch_with_tables(
        &self,
        encoder: Option<(&Encoder, &mut Adam, &HostDropout)>,
        tables: &mut Tables,
        mixes: &[Option<TableMix>; 3],
        table_learning_rate: f64,
        ta: &[u32],
        tb: &[u32],
    ) -> candle_core::Result<f32> {
        let e = self.encoder.embedding_size;
        let extra = tables.mixed(mixes, 2 * ta.len());
        let (loss, ds) = match encoder {
            Some((encoder, optimizer, masks)) => {
                let out = self.loss_and_gradients_with(encoder, ta, tb, masks, Some(&extra))?;
                optimizer.step_host(&out.gradients)?;
                encoder.update_moving_stats_host(&out.batch_mean, &out.batch_variance)?;
                (out.loss, out.pre_norm_gradient.expect("asked for with table terms"))
            }
            None => self.tables_only_loss(extra, ta, tb)?,
        };
        let gradients = [0, 1, 2].map(|i| mixes[i].as_ref().map(|m| m.gradients(&ds, e)));
        tables.step(mixes, &gradients, table_learning_rate);
        Ok(loss)
    }

    /// The loss of embeddings that are table terms alone (`s`, `[2B, E]`) and its gradient at `s`.
    pub fn tables_only_loss(&self, s: Vec<f32>, ta: &[u32], tb: &[u32]) -> candle_core::Result<(f32, Vec<f32>)> {
        check_pairs(ta, tb)?;
        self.normalized_objective(&s, ta, tb, self.encoder.embedding_size)
    }

    /// The training-mode loss of a batch and its gradients with respect to every trainable tensor.
    pub fn loss_and_gradients(
        &self,
        encoder: &Encoder,
        ta: &[u32],
        tb: &[u32],
        masks: &HostDropout,
    ) -> candle_core::Result<StepOutput> {
        self.loss_and_gradients_with(encoder, ta, tb, masks, None)
    }

    /// [`Self::loss_and_gradients`] with `extra` (`[2B, E]`) added to the encoder's output before
    /// normalisation; the output then carries the gradient at that sum.
    pub fn loss_and_gradients_with(
        &self,
        encoder: &Encoder,
        ta: &[u32],
        tb: &[u32],
        masks: &HostDropout,
        extra: Option<&[f32]>,
    ) -> candle_core::Result<StepOutput> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, the one feature the function is compiled for.
            return unsafe { self.loss_and_gradients_avx2(encoder, ta, tb, masks, extra) };
        }
        self.loss_and_gradients_inline(encoder, ta, tb, masks, extra)
    }

    /// The step's element-wise loops 8 floats wide (the same bits as the baseline build: see
    /// `kernels::avx2_or_not`). Written out rather than through that macro: a closure this large
    /// is not reliably inlined into the AVX2 function.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn loss_and_gradients_avx2(
        &self,
        encoder: &Encoder,
        ta: &[u32],
        tb: &[u32],
        masks: &HostDropout,
        extra: Option<&[f32]>,
    ) -> candle_core::Result<StepOutput> {
        self.loss_and_gradients_inline(encoder, ta, tb, masks, extra)
    }

    #[inline(always)]
    fn loss_and_gradients_inline(
        &self,
        encoder: &Encoder,
        ta: &[u32],
        tb: &[u32],
        masks: &HostDropout,
        extra: Option<&[f32]>,
    ) -> candle_core::Result<StepOutput> {
        check_pairs(ta, tb)?;
        let (b, f, e) = (ta.len(), NUM_FEATURES, self.encoder.embedding_size);
        let n = 2 * b;
        let w =
            encoder.trainable().iter().map(|v| host_values(v.as_tensor())).collect::<candle_core::Result<Vec<_>>>()?;
        let (gamma, beta, k1, b1, k2, b2, k3, b3) = (&w[0], &w[1], &w[2], &w[3], &w[4], &w[5], &w[6], &w[7]);
        let (mask1, mask2) = (masks.hidden1.as_deref(), masks.hidden2.as_deref());

        // Forward. BatchNorm on the batch's statistics (the inputs are data: no gradient to them).
        let mut x = Vec::with_capacity(n * f);
        for &t in ta.iter().chain(tb) {
            let t = t as usize * f;
            let row = self
                .features
                .get(t..t + f)
                .ok_or_else(|| candle_core::Error::Msg("track index out of range".into()))?;
            x.extend_from_slice(row);
        }
        let mean: Vec<f32> = column_sums(&x, f).iter().map(|s| s / n as f32).collect();
        let mut xhat: Vec<f32> = x.chunks_exact(f).flat_map(|row| row.iter().zip(&mean).map(|(v, m)| v - m)).collect();
        let variance: Vec<f32> =
            column_sums(&xhat.iter().map(|c| c * c).collect::<Vec<_>>(), f).iter().map(|s| s / n as f32).collect();
        let inv_std: Vec<f32> = variance.iter().map(|v| 1.0 / (v + BN_EPSILON as f32).sqrt()).collect();
        for row in xhat.chunks_exact_mut(f) {
            row.iter_mut().zip(&inv_std).for_each(|(c, s)| *c *= s);
        }
        let y: Vec<f32> = xhat
            .chunks_exact(f)
            .flat_map(|row| row.iter().zip(gamma).zip(beta).map(|((v, g), bt)| v * g + bt))
            .collect();
        let mut a1 = dense(&y, n, k1, b1);
        let relu1 = relu_dropout(&mut a1, mask1);
        let mut a2 = dense(&a1, n, k2, b2);
        let relu2 = relu_dropout(&mut a2, mask2);
        let mut h = dense(&a2, n, k3, b3);
        h.iter_mut().for_each(|v| *v = kernels::fast_tanh(*v));
        // The table terms join before normalisation (hybrid); the content kind has none.
        let s_sum;
        let s: &[f32] = match extra {
            Some(extra) if extra.len() == h.len() => {
                s_sum = h.iter().zip(extra).map(|(a, b)| a + b).collect::<Vec<f32>>();
                &s_sum
            }
            Some(extra) => candle_core::bail!("{} table values for {} outputs", extra.len(), h.len()),
            None => &h,
        };
        let (loss, mut dh) = self.normalized_objective(s, ta, tb, e)?;
        let pre_norm_gradient = extra.is_some().then(|| dh.clone());
        // tanh, then the three Dense layers.
        dh.iter_mut().zip(&h).for_each(|(g, t)| *g *= 1.0 - t * t);
        let layer3 = dense_backward(&a2, n, k3, &dh);
        let mut dz2 = layer3.input;
        scale_by(&mut dz2, &relu2);
        let layer2 = dense_backward(&a1, n, k2, &dz2);
        let mut dz1 = layer2.input;
        scale_by(&mut dz1, &relu1);
        let layer1 = dense_backward(&y, n, k1, &dz1);
        let mut dy = layer1.input;
        // BatchNorm's affine part: y = x̂·γ + β.
        let dbeta = column_sums(&dy, f);
        dy.iter_mut().zip(&xhat).for_each(|(g, v)| *g *= v);
        let dgamma = column_sums(&dy, f);

        Ok(StepOutput {
            loss,
            gradients: vec![
                dgamma,
                dbeta,
                layer1.kernel,
                layer1.bias,
                layer2.kernel,
                layer2.bias,
                layer3.kernel,
                layer3.bias,
            ],
            batch_mean: mean,
            batch_variance: variance,
            pre_norm_gradient,
        })
    }

    /// L2 normalisation of `s` (`[2B, E]`, clamping the squared norm as `model::l2_normalize`
    /// does), the objective, and the gradient back at `s`.
    #[inline(always)]
    fn normalized_objective(
        &self,
        s: &[f32],
        ta: &[u32],
        tb: &[u32],
        e: usize,
    ) -> candle_core::Result<(f32, Vec<f32>)> {
        let sq_norms = row_dots(s, s, e);
        let norms: Vec<f32> = sq_norms.iter().map(|v| v.max(1e-24).sqrt()).collect();
        let mut z = s.to_vec();
        for (row, nrm) in z.chunks_exact_mut(e).zip(&norms) {
            row.iter_mut().for_each(|v| *v /= nrm);
        }

        // The objective and its gradient with respect to z.
        let (loss, dz) = self.objective(&z, ta, tb, e)?;

        // Backward through L2 normalisation: ds = (dz − z·(dz·z)) / ‖s‖ (only dz/‖s‖ where clamped).
        let dots = row_dots(&dz, &z, e);
        let mut ds = dz;
        for (((g, zr), (&dot, &nrm)), &sq) in
            ds.chunks_exact_mut(e).zip(z.chunks_exact(e)).zip(dots.iter().zip(&norms)).zip(&sq_norms)
        {
            let dot = if sq > 1e-24 { dot } else { 0.0 };
            g.iter_mut().zip(zr).for_each(|(g, z)| *g = (*g - z * dot) / nrm);
        }
        Ok((loss, ds))
    }

    /// The loss of normalised embeddings `z` (`[2B, E]`, anchors first) and its gradient.
    #[inline(always)]
    fn objective(&self, z: &[f32], ta: &[u32], tb: &[u32], e: usize) -> candle_core::Result<(f32, Vec<f32>)> {
        let b = ta.len();
        let (za, zb) = z.split_at(b * e);
        let mut dz = vec![0.0f32; z.len()];
        let mut loss = match self.loss.kind {
            LossKind::Cosine => {
                // −mean_i(a_i·b_i): d/da_i = −b_i / B, d/db_i = −a_i / B.
                let (dza, dzb) = dz.split_at_mut(b * e);
                dza.iter_mut().zip(zb).for_each(|(g, v)| *g = -v / b as f32);
                dzb.iter_mut().zip(za).for_each(|(g, v)| *g = -v / b as f32);
                -row_dots(za, zb, e).iter().sum::<f32>() / b as f32
            }
            LossKind::Contrastive => {
                let inv_tau = (1.0 / self.loss.temperature) as f32;
                // The step's two [B, B] buffers, allocated fallibly: a batch too large for memory
                // fails the attempt with a message instead of aborting the process.
                let square = |what| crate::training::host::try_zeroed(b * b, what).map_err(candle_core::Error::Msg);
                let mut logits = square("the [B, B] logits")?;
                let mut dl = square("the [B, B] logit gradient")?;
                matmul(&mut logits, Mat::new(za, b, e), Mat::new(zb, b, e).t(), inv_tau, false);
                let pick = |ids: &[u32]| self.logq.as_ref().map(|lq| ids.iter().map(|&t| lq[t as usize]).collect());
                let op = SymmetricDiagonalCe::new(ta.to_vec(), tb.to_vec(), pick(ta), pick(tb));
                let loss = op.loss_and_gradient(&logits, b, 0.5 / b as f32, &mut dl);
                drop(logits);
                let (dza, dzb) = dz.split_at_mut(b * e);
                matmul(dza, Mat::new(&dl, b, b), Mat::new(zb, b, e), inv_tau, false);
                matmul(dzb, Mat::new(&dl, b, b).t(), Mat::new(za, b, e), inv_tau, false);
                loss
            }
        };
        let weight = self.loss.centering_weight as f32;
        if weight > 0.0 && self.loss.kind == LossKind::Contrastive {
            // w·‖mean_i z_i‖²: d/dz_i = 2w·mean / n.
            let n = z.len() / e;
            let mean: Vec<f32> = column_sums(z, e).iter().map(|s| s / n as f32).collect();
            loss += weight * mean.iter().map(|m| m * m).sum::<f32>();
            for row in dz.chunks_exact_mut(e) {
                row.iter_mut().zip(&mean).for_each(|(g, m)| *g += 2.0 * weight * m / n as f32);
            }
        }
        Ok((loss, dz))
    }
}

/// A batch needs at least one pair, each with both sides.
fn check_pairs(ta: &[u32], tb: &[u32]) -> candle_core::Result<()> {
    if ta.len() != tb.len() || ta.is_empty() {
        candle_core::bail!(
            "{} anchors for {} partners: a batch needs at least one pair, each with both",
            ta.len(),
            tb.len()
        );
    }
    Ok(())
}

/// `x·kernel + bias` for `rows` rows of `x` (a Dense layer before its activation).
#[inline(always)]
fn dense(x: &[f32], rows: usize, kernel: &[f32], bias: &[f32]) -> Vec<f32> {
    let (outputs, inputs) = (bias.len(), kernel.len() / bias.len());
    let mut out = repeat_rows(bias, rows);
    matmul(&mut out, Mat::new(x, rows, inputs), Mat::new(kernel, inputs, outputs), 1.0, true);
    out
}

/// A Dense layer's gradients given `dz`, the gradient at its output before the activation.
struct DenseGradients {
    kernel: Vec<f32>,
    bias: Vec<f32>,
    /// At the layer's input `x`.
    input: Vec<f32>,
}

/// The backward pass of [`dense`]: `xᵀ·dz`, the column sums of `dz`, and `dz·kernelᵀ`.
#[inline(always)]
fn dense_backward(x: &[f32], rows: usize, kernel: &[f32], dz: &[f32]) -> DenseGradients {
    let outputs = dz.len() / rows;
    let inputs = kernel.len() / outputs;
    let mut kernel_grad = vec![0.0; inputs * outputs];
    matmul(&mut kernel_grad, Mat::new(x, rows, inputs).t(), Mat::new(dz, rows, outputs), 1.0, false);
    let mut input = vec![0.0; rows * inputs];
    matmul(&mut input, Mat::new(dz, rows, outputs), Mat::new(kernel, inputs, outputs).t(), 1.0, false);
    DenseGradients { kernel: kernel_grad, bias: column_sums(dz, outputs), input }
}

#[cfg(test)]
mod tests;
