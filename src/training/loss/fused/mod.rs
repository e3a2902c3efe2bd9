//! The contrastive loss's two softmax cross-entropies as one CPU op, forward and backward.
//!
//! Written as separate candle ops (compare, mask, bias, log-softmax, pick the diagonal, and all of
//! it again on the transpose), the loss over a `[B, B]` logit matrix was ~40 element-wise passes,
//! each allocating a `B²` temporary: at B = 1024 that was 45 % of a training step in `binary_map`
//! and 10 % clearing fresh pages (BENCHMARKS.md). Here the matrix is read twice forward (maxima,
//! then sums of exponentials — rows and columns together, so no transpose is made) and once
//! backward, with the accidental-hit masks computed from the track ids on the fly, a vectorisable
//! `exp`, and blocks of rows on candle's thread pool. That is the op autograd uses (`CustomOp1`).
//!
//! The fused CPU training step, which always wants the loss and its gradient together, calls
//! [`SymmetricDiagonalCe::loss_and_gradient`] (`shared_shift`): two reads in all, falling back to
//! the passes here when its shared shift does not hold.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::training::cpu_step::kernels::fast_exp;

mod shared_shift;

/// Rows per parallel block: a block's column accumulators are merged once, not per row.
const BLOCK: usize = 64;
/// Independent accumulators in a row's reductions, so that they vectorise.
const LANES: usize = 8;

/// `½ (mean_i CE(row i) + mean_j CE(column j))` of a `[B, B]` f32 logit matrix `L[i, j] = a_i·b_j/τ`.
///
/// Row `i` is anchor `a_i` against positives `b_j` (target `j = i`), each logit corrected by
/// `− logq_b[j]`; candidate `j ≠ i` is masked when `tb[j]` is the target's track `tb[i]` or the
/// query's own `ta[i]`. Column `j` is `b_j` against the anchors `a_i` the same way, with `logq_a`,
/// masking `i ≠ j` when `ta[i]` is `ta[j]` or `tb[j]`. Exactly the composite
/// [`super::softmax_ce_diagonal`] applied to `L` and `Lᵀ` (a test compares them).
pub struct SymmetricDiagonalCe {
    ta: Vec<u32>,
    tb: Vec<u32>,
    logq_a: Vec<f32>,
    logq_b: Vec<f32>,
    /// From the forward pass, for the backward pass.
    stats: Mutex<Option<Stats>>,
}

#[derive(Clone)]
pub(crate) struct Stats {
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
    col_max: Vec<f32>,
    col_sum: Vec<f32>,
}

impl SymmetricDiagonalCe {
    /// `logq_*` empty: no correction.
    pub fn new(ta: Vec<u32>, tb: Vec<u32>, logq_a: Option<Vec<f32>>, logq_b: Option<Vec<f32>>) -> Self {
        let zeros = vec![0.0; ta.len()];
        Self {
            logq_a: logq_a.unwrap_or_else(|| zeros.clone()),
            logq_b: logq_b.unwrap_or(zeros),
            ta,
            tb,
            stats: Mutex::new(None),
        }
    }

    /// Row `i`'s masks: `keep_row[j]` (candidate `b_j` of row `i`), `keep_col[j]` (candidate `a_i` of
    /// column `j`), as 0/1 so that the loops stay branch-free (and vectorise).
    #[inline(always)]
    fn masks(&self, i: usize, keep_row: &mut [f32], keep_col: &mut [f32]) {
        let (ai, bi) = (self.ta[i], self.tb[i]);
        for (((kr, kc), &aj), &bj) in keep_row.iter_mut().zip(keep_col.iter_mut()).zip(&self.ta).zip(&self.tb) {
            *kr = (bj != bi && bj != ai) as u8 as f32;
            *kc = (ai != aj && ai != bj) as u8 as f32;
        }
        keep_row[i] = 1.0;
        keep_col[i] = 1.0;
    }

