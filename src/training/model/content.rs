//! The content-based kind: the platform's track encoder, in candle:
//!
//! `Input(11) → BatchNorm → Dense(2E, relu) → Dropout(p) → Dense(E, relu) → Dropout(p) → Dense(E, tanh)`
//!
//! Parameters are stored in Keras' layouts so that export is a copy: Dense kernels are `[in, out]`
//! (`y = x·K + b`), and BatchNorm keeps `gamma`, `beta`, `moving_mean`, `moving_variance` with Keras'
//! semantics (momentum 0.99, epsilon 1e-3, biased batch variance, moving statistics updated as
//! `m ← m·momentum + batch·(1 − momentum)`). Parameter names (the keys of every safetensors file this
//! crate writes) are the Keras H5 layer keys: see [`PARAM_NAMES`].
//!
//! Randomness (initialisation and dropout masks) comes from the caller's seeded generator, never
//! from candle's own unseeded CPU generator, so that a seed fixes the whole run.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::features::NUM_FEATURES;

/// Keras' BatchNormalization defaults, which the exported model must reproduce.
pub const BN_MOMENTUM: f64 = 0.99;
pub const BN_EPSILON: f64 = 1e-3;

/// Names of the trainable parameters, in a fixed order (the optimiser's order).
pub const TRAINABLE_NAMES: [&str; 8] = [
    "batch_normalization.gamma",
    "batch_normalization.beta",
    "dense.kernel",
    "dense.bias",
    "dense_1.kernel",
    "dense_1.bias",
    "dense_2.kernel",
    "dense_2.bias",
];
/// Non-trainable state: BatchNorm's moving statistics.
pub const MOVING_NAMES: [&str; 2] = ["batch_normalization.moving_mean", "batch_normalization.moving_variance"];
/// Every tensor of the model, trainable first.
pub const PARAM_NAMES: [&str; 10] = [
    TRAINABLE_NAMES[0],
    TRAINABLE_NAMES[1],
    TRAINABLE_NAMES[2],
    TRAINABLE_NAMES[3],
    TRAINABLE_NAMES[4],
    TRAINABLE_NAMES[5],
    TRAINABLE_NAMES[6],
    TRAINABLE_NAMES[7],
    MOVING_NAMES[0],
    MOVING_NAMES[1],
];

/// Shape hyperparameters of the encoder.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncoderConfig {
    /// E: the output dimension. The first hidden layer has 2E units.
    pub embedding_size: usize,
    /// Dropout rate after each hidden layer (0.2 in the platform's model).
    pub dropout: f32,
}

impl EncoderConfig {
    /// `(name, shape)` of every tensor, in [`PARAM_NAMES`] order.
    pub fn shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let e = self.embedding_size;
        let f = NUM_FEATURES;
        let shapes = [
            vec![f],
            vec![f],
            vec![f, 2 * e],
            vec![2 * e],
            vec![2 * e, e],
            vec![e],
            vec![e, e],
            vec![e],
            vec![f],
            vec![f],
        ];
        PARAM_NAMES.iter().copied().zip(shapes).collect()
    }

    /// Trainable parameter count.
    pub fn num_trainable(&self) -> usize {
        self.shapes().iter().take(TRAINABLE_NAMES.len()).map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// Dropout masks for one forward pass: `0` or `1/(1−p)` per activation (inverted dropout, as Keras).
pub struct DropoutMasks {
    hidden1: Option<Tensor>,
    hidden2: Option<Tensor>,
}

impl DropoutMasks {
    /// No dropout (rate 0, or a deterministic check).
    pub fn none() -> Self {
        Self { hidden1: None, hidden2: None }
    }

    /// Draws masks for `rows` inputs from `rng`.
    pub fn sample(
        config: &EncoderConfig,
        rows: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        HostDropout::sample(config, rows, rng).to_tensors(config, rows, device, dtype)
    }

    /// Draws masks for `rows` inputs with `device`'s own generator (cuRAND on a GPU), so that nothing
    /// crosses the bus: host masks at batch 8192 are 12.6 MB a step. The same law as
    /// [`HostDropout::sample`] (drop with probability p, keep as `1/(1−p)`), not the same draws; a
    /// GPU run is seeded through the device (see `trainer::device`).
    /// f32, as the host masks the step uploads.
    pub fn draw_on_device(config: &EncoderConfig, rows: usize, device: &Device) -> candle_core::Result<Self> {
        if config.dropout <= 0.0 {
            return Ok(Self::none());
        }
        let p = config.dropout as f64;
        let draw = |cols: usize| -> candle_core::Result<Tensor> {
            let kept = Tensor::rand(0f32, 1f32, (rows, cols), device)?.ge(p)?;
            kept.to_dtype(DType::F32)?.affine(1.0 / (1.0 - p), 0.0)
        };
        let e = config.embedding_size;
        Ok(Self { hidden1: Some(draw(2 * e)?), hidden2: Some(draw(e)?) })
    }

    /// The masks' values, row-major, for tests.
    #[cfg(test)]
    pub(crate) fn to_vecs(&self) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let values = |t: &Option<Tensor>| t.as_ref().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        (values(&self.hidden1), values(&self.hidden2))
    }
}

