//! The contrastive loss's two softmax cross-entropies as one CPU op, forward and backward.
//!
//! Written as separate candle ops (compare, mask, bias, log-softmax, pick the diagonal, and all of
//! it again on the transpose), the loss over a `[B, B]` logit matrix was ~40 element-wise passes,
//! each allocating a `B²` temporary: at B = 1024 that was 45 % of a training step in `binary_map`
//! and 10 % clearing fresh pages (BENCHMARKS.md). Here the matrix is read twice forward (maxima,
//! then sums of exponentials — rows and columns together, so no transpose is made) and once
//! backward, with the accidental-hit masks computed from the track ids on the fly, a vectorisable
//! `exp`, and blocks of rows on candle's thread pool.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_step::kernels::avx2_or_not;

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
        let col_factor: Vec<f32> = s.col_sum.iter().map(|x| scale / x).collect();
        let mut grad = vec![0f32; b * b];
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
        grad
    }
}

/// Smallest sum of exponentials [`SymmetricDiagonalCe::loss_and_gradient`] accepts under its shared
/// shift: above it, an entry `fast_exp` clamps at e⁻⁸⁷ weighs < 1e-16 of the sum.
const MIN_SHIFTED_SUM: f32 = 1.9e-22; // ≈ e⁻⁵⁰

impl SymmetricDiagonalCe {
    /// The loss and `scale · 2b · d loss / d l` in two reads of `l` and one write of the gradient,
    /// one exponential per entry per read (the op's forward and backward read `l` three times and
    /// take two exponentials per entry in two of them), for a training step that wants both.
    ///
    /// Both directions share `E[i,j] = exp(l[i,j] − max l)`: the row direction's entry is
    /// `E[i,j]·w[j]` with `w[j] = exp(−logq_b[j] − max(−logq_b))`, the column direction's
    /// `E[i,j]·u[i]` with `u` from `logq_a` alike — every factor ≤ 1, so nothing overflows. The
    /// first read sums rows and columns; the second writes
    /// `grad[i,j] = scale·E[i,j]·(keep_row·w[j]/rowsum[i] + keep_col·u[i]/colsum[j]) − 2·scale·[i = j]`.
    /// When a sum under the shared shift is so small that clamped entries could matter (logits spread
    /// over more than ~50 nats), it falls back to the exact passes.
    pub(crate) fn loss_and_gradient(&self, l: &[f32], b: usize, scale: f32) -> (f32, Vec<f32>) {
        self.shared_shift(l, b, scale).unwrap_or_else(|| {
            let (loss, stats) = self.forward(l, b);
            (loss, self.backward(l, b, scale, &stats))
        })
    }