    /// The loss of logits `l` (`[b, b]`, row-major) and what the backward pass needs.
    pub(crate) fn forward(&self, l: &[f32], b: usize) -> (f32, Stats) {
        let blocks = || l.par_chunks(b * BLOCK).enumerate();
        // Pass 1: maxima of the unmasked corrected logits, per row and per column.
        let (row_max, col_max) = blocks()
            .map(|(block, rows)| {
                let mut scratch = Scratch::new(b);
                let mut col_max = vec![f32::NEG_INFINITY; b];
                let mut row_max = Vec::with_capacity(BLOCK);
                for (r, row) in rows.chunks(b).enumerate() {
                    let i = block * BLOCK + r;
                    self.masks(i, &mut scratch.keep_row, &mut scratch.keep_col);
                    masked_shifted(&mut scratch.row, row, &self.logq_b, 0.0, &scratch.keep_row);
                    row_max.push(max(&scratch.row));
                    masked_shifted(&mut scratch.col, row, &scratch.zeros, self.logq_a[i], &scratch.keep_col);
                    for (m, &c) in col_max.iter_mut().zip(&scratch.col) {
                        *m = m.max(c);
                    }
                }
                (row_max, col_max)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold((Vec::new(), vec![f32::NEG_INFINITY; b]), |(mut rows, mut cols), (block_rows, block_cols)| {
                rows.extend(block_rows);
                cols.iter_mut().zip(&block_cols).for_each(|(x, y)| *x = x.max(*y));
                (rows, cols)
            });
        // Pass 2: sums of exponentials relative to those maxima.
        let (row_sum, col_sum) = blocks()
            .map(|(block, rows)| {
                let mut scratch = Scratch::new(b);
                let mut col_sum = vec![0.0f32; b];
                let mut row_sum = Vec::with_capacity(BLOCK);
                for (r, row) in rows.chunks(b).enumerate() {
                    let i = block * BLOCK + r;
                    self.masks(i, &mut scratch.keep_row, &mut scratch.keep_col);
                    masked_exp(&mut scratch.row, row, &self.logq_b, row_max[i], &scratch.keep_row);
                    row_sum.push(sum(&scratch.row));
                    masked_exp(&mut scratch.col, row, &col_max, self.logq_a[i], &scratch.keep_col);
                    for (s, &e) in col_sum.iter_mut().zip(&scratch.col) {
                        *s += e;
                    }
                }
                (row_sum, col_sum)
            })
            // Merged in block order, whatever the threads did: float sums depend on their order,
            // and a resumed run must repeat the run that never stopped bit for bit.
            .collect::<Vec<_>>()
            .into_iter()
            .fold((Vec::new(), vec![0.0; b]), |(mut rows, mut cols), (block_rows, block_cols)| {
                rows.extend(block_rows);
                cols.iter_mut().zip(&block_cols).for_each(|(x, y)| *x += y);
                (rows, cols)
            });
        let mut total = 0.0f64;
        for k in 0..b {
            let d = l[k * b + k];
            total += -((d - self.logq_b[k] - row_max[k]) as f64 - (row_sum[k] as f64).ln());
            total += -((d - self.logq_a[k] - col_max[k]) as f64 - (col_sum[k] as f64).ln());
        }
        (0.5 * total as f32 / b as f32, Stats { row_max, row_sum, col_max, col_sum })
    }

    /// `d loss / d l`, times `scale · 2b` (the op's own backward passes `½·upstream / b`).
    pub(crate) fn backward(&self, l: &[f32], b: usize, scale: f32, s: &Stats) -> Vec<f32> {
        let mut grad = vec![0f32; b * b];
        self.backward_into(l, b, scale, s, &mut grad);
        grad
    }

    /// [`Self::backward`] written over `grad` (`b·b` entries, every one written).
    pub(crate) fn backward_into(&self, l: &[f32], b: usize, scale: f32, s: &Stats, grad: &mut [f32]) {
        let col_factor: Vec<f32> = s.col_sum.iter().map(|x| scale / x).collect();
        grad.par_chunks_mut(b * BLOCK).zip(l.par_chunks(b * BLOCK)).enumerate().for_each(|(block, (out, rows))| {
            let mut scratch = Scratch::new(b);
            for (r, (out, row)) in out.chunks_mut(b).zip(rows.chunks(b)).enumerate() {
                let i = block * BLOCK + r;
                self.masks(i, &mut scratch.keep_row, &mut scratch.keep_col);
                masked_exp(&mut scratch.row, row, &self.logq_b, s.row_max[i], &scratch.keep_row);
                masked_exp(&mut scratch.col, row, &s.col_max, self.logq_a[i], &scratch.keep_col);
                let row_factor = scale / s.row_sum[i];
                for (((o, &p_row), &p_col), &cf) in out.iter_mut().zip(&scratch.row).zip(&scratch.col).zip(&col_factor)
                {
                    *o = p_row * row_factor + p_col * cf;
                }
                out[i] -= 2.0 * scale;
            }
        });
    }
}

/// Whether a `[b, b]` matrix is worth candle's thread pool. Handing a job to the pool and waiting
/// for it costs a wake-up and a context switch (tens of µs: most of the kernel time in a batch-64
/// profile), more than a small matrix takes on the calling thread.
fn parallel(b: usize) -> bool {
    b >= 256 && rayon::current_num_threads() > 1
}

/// Per-thread row buffers.
struct Scratch {
    keep_row: Vec<f32>,
    keep_col: Vec<f32>,
    row: Vec<f32>,
    col: Vec<f32>,
    zeros: Vec<f32>,
}

impl Scratch {
    fn new(b: usize) -> Self {
        Self {
            keep_row: vec![0.0; b],
            keep_col: vec![0.0; b],
            row: vec![0.0; b],
            col: vec![0.0; b],
            zeros: vec![0.0; b],
        }
    }
}

// The loops below are elementwise over slices (no indexing, no loop-carried dependence), the shape
// LLVM vectorises.

/// `out[j] = v[j] − bias[j] − shift` where kept, −∞ where masked.
#[inline(always)]
fn masked_shifted(out: &mut [f32], v: &[f32], bias: &[f32], shift: f32, keep: &[f32]) {
    for (((o, &v), &b), &k) in out.iter_mut().zip(v).zip(bias).zip(keep) {
        *o = if k > 0.0 { v - b - shift } else { f32::NEG_INFINITY };
    }
}

/// `out[j] = keep[j] · exp(v[j] − bias[j] − shift)`.
#[inline(always)]
fn masked_exp(out: &mut [f32], v: &[f32], bias: &[f32], shift: f32, keep: &[f32]) {
    for (((o, &v), &b), &k) in out.iter_mut().zip(v).zip(bias).zip(keep) {
        *o = k * fast_exp(v - b - shift);
    }
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

impl CustomOp1 for SymmetricDiagonalCe {
    fn name(&self) -> &'static str {
        "symmetric-diagonal-softmax-ce"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, b2) = layout.shape().dims2()?;
        if b != b2 || self.ta.len() != b || self.tb.len() != b {
            candle_core::bail!("symmetric-diagonal-softmax-ce: a [{b}, {b2}] matrix for {} pairs", self.ta.len());
        }
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("symmetric-diagonal-softmax-ce needs contiguous f32 logits");
        };
        let (loss, stats) = self.forward(&values[start..end], b);
        *self.stats.lock().expect("stats lock") = Some(stats);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let b = arg.dim(0)?;
        let stats = self.stats.lock().expect("stats lock").clone();
        let stats = stats.ok_or_else(|| candle_core::Error::Msg("backward before forward".into()))?;
        let l: Vec<f32> = arg.flatten_all()?.to_vec1()?;
        let scale = 0.5 * grad_res.to_scalar::<f32>()? / b as f32;
        Ok(Some(Tensor::from_vec(self.backward(&l, b, scale, &stats), (b, b), arg.device())?))
    }
}