/// Dropout masks as plain values (`[rows, 2E]` and `[rows, E]`, row-major): what the fused CPU step
/// reads, and what [`DropoutMasks`] is made from, so both paths draw the same masks from a seed.
pub struct HostDropout {
    pub hidden1: Option<Vec<f32>>,
    pub hidden2: Option<Vec<f32>>,
}

impl HostDropout {
    /// No dropout: a kind without the content encoder, or a deterministic check.
    pub fn none() -> Self {
        Self { hidden1: None, hidden2: None }
    }

    /// Draws masks for `rows` inputs from `rng`: `0` with probability p, else `1/(1−p)`.
    pub fn sample(config: &EncoderConfig, rows: usize, rng: &mut ChaCha8Rng) -> Self {
        if config.dropout <= 0.0 {
            return Self { hidden1: None, hidden2: None };
        }
        let p = config.dropout;
        let scale = 1.0 / (1.0 - p);
        // rand's f32 draw is `(u >> 8)·2⁻²⁴` of one u32, so `draw < p` is `(u >> 8) < p·2²⁴`, exactly;
        // words filled in bulk are the same u32s one-by-one draws take (a test checks), and the
        // comparison loop vectorises.
        let threshold = p * 16_777_216.0;
        let mut draw = |cols: usize| -> Vec<f32> {
            let mut words = vec![0u32; rows * cols];
            rng.fill(&mut words[..]);
            // Selects, not branches: which units drop is random, so a branch would mispredict often.
            let (threshold, scale) = (threshold, scale);
            words.iter().map(|&u| if ((u >> 8) as f32) < threshold { 0.0 } else { scale }).collect::<Vec<f32>>()
        };
        let e = config.embedding_size;
        let hidden1 = Some(draw(2 * e));
        Self { hidden1, hidden2: Some(draw(e)) }
    }