    /// [`Self::loss_and_gradient`] under the shared shift; `None` when it does not hold.
    fn shared_shift(&self, l: &[f32], b: usize, scale: f32) -> Option<(f32, Vec<f32>)> {
        let shift = avx2_or_not!(max(l));
        let factors = |logq: &[f32]| {
            let top = logq.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(-x));
            logq.iter().map(|&x| fast_exp(-x - top)).collect::<Vec<f32>>()
        };
        let (w, u) = (factors(&self.logq_b), factors(&self.logq_a));
        let hits = Hits::of(&self.ta, &self.tb);
        let chunk = b * BLOCK;
        // Read 1: row sums, and per block of rows its share of the column sums.
        let sums_of_block = |(block, rows): (usize, &[f32])| {
            let mut scratch = Scratch::new(b);
            let (mut row_sum, mut col_sum) = (Vec::with_capacity(BLOCK), vec![0.0f32; b]);
            for (r, row) in rows.chunks(b).enumerate() {
                let i = block * BLOCK + r;
                row_sum.push(self.row_sums(i, row, shift, &w, u[i], &hits, &mut scratch, &mut col_sum));
            }
            (row_sum, col_sum)
        };
        let blocks: Vec<(Vec<f32>, Vec<f32>)> = if parallel(b) {
            l.par_chunks(chunk).enumerate().map(sums_of_block).collect()
        } else {
            l.chunks(chunk).enumerate().map(sums_of_block).collect()
        };
        // Merged in block order: the same bits on any number of threads.
        let (mut row_sum, mut col_sum) = (Vec::with_capacity(b), vec![0.0f32; b]);
        for (rows, cols) in blocks {
            row_sum.extend(rows);
            col_sum.iter_mut().zip(&cols).for_each(|(x, y)| *x += y);
        }
        if row_sum.iter().chain(&col_sum).any(|&s| s < MIN_SHIFTED_SUM) {
            return None;
        }
        // Read 2: the gradient.
        let col_factor: Vec<f32> = col_sum.iter().map(|s| scale / s).collect();
        let mut grad = vec![0f32; b * b];
        let grad_of_block = |(block, (out, rows)): (usize, (&mut [f32], &[f32]))| {
            let mut scratch = Scratch::new(b);
            for (r, (out, row)) in out.chunks_mut(b).zip(rows.chunks(b)).enumerate() {
                let i = block * BLOCK + r;
                let factors = RowFactors { shift, row: scale / row_sum[i], u: u[i], w: &w, col: &col_factor };
                self.row_gradient(i, row, out, &factors, &hits, &mut scratch);
                out[i] -= 2.0 * scale;
            }
        };
        if parallel(b) {
            grad.par_chunks_mut(chunk).zip(l.par_chunks(chunk)).enumerate().for_each(grad_of_block);
        } else {
            grad.chunks_mut(chunk).zip(l.chunks(chunk)).enumerate().for_each(grad_of_block);
        }
        // loss_row(k) = −ln(E[k,k]·w[k] / rowsum[k]), with ln E[k,k] = l[k,k] − shift.
        let mut total = 0.0f64;
        for k in 0..b {
            let d = (l[k * b + k] - shift) as f64;
            total += -(d + (w[k] as f64).ln() - (row_sum[k] as f64).ln());
            total += -(d + (u[k] as f64).ln() - (col_sum[k] as f64).ln());
        }
        Some((0.5 * total as f32 / b as f32, grad))
    }
}

/// What [`SymmetricDiagonalCe::row_gradient`] scales row `i`'s exponentials by.
struct RowFactors<'a> {
    shift: f32,
    /// `scale / rowsum[i]`.
    row: f32,
    /// `u[i]`.
    u: f32,
    w: &'a [f32],
    /// `scale / colsum[j]`.
    col: &'a [f32],
}

