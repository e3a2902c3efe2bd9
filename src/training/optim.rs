//! Adam with Keras' exact update, and state that can be checkpointed.
//!
//! candle-nn's `AdamW` keeps its moments private, so a resumed run could not restore them; and it
//! applies epsilon to the bias-corrected second moment, while Keras (whose update the platform's
//! model was tuned with) uses
//!
//! ```text
//! m ← β₁m + (1−β₁)g        v ← β₂v + (1−β₂)g²
//! α = lr·√(1−β₂ᵗ)/(1−β₁ᵗ)   θ ← θ − α·m/(√v + ε)
//! ```
//!
//! with β₁ = 0.9, β₂ = 0.999, ε = 1e-7 and no weight decay.

use candle_core::{Tensor, Var, backprop::GradStore};

use crate::training::host::host_values;

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPSILON: f64 = 1e-7;

/// Adam over a fixed list of variables.
pub struct Adam {
    learning_rate: f64,
    vars: Vec<Var>,
    first_moment: Vec<Tensor>,
    second_moment: Vec<Tensor>,
    /// Number of updates applied so far (t in the bias correction).
    step: u64,
}

/// The optimiser's state, as checkpointed: moments in variable order, and the step count.
pub struct AdamState {
    pub first_moment: Vec<Tensor>,
    pub second_moment: Vec<Tensor>,
    pub step: u64,
}

impl Adam {
    pub fn new(vars: Vec<Var>, learning_rate: f64) -> candle_core::Result<Self> {
        let zeros = |v: &Var| v.as_detached_tensor().zeros_like();
        let first_moment = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let second_moment = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(Self { learning_rate, vars, first_moment, second_moment, step: 0 })
    }