    pub fn to_tensors(
        &self,
        config: &EncoderConfig,
        rows: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<DropoutMasks> {
        let e = config.embedding_size;
        let tensor = |values: &Option<Vec<f32>>, cols: usize| {
            values.as_ref().map(|v| Tensor::from_vec(v.clone(), (rows, cols), device)?.to_dtype(dtype)).transpose()
        };
        Ok(DropoutMasks { hidden1: tensor(&self.hidden1, 2 * e)?, hidden2: tensor(&self.hidden2, e)? })
    }
}

/// BatchNorm's batch mean and (biased) variance from a training forward pass, applied to the moving
/// statistics after the optimiser step.
pub struct BatchStats {
    mean: Tensor,
    variance: Tensor,
}

impl BatchStats {
    /// `(mean, variance)` as f32 values, for comparisons in tests.
    #[cfg(test)]
    pub(crate) fn to_vecs(&self) -> (Vec<f32>, Vec<f32>) {
        let values = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        (values(&self.mean), values(&self.variance))
    }
}

/// The encoder's variables. Trainable ones go to the optimiser; moving statistics are updated in
/// place by [`Encoder::update_moving_stats`].
pub struct Encoder {
    pub config: EncoderConfig,
    vars: Vec<Var>,
    device: Device,
    dtype: DType,
}

impl Encoder {
    /// Keras' initialisation: Glorot-uniform kernels, zero biases, gamma 1, beta 0, moving mean 0,
    /// moving variance 1.
    pub fn new(
        config: EncoderConfig,
        rng: &mut ChaCha8Rng,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let mut vars = Vec::with_capacity(PARAM_NAMES.len());
        for (name, shape) in config.shapes() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with(".kernel") {
                let limit = (6.0 / (shape[0] + shape[1]) as f64).sqrt() as f32;
                (0..n).map(|_| rng.random_range(-limit..limit)).collect()
            } else if name.ends_with(".gamma") || name.ends_with(".moving_variance") {
                vec![1.0; n]
            } else {
                vec![0.0; n]
            };
            vars.push(Var::from_tensor(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)?);
        }
        Ok(Self { config, vars, device: device.clone(), dtype })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The trainable variables, in [`TRAINABLE_NAMES`] order.
    pub fn trainable(&self) -> &[Var] {
        &self.vars[..TRAINABLE_NAMES.len()]
    }

    /// The model's tensors as tracked variables (training: gradients flow to them).
    fn tracked(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().clone()).collect()
    }