// The two per-row kernels of `shared_shift`, compiled for AVX2 when the CPU has it (`avx2_or_not!`),
// else for the baseline; the same bits either way.
impl SymmetricDiagonalCe {
    /// Row `i`'s exponentials: adds its column-direction entries to `col_sum` and returns its
    /// row-direction sum.
    #[allow(clippy::too_many_arguments)]
    fn row_sums(
        &self,
        i: usize,
        row: &[f32],
        shift: f32,
        w: &[f32],
        ui: f32,
        hits: &Hits,
        s: &mut Scratch,
        col_sum: &mut [f32],
    ) -> f32 {
        avx2_or_not!(self.row_sums_inline(i, row, shift, w, ui, hits, s, col_sum))
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn row_sums_inline(
        &self,
        i: usize,
        row: &[f32],
        shift: f32,
        w: &[f32],
        ui: f32,
        hits: &Hits,
        s: &mut Scratch,
        col_sum: &mut [f32],
    ) -> f32 {
        shifted_exp(&mut s.row, row, shift);
        // Masked entries are set to 0 around each sum (never subtracted after it: a masked entry
        // can be the largest of its row by far, and subtracting it would cancel the rest).
        let saved: Vec<(usize, f32)> = hits.col[i].iter().map(|&j| (j as usize, s.row[j as usize])).collect();
        saved.iter().for_each(|&(j, _)| s.row[j] = 0.0);
        add_weighted(col_sum, &s.row, ui);
        saved.iter().for_each(|&(j, e)| s.row[j] = e);
        hits.row[i].iter().for_each(|&j| s.row[j as usize] = 0.0);
        weighted_sum(&s.row, w)
    }

    /// Row `i` of the gradient, less the diagonal term.
    fn row_gradient(&self, i: usize, row: &[f32], out: &mut [f32], f: &RowFactors, hits: &Hits, s: &mut Scratch) {
        avx2_or_not!(self.row_gradient_inline(i, row, out, f, hits, s))
    }

    #[inline(always)]
    fn row_gradient_inline(
        &self,
        i: usize,
        row: &[f32],
        out: &mut [f32],
        f: &RowFactors,
        hits: &Hits,
        s: &mut Scratch,
    ) {
        shifted_exp(&mut s.row, row, f.shift);
        let (row_factor, ui) = (f.row, f.u);
        for (((o, &e), &wj), &cf) in out.iter_mut().zip(&s.row).zip(f.w).zip(f.col) {
            *o = e * (wj * row_factor + ui * cf);
        }
        // The few masked entries, recomputed with their masks (not corrected by subtraction).
        for &j in hits.row[i].iter().chain(&hits.col[i]) {
            let j = j as usize;
            let keep_row = !hits.row[i].contains(&(j as u32)) as u8 as f32;
            let keep_col = !hits.col[i].contains(&(j as u32)) as u8 as f32;
            out[j] = s.row[j] * (keep_row * f.w[j] * row_factor + keep_col * ui * f.col[j]);
        }
    }
}

/// The accidental hits of a batch, per row `i`: the columns `j ≠ i` masked in the row direction
/// (`tb[j]` is `tb[i]` or `ta[i]`) and in the column direction (`ta[i]` is `ta[j]` or `tb[j]`). A
/// batch has few, so the kernels run unmasked and then visit only these.
struct Hits {
    row: Vec<Vec<u32>>,
    col: Vec<Vec<u32>>,
}

impl Hits {
    fn of(ta: &[u32], tb: &[u32]) -> Self {
        let positions = |ids: &[u32]| {
            let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
            ids.iter().enumerate().for_each(|(j, &t)| map.entry(t).or_default().push(j as u32));
            map
        };
        let (in_a, in_b) = (positions(ta), positions(tb));
        let collect = |i: usize, lists: [&[u32]; 2]| {
            let mut js: Vec<u32> = lists.iter().flat_map(|l| l.iter().copied()).filter(|&j| j as usize != i).collect();
            js.sort_unstable();
            js.dedup();
            js
        };
        let row = (0..ta.len()).map(|i| collect(i, [at(&in_b, tb[i]), at(&in_b, ta[i])])).collect();
        let col = (0..ta.len()).map(|i| collect(i, [at(&in_a, ta[i]), at(&in_b, ta[i])])).collect();
        Self { row, col }
    }
}

/// The positions where `t` occurs, from a map built by [`Hits::of`].
fn at(map: &HashMap<u32, Vec<u32>>, t: u32) -> &[u32] {
    map.get(&t).map_or(&[], |v| &v[..])
}

impl Hits {
    #[cfg(test)]
    fn count(&self) -> usize {
        self.row.iter().chain(&self.col).map(Vec::len).sum()
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

/// `out[j] = exp(v[j] − shift)`.
#[inline(always)]
fn shifted_exp(out: &mut [f32], v: &[f32], shift: f32) {
    out.iter_mut().zip(v).for_each(|(o, &v)| *o = fast_exp(v - shift));
}

/// `Σ_j e[j]·w[j]`, in [`LANES`] fixed lanes (the same order whatever the vector width).
#[inline(always)]
fn weighted_sum(e: &[f32], w: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let split = e.len() / LANES * LANES;
    for (ce, cw) in e[..split].chunks_exact(LANES).zip(w[..split].chunks_exact(LANES)) {
        for ((lane, &e), &w) in lanes.iter_mut().zip(ce).zip(cw) {
            *lane += e * w;
        }
    }
    let tail: f32 = e[split..].iter().zip(&w[split..]).map(|(e, w)| e * w).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `acc[j] += e[j]·u`.
#[inline(always)]
fn add_weighted(acc: &mut [f32], e: &[f32], u: f32) {
    acc.iter_mut().zip(e).for_each(|(a, &e)| *a += e * u);
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

/// `eˣ` for f32 to within ~2 ulp, branch-free so that loops over it vectorise (libm's `expf` is a
/// call per element). Inputs are clamped to the finite range; the callers' arguments are ≤ 0 for
/// every entry they keep.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' constants, as published
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on [−ln2/2, ln2/2] (Cephes expf's polynomial).
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * e
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn loss_and_gradient_are_the_same_bits_on_one_thread_or_three() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let b = 300; // several blocks
        let ids = |rng: &mut rand_chacha::ChaCha8Rng| (0..b).map(|_| rng.random_range(0..50)).collect::<Vec<u32>>();
        let (ta, tb) = (ids(&mut rng), ids(&mut rng));
        let logq: Vec<f32> = (0..b).map(|_| rng.random_range(-9.0..-2.0)).collect();
        let l: Vec<f32> = (0..b * b).map(|_| rng.random_range(-20.0..20.0)).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let op = SymmetricDiagonalCe::new(ta.clone(), tb.clone(), Some(logq.clone()), Some(logq.clone()));
                let (loss, stats) = op.forward(&l, b);
                (loss.to_bits(), op.backward(&l, b, 0.5, &stats).iter().map(|g| g.to_bits()).collect::<Vec<_>>())
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn shared_shift_loss_and_gradient_equal_the_exact_passes_and_fall_back_on_wide_logits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        // The last case puts one logit ~200 above a whole column: one shift cannot serve both.
        for (b, wide) in [(5, false), (130, false), (300, false), (40, true)] {
            let ids = |rng: &mut rand_chacha::ChaCha8Rng| {
                (0..b).map(|_| rng.random_range(0..b as u32 / 3 + 2)).collect::<Vec<u32>>()
            };
            let (ta, tb) = (ids(&mut rng), ids(&mut rng));
            let logq: Vec<f32> = (0..b).map(|_| rng.random_range(-12.0..-2.0)).collect();
            let mut l: Vec<f32> = (0..b * b).map(|_| rng.random_range(-20.0..20.0)).collect();
            if wide {
                l[0] = 100.0;
                (0..b).for_each(|i| l[i * b + 1] = -100.0);
            }
            let hits = Hits::of(&ta, &tb).count();
            assert!(hits > 0, "B {b}: no accidental hits, a weak check of the masks");
            let op = SymmetricDiagonalCe::new(ta, tb, Some(logq.clone()), Some(logq));
            let (loss, stats) = op.forward(&l, b);
            let want = op.backward(&l, b, 0.5 / b as f32, &stats);
            assert_eq!(op.shared_shift(&l, b, 0.5 / b as f32).is_none(), wide, "B {b}: one pass taken?");
            let (got_loss, got) = op.loss_and_gradient(&l, b, 0.5 / b as f32);
            assert!((got_loss - loss).abs() <= 1e-5 * loss.abs(), "B {b}: {got_loss} vs {loss}");
            let scale = want.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            let err = got.iter().zip(&want).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= 1e-5 * scale, "B {b}: gradient off by {err} (scale {scale})");
        }
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_exp_and_finite_at_the_ends() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (fast_exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error up to {worst}");
        assert!(fast_exp(-1e9) >= 0.0 && fast_exp(-1e9) < 1e-37);
        assert!(fast_exp(1e9).is_finite());
    }
}