    /// One update from the gradients of a backward pass. A variable without a gradient (unused in
    /// the loss) is left alone, as Keras does.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let alpha = self.learning_rate * (1.0 - BETA2.powi(t)).sqrt() / (1.0 - BETA1.powi(t));
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            // Gradients are built from ops on the variables, so they carry the step's whole graph;
            // the moments would chain every step's graph to the next (a leak that slowed each epoch).
            let g = g.detach();
            let m = ((&self.first_moment[i] * BETA1)? + (&g * (1.0 - BETA1))?)?;
            let v = ((&self.second_moment[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let update = (m.clone() * alpha)?.div(&(v.sqrt()? + EPSILON)?)?;
            var.set(&var.as_detached_tensor().sub(&update)?)?;
            self.first_moment[i] = m;
            self.second_moment[i] = v;
        }
        Ok(())
    }

    /// The same update as [`Self::step`] from gradients computed outside candle (the fused CPU
    /// step, f32, in variable order): one pass per variable instead of ten tensor ops.
    pub fn step_host(&mut self, grads: &[Vec<f32>]) -> candle_core::Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!("{} gradients for {} variables", grads.len(), self.vars.len());
        }
        self.step += 1;
        let t = self.step as i32;
        let alpha = (self.learning_rate * (1.0 - BETA2.powi(t)).sqrt() / (1.0 - BETA1.powi(t))) as f32;
        // The constants rounded to f32 as candle rounds them in `Self::step` (1 − β in f64, then f32).
        let (b1, b2, eps) = (BETA1 as f32, BETA2 as f32, EPSILON as f32);
        let (c1, c2) = ((1.0 - BETA1) as f32, (1.0 - BETA2) as f32);
        for (i, (var, g)) in self.vars.iter().zip(grads).enumerate() {
            let mut theta = host_values(var.as_tensor())?;
            let mut m = host_values(&self.first_moment[i])?;
            let mut v = host_values(&self.second_moment[i])?;
            if g.len() != theta.len() {
                candle_core::bail!("gradient of {} values for a variable of {}", g.len(), theta.len());
            }
            for (((theta, m), v), &g) in theta.iter_mut().zip(&mut m).zip(&mut v).zip(g) {
                *m = b1 * *m + c1 * g;
                *v = b2 * *v + c2 * (g * g);
                *theta -= (*m * alpha) / (v.sqrt() + eps);
            }
            let (shape, device) = (var.shape().clone(), var.device().clone());
            var.set(&Tensor::from_vec(theta, shape.clone(), &device)?)?;
            self.first_moment[i] = Tensor::from_vec(m, shape.clone(), &device)?;
            self.second_moment[i] = Tensor::from_vec(v, shape, &device)?;
        }
        Ok(())
    }

    pub fn state(&self) -> AdamState {
        AdamState {
            first_moment: self.first_moment.clone(),
            second_moment: self.second_moment.clone(),
            step: self.step,
        }
    }

    /// Restores a checkpointed state; shapes must match the variables.
    pub fn restore(&mut self, state: AdamState) -> anyhow::Result<()> {
        anyhow::ensure!(
            state.first_moment.len() == self.vars.len() && state.second_moment.len() == self.vars.len(),
            "optimiser state has the wrong number of tensors"
        );
        for (i, var) in self.vars.iter().enumerate() {
            let (device, dtype) = (var.device(), var.dtype());
            for t in [&state.first_moment[i], &state.second_moment[i]] {
                anyhow::ensure!(
                    t.dims() == var.dims(),
                    "optimiser state shape {:?} does not match variable {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            self.first_moment[i] = state.first_moment[i].to_device(device)?.to_dtype(dtype)?;
            self.second_moment[i] = state.second_moment[i].to_device(device)?.to_dtype(dtype)?;
        }
        self.step = state.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn first_steps_match_keras_reference() {
        // The reference is Keras 3's `Adam.update_step` written out in f64 (keras/src/optimizers/
        // adam.py: alpha = lr·sqrt(1−β₂ᵗ)/(1−β₁ᵗ); x −= alpha·m/(sqrt(v)+ε)), on loss = Σx², x₀ = [1, −2].
        let x = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![x.clone()], 0.1).unwrap();
        let (mut m, mut v, mut xs) = ([0.0f64; 2], [0.0f64; 2], [1.0f64, -2.0]);
        for t in 1..=3 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let alpha = 0.1 * (1.0 - BETA2.powi(t)).sqrt() / (1.0 - BETA1.powi(t));
            for i in 0..2 {
                let g = 2.0 * xs[i];
                m[i] = BETA1 * m[i] + (1.0 - BETA1) * g;
                v[i] = BETA2 * v[i] + (1.0 - BETA2) * g * g;
                xs[i] -= alpha * m[i] / (v[i].sqrt() + EPSILON);
            }
            let got = x.as_tensor().to_vec1::<f64>().unwrap();
            for i in 0..2 {
                assert!((got[i] - xs[i]).abs() < 1e-12, "step {t}: {got:?} vs {xs:?}");
            }
        }
        // After three steps each coordinate moved by about 3·lr toward 0.
        assert!(xs[0] < 1.0 - 0.25 && xs[1] > -2.0 + 0.25);
        // The moments must not keep the steps' graphs alive (that leak slowed every epoch).
        assert!(opt.first_moment.iter().chain(&opt.second_moment).all(|m| !m.track_op()));
    }

    #[test]
    fn state_round_trips() {
        let x = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let mut a = Adam::new(vec![x.clone()], 0.01).unwrap();
        let loss = (x.as_tensor() - 1.0).unwrap().sqr().unwrap().sum_all().unwrap();
        a.step(&loss.backward().unwrap()).unwrap();
        let y = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let mut b = Adam::new(vec![y], 0.01).unwrap();
        b.restore(a.state()).unwrap();
        assert_eq!(b.step, 1);
        assert_eq!(b.first_moment[0].to_vec1::<f32>().unwrap(), a.first_moment[0].to_vec1::<f32>().unwrap());
        let bad = AdamState { first_moment: vec![], second_moment: vec![], step: 0 };
        assert!(b.restore(bad).is_err());
    }
}