    /// The model's tensors detached from autograd (inference: outputs keep no graph alive; with
    /// tracked weights, every chunk of a catalogue-wide embedding pass held all its intermediates).
    fn detached(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_detached_tensor()).collect()
    }

    /// Training-mode forward pass: BatchNorm on batch statistics, dropout with `masks`. Returns the
    /// tanh outputs `[rows, E]` and the batch statistics for [`Self::update_moving_stats`].
    pub fn forward_train(&self, x: &Tensor, masks: &DropoutMasks) -> candle_core::Result<(Tensor, BatchStats)> {
        let w = self.tracked();
        let mean = x.mean_keepdim(0)?;
        let centred = x.broadcast_sub(&mean)?;
        let variance = centred.sqr()?.mean_keepdim(0)?;
        let inv_std = (variance.clone() + BN_EPSILON)?.sqrt()?.recip()?;
        let normalised = centred.broadcast_mul(&inv_std)?.broadcast_mul(&w[0])?.broadcast_add(&w[1])?;
        let out = dense_stack(&w, &normalised, masks)?;
        Ok((out, BatchStats { mean: mean.squeeze(0)?.detach(), variance: variance.squeeze(0)?.detach() }))
    }

    /// Inference-mode forward pass (moving statistics, no dropout): what Keras' `predict` computes.
    pub fn forward_eval(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.detached();
        let scale = (&w[9] + BN_EPSILON)?.sqrt()?.recip()?.mul(&w[0])?;
        let shift = (&w[1] - w[8].mul(&scale)?)?;
        let normalised = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
        dense_stack(&w, &normalised, &DropoutMasks::none())
    }

    /// Keras' moving-average update of BatchNorm's statistics.
    pub fn update_moving_stats(&self, stats: &BatchStats) -> candle_core::Result<()> {
        let mean = (self.vars[8].as_detached_tensor().affine(BN_MOMENTUM, 0.0)?
            + stats.mean.affine(1.0 - BN_MOMENTUM, 0.0)?)?;
        let var = (self.vars[9].as_detached_tensor().affine(BN_MOMENTUM, 0.0)?
            + stats.variance.affine(1.0 - BN_MOMENTUM, 0.0)?)?;
        self.vars[8].set(&mean)?;
        self.vars[9].set(&var)
    }

    /// [`Self::update_moving_stats`] from batch statistics computed outside candle (the fused CPU
    /// step, f32): the same arithmetic, without a round of tensor ops.
    pub fn update_moving_stats_host(&self, mean: &[f32], variance: &[f32]) -> candle_core::Result<()> {
        let (keep, take) = (BN_MOMENTUM as f32, (1.0 - BN_MOMENTUM) as f32);
        for (var, batch) in self.vars[8..10].iter().zip([mean, variance]) {
            let moving = crate::training::host::host_values(var.as_tensor())?;
            if moving.len() != batch.len() {
                candle_core::bail!("{} batch statistics for {} moving ones", batch.len(), moving.len());
            }
            let updated: Vec<f32> = moving.iter().zip(batch).map(|(m, b)| m * keep + b * take).collect();
            var.set(&Tensor::from_vec(updated, batch.len(), &self.device)?)?;
        }
        Ok(())
    }

    /// L2-normalised inference embeddings of `x` (`[rows, 11]` standardised features), computed in
    /// chunks so that a large catalogue never builds one huge activation tensor.
    pub fn embed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.chunked(x, |chunk| l2_normalize(&self.forward_eval(chunk)?))
    }

    /// [`Self::forward_eval`] of `x` in chunks, before normalisation (the hybrid adds its table
    /// terms to it).
    pub fn forward_eval_chunked(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.chunked(x, |chunk| self.forward_eval(chunk))
    }

    fn chunked(&self, x: &Tensor, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        const CHUNK: usize = 8192;
        let rows = x.dim(0)?;
        let mut parts = Vec::with_capacity(rows.div_ceil(CHUNK));
        for start in (0..rows).step_by(CHUNK) {
            let len = CHUNK.min(rows - start);
            parts.push(f(&x.narrow(0, start, len)?)?);
        }
        if parts.is_empty() {
            return Tensor::zeros((0, self.config.embedding_size), self.dtype, &self.device);
        }
        Tensor::cat(&parts, 0)
    }

    /// Every tensor by name (detached copies' storage is shared, so this is cheap).
    pub fn named_tensors(&self) -> Vec<(&'static str, Tensor)> {
        PARAM_NAMES.iter().copied().zip(self.vars.iter().map(|v| v.as_detached_tensor())).collect()
    }

    /// Overwrites every tensor from `tensors` (a checkpoint or weights file). Names and shapes must
    /// match this encoder's configuration exactly.
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        for ((name, shape), var) in self.config.shapes().into_iter().zip(&self.vars) {
            let t = tensors.get(name).ok_or_else(|| anyhow::anyhow!("tensor {name} missing"))?;
            anyhow::ensure!(
                t.dims() == shape.as_slice(),
                "tensor {name} has shape {:?}, expected {:?}",
                t.dims(),
                shape
            );
            var.set(&t.to_device(&self.device)?.to_dtype(self.dtype)?)?;
        }
        Ok(())
    }
}

/// The three Dense layers (with dropout after the hidden ones) given the tensors in
/// [`PARAM_NAMES`] order.
fn dense_stack(w: &[Tensor], x: &Tensor, masks: &DropoutMasks) -> candle_core::Result<Tensor> {
    let mut h = x.matmul(&w[2])?.broadcast_add(&w[3])?.relu()?;
    if let Some(m) = &masks.hidden1 {
        h = h.mul(m)?;
    }
    let mut h = h.matmul(&w[4])?.broadcast_add(&w[5])?.relu()?;
    if let Some(m) = &masks.hidden2 {
        h = h.mul(m)?;
    }
    h.matmul(&w[6])?.broadcast_add(&w[7])?.tanh()
}

