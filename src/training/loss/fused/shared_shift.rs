//! The contrastive loss and its gradient in two reads of the logits, for the fused CPU step
//! ([`SymmetricDiagonalCe::loss_and_gradient`]): exponentials shared by both directions, sparse
//! accidental-hit masks, AVX2 row kernels.

use std::collections::HashMap;

use rayon::prelude::*;

use super::{BLOCK, LANES, Scratch, SymmetricDiagonalCe, max, parallel};
use crate::training::cpu_step::kernels::{avx2_or_not, fast_exp};

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
    ///
    /// The gradient is written over `grad` (`b·b` entries, every one written): the caller allocates
    /// it, fallibly, so that a batch too large for memory is an error rather than an abort.
    pub(crate) fn loss_and_gradient(&self, l: &[f32], b: usize, scale: f32, grad: &mut [f32]) -> f32 {
        self.shared_shift(l, b, scale, grad).unwrap_or_else(|| {
            let (loss, stats) = self.forward(l, b);
            self.backward_into(l, b, scale, &stats, grad);
            loss
        })
    }

    /// [`Self::loss_and_gradient`] under the shared shift; `None` when it does not hold.
    fn shared_shift(&self, l: &[f32], b: usize, scale: f32, grad: &mut [f32]) -> Option<f32> {
        let shared = Shared::new(self, l);
        let chunk = b * BLOCK;
        // Read 1: row sums, and per block of rows its share of the column sums.
        let sums_of_block = |(block, rows): (usize, &[f32])| {
            let mut scratch = Scratch::new(b);
            let (mut row_sum, mut col_sum) = (Vec::with_capacity(BLOCK), vec![0.0f32; b]);
            for (r, row) in rows.chunks(b).enumerate() {
                let i = block * BLOCK + r;
                row_sum.push(shared.row_sums(i, row, &mut scratch, &mut col_sum));
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
        let grad_of_block = |(block, (out, rows)): (usize, (&mut [f32], &[f32]))| {
            let mut scratch = Scratch::new(b);
            for (r, (out, row)) in out.chunks_mut(b).zip(rows.chunks(b)).enumerate() {
                let i = block * BLOCK + r;
                shared.row_gradient(i, row, out, scale / row_sum[i], &col_factor, &mut scratch);
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
            let d = (l[k * b + k] - shared.shift) as f64;
            total += -(d + (shared.w[k] as f64).ln() - (row_sum[k] as f64).ln());
            total += -(d + (shared.u[k] as f64).ln() - (col_sum[k] as f64).ln());
        }
        Some(0.5 * total as f32 / b as f32)
    }
}

/// What both reads share: the shift, the per-column and per-row factors, and the hit lists.
struct Shared {
    /// `max l`: every `E[i,j] = exp(l[i,j] − shift)` is ≤ 1.
    shift: f32,
    /// `w[j] = exp(−logq_b[j] − max(−logq_b))`, the row direction's factor.
    w: Vec<f32>,
    /// `u[i]` alike from `logq_a`, the column direction's.
    u: Vec<f32>,
    hits: Hits,
}

// The two per-row kernels, compiled for AVX2 when the CPU has it (`avx2_or_not!`), else for the
// baseline; the same bits either way.
impl Shared {
    fn new(op: &SymmetricDiagonalCe, l: &[f32]) -> Self {
        let factors = |logq: &[f32]| {
            let top = logq.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(-x));
            logq.iter().map(|&x| fast_exp(-x - top)).collect::<Vec<f32>>()
        };
        Self {
            shift: avx2_or_not!(max(l)),
            w: factors(&op.logq_b),
            u: factors(&op.logq_a),
            hits: Hits::of(&op.ta, &op.tb),
        }
    }

    /// Row `i`'s exponentials: adds its column-direction entries to `col_sum` and returns its
    /// row-direction sum.
    fn row_sums(&self, i: usize, row: &[f32], s: &mut Scratch, col_sum: &mut [f32]) -> f32 {
        avx2_or_not!(self.row_sums_inline(i, row, s, col_sum))
    }

    #[inline(always)]
    fn row_sums_inline(&self, i: usize, row: &[f32], s: &mut Scratch, col_sum: &mut [f32]) -> f32 {
        shifted_exp(&mut s.row, row, self.shift);
        // Masked entries are set to 0 around each sum (never subtracted after it: a masked entry
        // can be the largest of its row by far, and subtracting it would cancel the rest).
        let (masked_row, masked_col) = (&self.hits.row[i], &self.hits.col[i]);
        let saved: Vec<(usize, f32)> = masked_col.iter().map(|&j| (j as usize, s.row[j as usize])).collect();
        saved.iter().for_each(|&(j, _)| s.row[j] = 0.0);
        add_weighted(col_sum, &s.row, self.u[i]);
        saved.iter().for_each(|&(j, e)| s.row[j] = e);
        masked_row.iter().for_each(|&j| s.row[j as usize] = 0.0);
        weighted_sum(&s.row, &self.w)
    }

    /// Row `i` of the gradient, less the diagonal term: `E[i,j]·(w[j]·row_factor + u[i]·col_factor[j])`
    /// with `row_factor = scale / rowsum[i]`, `col_factor[j] = scale / colsum[j]`.
    fn row_gradient(
        &self,
        i: usize,
        row: &[f32],
        out: &mut [f32],
        row_factor: f32,
        col_factor: &[f32],
        s: &mut Scratch,
    ) {
        avx2_or_not!(self.row_gradient_inline(i, row, out, row_factor, col_factor, s))
    }

    #[inline(always)]
    fn row_gradient_inline(
        &self,
        i: usize,
        row: &[f32],
        out: &mut [f32],
        row_factor: f32,
        col_factor: &[f32],
        s: &mut Scratch,
    ) {
        shifted_exp(&mut s.row, row, self.shift);
        let ui = self.u[i];
        for (((o, &e), &wj), &cf) in out.iter_mut().zip(&s.row).zip(&self.w).zip(col_factor) {
            *o = e * (wj * row_factor + ui * cf);
        }
        // The few masked entries, recomputed with their masks (not corrected by subtraction).
        let (masked_row, masked_col) = (&self.hits.row[i], &self.hits.col[i]);
        for &j in masked_row.iter().chain(masked_col) {
            let keep_row = !masked_row.contains(&j) as u8 as f32;
            let keep_col = !masked_col.contains(&j) as u8 as f32;
            let j = j as usize;
            out[j] = s.row[j] * (keep_row * self.w[j] * row_factor + keep_col * ui * col_factor[j]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn shared_shift_loss_and_gradient_equal_the_exact_passes_and_fall_back_on_wide_logits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        // The last case puts one logit ~200 above a whole column: one shift cannot serve both.
        for (b, wide) in [(5, false), (130, false), (300, false), (40, true)] {
            let ids = |rng: &mut rand_chacha::ChaCha8Rng| {
                (0..b).map(|_| rng.random_range(0..b as u32 / 3 + 2)).collect::<Vec<u32>>()
            };
            let (ta, tb) = (ids(&mut rng), ids(&mut rng));
            // Different corrections per side, so that swapping them cannot pass.
            let logq_a: Vec<f32> = (0..b).map(|_| rng.random_range(-12.0..-2.0)).collect();
            let logq_b: Vec<f32> = (0..b).map(|_| rng.random_range(-9.0..-1.0)).collect();
            let mut l: Vec<f32> = (0..b * b).map(|_| rng.random_range(-20.0..20.0)).collect();
            if wide {
                l[0] = 100.0;
                (0..b).for_each(|i| l[i * b + 1] = -100.0);
            }
            let hits = Hits::of(&ta, &tb).count();
            assert!(hits > 0, "B {b}: no accidental hits, a weak check of the masks");
            let op = SymmetricDiagonalCe::new(ta, tb, Some(logq_a), Some(logq_b));
            let (loss, stats) = op.forward(&l, b);
            let want = op.backward(&l, b, 0.5 / b as f32, &stats);
            let mut got = vec![f32::NAN; b * b];
            assert_eq!(op.shared_shift(&l, b, 0.5 / b as f32, &mut got).is_none(), wide, "B {b}: one pass taken?");
            got.fill(f32::NAN); // every entry must be written
            let got_loss = op.loss_and_gradient(&l, b, 0.5 / b as f32, &mut got);
            assert!((got_loss - loss).abs() <= 1e-5 * loss.abs(), "B {b}: {got_loss} vs {loss}");
            let scale = want.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            let err = got.iter().zip(&want).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= 1e-5 * scale, "B {b}: gradient off by {err} (scale {scale})");
        }
    }

    /// Float sums depend on their order, and a resumed run must repeat the run that never stopped
    /// bit for bit: both the exact passes and the shared-shift path merge blocks in block order.
    #[test]
    fn both_paths_give_the_same_bits_on_one_thread_or_three() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let b = 300; // several blocks, and above the parallel threshold
        let ids = |rng: &mut rand_chacha::ChaCha8Rng| (0..b).map(|_| rng.random_range(0..60)).collect::<Vec<u32>>();
        let (ta, tb) = (ids(&mut rng), ids(&mut rng));
        let logq: Vec<f32> = (0..b).map(|_| rng.random_range(-9.0..-2.0)).collect();
        let l: Vec<f32> = (0..b * b).map(|_| rng.random_range(-20.0..20.0)).collect();
        let bits = |loss: f32, grad: Vec<f32>| (loss.to_bits(), grad.iter().map(|g| g.to_bits()).collect::<Vec<_>>());
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let op = SymmetricDiagonalCe::new(ta.clone(), tb.clone(), Some(logq.clone()), None);
                let (loss, stats) = op.forward(&l, b);
                let exact = bits(loss, op.backward(&l, b, 0.5 / b as f32, &stats));
                let mut grad = vec![0f32; b * b];
                let loss = op.shared_shift(&l, b, 0.5 / b as f32, &mut grad).expect("the shared shift holds here");
                (exact, bits(loss, grad))
            })
        };
        assert_eq!(run(1), run(3));
    }
}
