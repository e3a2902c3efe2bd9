//! What the training loop does differently when its tensors live on a device (a GPU), so that
//! the device is not left waiting for the host between steps:
//! - each epoch's pair indices are uploaded once, and each step takes a slice of them;
//! - the content encoder's dropout masks are drawn on the device ([`DropoutMasks::draw_on_device`])
//!   instead of on the host and uploaded (12.6 MB a step at batch 8192);
//! - the loss is summed on the device and read back every [`LOSS_READBACK_STEPS`] steps (and before
//!   a stop or the end of the epoch), not after every step: each read waits for the device to drain.
//!
//! On the CPU none of this applies: the fused step (or the autograd reference path) reads each
//! step's loss and draws masks from the run's seeded host generator, which is what makes a CPU
//! run reproducible bit for bit, resumed or not.
//!
//! **Reproducibility on a device.** The device's generator is reseeded at the start of every epoch
//! from the run's seed and the epoch number, and a run resumed inside an epoch draws (and drops) the
//! masks of the steps already trained before it continues, so a resumed run draws the masks the
//! uninterrupted one drew. What that buys depends on the device's kernels staying deterministic
//! (cuRAND's default generator is, for the same launches; floating-point reductions may not be),
//! and it is not bit-identical to a CPU run of the same seed (other masks, other rounding). None of
//! it has been run on a GPU yet: no device was lent to the session that wrote it (BENCHMARKS.md).

use candle_core::{Device, Tensor};

use crate::training::model::{DropoutMasks, EncoderConfig};

/// Steps between two reads of the summed loss on a device.
pub const LOSS_READBACK_STEPS: usize = 64;

/// How a trainer runs its steps beyond the choice of fused or autograd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePath {
    /// Draw dropout masks on the device (a GPU) rather than from the run's host generator.
    pub masks_on_device: bool,
    /// Read the summed loss back every this many steps (1: every step, the CPU's way).
    pub loss_readback_steps: usize,
    /// Upload each epoch's pair indices once (tensors resident on the device).
    pub resident_pairs: bool,
}

impl DevicePath {
    /// The path for `device`: everything on a GPU, nothing on the CPU.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() { Self::host() } else { Self::device() }
    }

    /// The CPU's way: host masks, a read every step, indices uploaded per step.
    pub fn host() -> Self {
        Self { masks_on_device: false, loss_readback_steps: 1, resident_pairs: false }
    }

    /// A device's way: device masks, deferred reads, resident indices.
    pub fn device() -> Self {
        Self { masks_on_device: true, loss_readback_steps: LOSS_READBACK_STEPS, resident_pairs: true }
    }
}

/// Seeds `device`'s generator for `epoch` (0-based) of a run seeded `seed`. The CPU's generator
/// cannot be seeded (candle refuses), so on the CPU — the tests that drive the device path there —
/// masks drawn on the device are not reproducible, and this does nothing.
pub fn seed_epoch(device: &Device, seed: u64, epoch: usize) -> candle_core::Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    device.set_seed(seed ^ 0xD1CE_5EED_0000_0000 ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Draws and drops the masks of `steps` batches of `rows_of(step)` rows (`None`: a step that
/// trained nothing), so that a run resumed inside an epoch continues the device generator's stream
/// where the uninterrupted run was.
pub fn skip_masks(
    config: &EncoderConfig,
    device: &Device,
    steps: usize,
    rows_of: impl Fn(usize) -> Option<usize>,
) -> candle_core::Result<()> {
    for step in 0..steps {
        if let Some(rows) = rows_of(step) {
            DropoutMasks::draw_on_device(config, rows, device)?;
        }
    }
    Ok(())
}

/// Step losses summed where they were computed, read back every `every` steps into a host sum.
pub struct PendingLoss {
    every: usize,
    sum: Option<Tensor>,
    steps: usize,
}

impl PendingLoss {
    pub fn new(every: usize) -> Self {
        Self { every: every.max(1), sum: None, steps: 0 }
    }

    /// Adds one step's scalar loss (detached: a kept graph would hold every activation of the step);
    /// reads the sum into `host_sum` when `every` steps are pending.
    pub fn add(&mut self, loss: &Tensor, host_sum: &mut f64) -> candle_core::Result<()> {
        let loss = loss.detach();
        self.sum = Some(match self.sum.take() {
            Some(sum) => (sum + loss)?,
            None => loss,
        });
        self.steps += 1;
        if self.steps >= self.every {
            self.flush(host_sum)?;
        }
        Ok(())
    }

    /// Reads whatever is pending into `host_sum` (one wait for the device).
    pub fn flush(&mut self, host_sum: &mut f64) -> candle_core::Result<()> {
        if let Some(sum) = self.sum.take() {
            *host_sum += sum.to_scalar::<f32>()? as f64;
        }
        self.steps = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_drawn_on_the_device_drop_at_the_rate_and_scale_what_they_keep() {
        let config = EncoderConfig { embedding_size: 16, dropout: 0.3 };
        let rows = 4096;
        let masks = DropoutMasks::draw_on_device(&config, rows, &Device::Cpu).unwrap();
        let (hidden1, hidden2) = masks.to_vecs();
        let (hidden1, hidden2) = (hidden1.unwrap(), hidden2.unwrap());
        assert_eq!((hidden1.len(), hidden2.len()), (rows * 32, rows * 16));
        let scale = 1.0 / 0.7f32;
        for values in [&hidden1, &hidden2] {
            assert!(values.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-6), "only 0 and 1/(1-p)");
            let kept = values.iter().filter(|&&v| v != 0.0).count() as f64 / values.len() as f64;
            // 65,536+ Bernoulli(0.7) draws: one standard error is under 0.0018.
            assert!((kept - 0.7).abs() < 0.01, "kept share {kept}");
        }
        let none = DropoutMasks::draw_on_device(&EncoderConfig { dropout: 0.0, ..config }, rows, &Device::Cpu);
        assert_eq!(none.unwrap().to_vecs(), (None, None), "no dropout, no masks");
    }

    #[test]
    fn pending_losses_reach_the_host_sum_every_n_steps_and_at_a_flush() {
        let losses = [0.5f32, 1.25, 2.0, 0.75, 3.5];
        let mut pending = PendingLoss::new(2);
        let mut host = 0.0;
        let mut seen = Vec::new();
        for l in losses {
            pending.add(&Tensor::new(l, &Device::Cpu).unwrap(), &mut host).unwrap();
            seen.push(host);
        }
        assert_eq!(seen, vec![0.0, 1.75, 1.75, 4.5, 4.5], "read at every second step only");
        pending.flush(&mut host).unwrap();
        assert_eq!(host, 8.0, "the flush reads the last, odd step");
        pending.flush(&mut host).unwrap();
        assert_eq!(host, 8.0, "nothing is read twice");
    }
}