/// Row-wise L2 normalisation, `x / sqrt(max(Σx², 1e-24))`: Keras' UnitNormalization
/// (`x · min(rsqrt(Σx²), 1e12)`). Clamping the *squared* norm before the square root matters for
/// training: an all-zero row (every ReLU dead) would otherwise give `0/0` in sqrt's gradient.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.maximum(1e-24)?.sqrt()?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn tiny() -> EncoderConfig {
        EncoderConfig { embedding_size: 2, dropout: 0.0 }
    }

    /// Sets every parameter to a hand-chosen value so the forward pass can be computed by hand.
    fn hand_weights(enc: &Encoder) {
        let e = 2;
        let mut t = HashMap::new();
        let mut put = |name: &str, values: Vec<f64>, shape: &[usize]| {
            t.insert(name.to_string(), Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
        };
        let f = NUM_FEATURES;
        put("batch_normalization.gamma", vec![2.0; f], &[f]);
        put("batch_normalization.beta", vec![0.5; f], &[f]);
        put("batch_normalization.moving_mean", vec![1.0; f], &[f]);
        put("batch_normalization.moving_variance", vec![3.999; f], &[f]); // +eps = 4 → 1/sqrt = 0.5
        // dense: [11, 4]; column j of the kernel is 0.1·(j+1) on feature 0 and 0 elsewhere.
        let mut k = vec![0.0; f * 2 * e];
        for (j, kj) in k.iter_mut().take(2 * e).enumerate() {
            *kj = 0.1 * (j + 1) as f64;
        }
        put("dense.kernel", k, &[f, 2 * e]);
        put("dense.bias", vec![0.0, -1.0, 0.0, 0.0], &[2 * e]);
        put("dense_1.kernel", vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0], &[2 * e, e]);
        put("dense_1.bias", vec![0.1, 0.2], &[e]);
        put("dense_2.kernel", vec![1.0, 2.0, 3.0, 4.0], &[e, e]);
        put("dense_2.bias", vec![0.0, -0.5], &[e]);
        enc.load(&t).unwrap();
    }

    #[test]
    fn eval_forward_matches_hand_computation() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let enc = Encoder::new(tiny(), &mut rng, &Device::Cpu, DType::F64).unwrap();
        hand_weights(&enc);
        // x = 3 on feature 0, 0 elsewhere.
        let mut x = vec![0.0f64; NUM_FEATURES];
        x[0] = 3.0;
        let out = enc.forward_eval(&Tensor::from_vec(x, (1, NUM_FEATURES), &Device::Cpu).unwrap()).unwrap();
        // BN on feature 0: 2·(3−1)·0.5 + 0.5 = 2.5.
        // dense: z_j = 0.1(j+1)·2.5 + b_j = [0.25, 0.5−1, 0.75, 1.0] → relu [0.25, 0, 0.75, 1.0].
        // dense_1: h·K1 = [0.25 + 0.75 − 1.0, 0 + 0.75] + [0.1, 0.2] = [0.1, 0.95] → relu [0.1, 0.95].
        // dense_2: [0.1·1 + 0.95·3, 0.1·2 + 0.95·4 − 0.5] = [2.95, 3.5] → tanh.
        let expected = [2.95f64.tanh(), 3.5f64.tanh()];
        let got = out.to_vec2::<f64>().unwrap();
        for j in 0..2 {
            assert!((got[0][j] - expected[j]).abs() < 1e-12, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn train_forward_uses_biased_batch_statistics_and_keras_momentum() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let enc = Encoder::new(tiny(), &mut rng, &Device::Cpu, DType::F64).unwrap();
        // Two rows: feature values 1 and 3 → batch mean 2, biased variance 1.
        let rows: Vec<f64> = [1.0, 3.0].iter().flat_map(|&v| vec![v; NUM_FEATURES]).collect();
        let x = Tensor::from_vec(rows, (2, NUM_FEATURES), &Device::Cpu).unwrap();
        let (_, stats) = enc.forward_train(&x, &DropoutMasks::none()).unwrap();
        assert_eq!(stats.mean.to_vec1::<f64>().unwrap(), vec![2.0; NUM_FEATURES]);
        assert_eq!(stats.variance.to_vec1::<f64>().unwrap(), vec![1.0; NUM_FEATURES]);
        enc.update_moving_stats(&stats).unwrap();
        let named: HashMap<_, _> = enc.named_tensors().into_iter().collect();
        let mm = named["batch_normalization.moving_mean"].to_vec1::<f64>().unwrap();
        let mv = named["batch_normalization.moving_variance"].to_vec1::<f64>().unwrap();
        assert!((mm[0] - 0.02).abs() < 1e-12, "0·0.99 + 2·0.01, got {}", mm[0]);
        assert!((mv[0] - 1.0).abs() < 1e-12, "1·0.99 + 1·0.01, got {}", mv[0]);
    }

    #[test]
    fn initialisation_is_seeded_and_glorot_bounded() {
        let config = EncoderConfig { embedding_size: 8, dropout: 0.2 };
        let a = Encoder::new(config, &mut ChaCha8Rng::seed_from_u64(3), &Device::Cpu, DType::F32).unwrap();
        let b = Encoder::new(config, &mut ChaCha8Rng::seed_from_u64(3), &Device::Cpu, DType::F32).unwrap();
        for ((name, ta), (_, tb)) in a.named_tensors().iter().zip(b.named_tensors()) {
            assert_eq!(
                ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                tb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name}"
            );
        }
        let k = a.named_tensors()[2].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let limit = (6.0f32 / (11.0 + 16.0)).sqrt();
        assert!(k.iter().all(|v| v.abs() <= limit) && k.iter().any(|v| v.abs() > limit * 0.5));
        assert_eq!(config.num_trainable(), 22 + 11 * 16 + 16 + 16 * 8 + 8 + 8 * 8 + 8);
    }

    #[test]
    fn dropout_masks_zero_about_p_and_rescale() {
        let config = EncoderConfig { embedding_size: 64, dropout: 0.2 };
        let m =
            DropoutMasks::sample(&config, 100, &mut ChaCha8Rng::seed_from_u64(1), &Device::Cpu, DType::F32).unwrap();
        let v = m.hidden1.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let zeros = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.2).abs() < 0.02, "dropped {zeros}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.25).abs() < 1e-6));
    }

    #[test]
    fn bulk_masks_are_the_masks_of_one_draw_per_unit() {
        let config = EncoderConfig { embedding_size: 8, dropout: 0.3 };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        rng.random::<u32>(); // start off a block boundary
        let mut reference = rng.clone();
        let masks = HostDropout::sample(&config, 37, &mut rng);
        let scale = 1.0 / (1.0 - 0.3f32);
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n).map(|_| if reference.random::<f32>() < 0.3 { 0.0 } else { scale }).collect()
        };
        assert_eq!(masks.hidden1.unwrap(), draw(37 * 16));
        assert_eq!(masks.hidden2.unwrap(), draw(37 * 8));
        assert_eq!(rng.random::<u64>(), reference.random::<u64>(), "the generators must end in step");
    }

    #[test]
    fn zero_rows_normalise_to_zero_with_finite_gradients() {
        let x = Var::new(&[[0.0f32, 0.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let z = l2_normalize(x.as_tensor()).unwrap();
        assert_eq!(z.to_vec2::<f32>().unwrap(), vec![vec![0.0, 0.0], vec![0.6, 0.8]]);
        let g = z.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(g.iter().flatten().all(|v| v.is_finite()), "{g:?}");
    }

    #[test]
    fn inference_keeps_no_autograd_graph() {
        let enc = Encoder::new(tiny(), &mut ChaCha8Rng::seed_from_u64(1), &Device::Cpu, DType::F32).unwrap();
        let x = Tensor::zeros((4, NUM_FEATURES), DType::F32, &Device::Cpu).unwrap();
        assert!(!enc.forward_eval(&x).unwrap().track_op(), "inference output must not hold the graph");
        assert!(!enc.embed(&x).unwrap().track_op());
        assert!(enc.forward_train(&x, &DropoutMasks::none()).unwrap().0.track_op(), "training output must");
    }

    #[test]
    fn embeddings_are_unit_norm() {
        let config = EncoderConfig { embedding_size: 16, dropout: 0.2 };
        let enc = Encoder::new(config, &mut ChaCha8Rng::seed_from_u64(1), &Device::Cpu, DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (20_000, NUM_FEATURES), &Device::Cpu).unwrap();
        let e = enc.embed(&x).unwrap();
        assert_eq!(e.dims(), &[20_000, 16]);
        let norms = e.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
    }
}
