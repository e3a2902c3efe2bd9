//! The few dense kernels a training step needs, over row-major `f32` slices.
//!
//! Matrix products go to the `gemm` crate, the same microkernels candle's CPU backend calls, with
//! strides instead of transposed copies. Everything else is a plain loop over slices, the shape LLVM
//! vectorises.

use gemm::Parallelism;

/// Evaluates `$call`, a call of an `#[inline(always)]` function, inside a function compiled for
/// AVX2 when this CPU has it; else as built (baseline x86-64 is SSE2: loops vectorise 4 floats wide
/// instead of 8). The results are the same bits either way: Rust never fuses `a·b + c` on its own,
/// and every reduction here fixes its own order. Keep `$call`'s function small enough to inline
/// (a row kernel): the optimiser may leave a huge one outside, compiled for the baseline — see
/// `CpuStep::loss_and_gradients` for the explicit form.
macro_rules! avx2_or_not {
    ($call:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            #[inline]
            fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, the one feature `avx2` is compiled for.
                unsafe { avx2(|| $call) }
            } else {
                $call
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $call
        }
    }};
}
pub(crate) use avx2_or_not;

/// A row-major `[rows, cols]` matrix, read as itself or as its transpose.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "a [{rows}, {cols}] matrix over {} values", data.len());
        Self { data, rows, cols, transposed: false }
    }

    /// The transpose, without moving anything.
    pub fn t(self) -> Self {
        Self { transposed: !self.transposed, ..self }
    }

    /// `(rows, cols)` as used in a product.
    fn dims(&self) -> (usize, usize) {
        if self.transposed { (self.cols, self.rows) } else { (self.rows, self.cols) }
    }

    /// `(row stride, column stride)` as used in a product.
    fn strides(&self) -> (isize, isize) {
        if self.transposed { (1, self.cols as isize) } else { (self.cols as isize, 1) }
    }
}

/// `out = (accumulate ? out : 0) + scale · a·b`, `out` row-major `[a.rows, b.cols]` (as used).
pub fn matmul(out: &mut [f32], a: Mat, b: Mat, scale: f32, accumulate: bool) {
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    matmul_with(out, a, b, scale, accumulate, parallelism);
}

/// `out = a·b` on the calling thread: for callers that already run one product per core.
pub fn matmul_single_thread(out: &mut [f32], a: Mat, b: Mat) {
    matmul_with(out, a, b, 1.0, false, Parallelism::None);
}

fn matmul_with(out: &mut [f32], a: Mat, b: Mat, scale: f32, accumulate: bool, parallelism: Parallelism) {
    let ((m, k), (k2, n)) = (a.dims(), b.dims());
    assert_eq!(k, k2, "inner dimensions {k} and {k2}");
    assert_eq!(out.len(), m * n, "output of [{m}, {n}] over {} values", out.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let ((a_rs, a_cs), (b_rs, b_cs)) = (a.strides(), b.strides());
    // SAFETY: the asserts above (and `Mat::new`'s) bound every index gemm derives from these
    // dimensions and strides inside the three slices; `out` is borrowed mutably, so it aliases
    // neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `[rows, bias.len()]` with every row equal to `bias`: a Dense layer's output before `matmul`
/// accumulates `x·W` into it.
#[inline(always)]
pub fn repeat_rows(bias: &[f32], rows: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * bias.len());
    for _ in 0..rows {
        out.extend_from_slice(bias);
    }
    out
}

/// Sum over rows of a row-major `[rows, cols]` matrix.
#[inline(always)]
pub fn column_sums(x: &[f32], cols: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; cols];
    for row in x.chunks_exact(cols) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
    sums
}

/// In place: `x = relu(x) · mask` (inverted dropout; no mask = no dropout). Returns each unit's
/// derivative, `mask` where `x ≥ 0` before the ReLU and 0 below — candle's ReLU passes the gradient
/// at exactly 0 (`x.ge(0)`), which the output alone cannot tell from a negative input (a zero bias
/// and a zero input give exactly 0).
#[inline(always)]
pub fn relu_dropout(x: &mut [f32], mask: Option<&[f32]>) -> Vec<f32> {
    let mut derivative = vec![0.0f32; x.len()];
    match mask {
        Some(mask) => {
            for ((v, d), &m) in x.iter_mut().zip(&mut derivative).zip(mask) {
                *d = if *v >= 0.0 { m } else { 0.0 };
                *v = v.max(0.0) * m;
            }
        }
        None => {
            for (v, d) in x.iter_mut().zip(&mut derivative) {
                *d = if *v >= 0.0 { 1.0 } else { 0.0 };
                *v = v.max(0.0);
            }
        }
    }
    derivative
}

/// In place: the gradient through [`relu_dropout`], given the derivative it returned.
#[inline(always)]
pub fn scale_by(grad: &mut [f32], derivative: &[f32]) {
    grad.iter_mut().zip(derivative).for_each(|(g, d)| *g *= d);
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

/// `tanh` for f32 within a few ulp, branch-free so that loops over it vectorise (libm's `tanhf` is
/// a call per element: 8 % of a batch-1024 step). Cephes' `tanhf`: an odd polynomial below
/// |x| = 0.625, `1 − 2/(e^{2|x|} + 1)` above.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' constants, as published
pub fn fast_tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let p = -5.704_988_727_45e-3_f32;
    let p = p * z + 2.063_908_879_54e-2;
    let p = p * z - 5.373_971_555_31e-2;
    let p = p * z + 1.333_144_220_36e-1;
    let p = p * z - 3.333_328_194_22e-1;
    let small = p * z * x + x;
    let large = (1.0 - 2.0 / (fast_exp(2.0 * a) + 1.0)).copysign(x);
    if a < 0.625 { small } else { large }
}

/// Row-wise dot products of two `[rows, cols]` matrices.
#[inline(always)]
pub fn row_dots(a: &[f32], b: &[f32], cols: usize) -> Vec<f32> {
    a.chunks_exact(cols).zip(b.chunks_exact(cols)).map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product by definition, in f64.
    fn naive(a: &[f32], (m, k): (usize, usize), a_t: bool, b: &[f32], n: usize, b_t: bool) -> Vec<f32> {
        let at = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] } as f64;
        let bt = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] } as f64;
        (0..m * n).map(|ij| (0..k).map(|p| at(ij / n, p) * bt(p, ij % n)).sum::<f64>() as f32).collect()
    }

    #[test]
    fn matmul_matches_the_definition_for_every_transpose_scale_and_accumulate() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let am = if a_t { Mat::new(&a, k, m).t() } else { Mat::new(&a, m, k) };
            let bm = if b_t { Mat::new(&b, n, k).t() } else { Mat::new(&b, k, n) };
            let want = naive(&a, (m, k), a_t, &b, n, b_t);
            let mut out = vec![1.0f32; m * n];
            matmul(&mut out, am, bm, 0.5, true);
            for (o, w) in out.iter().zip(&want) {
                assert!((o - (1.0 + 0.5 * w)).abs() < 1e-5, "a_t {a_t} b_t {b_t}: {o} vs 1 + {w}/2");
            }
            matmul(&mut out, am, bm, 1.0, false);
            for (o, w) in out.iter().zip(&want) {
                assert!((o - w).abs() < 1e-5, "a_t {a_t} b_t {b_t}: {o} vs {w}");
            }
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

    #[test]
    fn fast_tanh_is_within_a_few_ulp_of_tanh() {
        let mut worst = 0.0f32;
        let mut x = -12.0f32;
        while x < 12.0 {
            let (got, want) = (fast_tanh(x), x.tanh());
            worst = worst.max(((got - want) / want.abs().max(f32::MIN_POSITIVE)).abs());
            x += 0.000_731;
        }
        assert!(worst < 4e-7, "relative error up to {worst}");
        assert_eq!((fast_tanh(0.0), fast_tanh(100.0), fast_tanh(-100.0)), (0.0, 1.0, -1.0));
        assert!(fast_tanh(1e-30) == 1e-30 && fast_tanh(f32::MIN_POSITIVE) == f32::MIN_POSITIVE);
    }

    #[test]
    fn relu_dropout_and_its_gradient() {
        let mut x = vec![-1.0, 2.0, 3.0, 0.5];
        let mask = [1.25, 0.0, 1.25, 1.25];
        let derivative = relu_dropout(&mut x, Some(&mask));
        assert_eq!(x, vec![0.0, 0.0, 3.75, 0.625]);
        assert_eq!(derivative, vec![0.0, 0.0, 1.25, 1.25]);
        let mut zero = vec![0.0, -0.0, -1e-30];
        assert_eq!(relu_dropout(&mut zero, None), vec![1.0, 1.0, 0.0], "at 0 the gradient passes, as candle's");
        let mut g = vec![2.0; 4];
        scale_by(&mut g, &derivative);
        assert_eq!(g, vec![0.0, 0.0, 2.5, 2.5]);
        assert_eq!(column_sums(&[1.0, 2.0, 3.0, 4.0], 2), vec![4.0, 6.0]);
        assert_eq!(repeat_rows(&[1.0, 2.0], 2), vec![1.0, 2.0, 1.0, 2.0]);
        assert_eq!(row_dots(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0, 2.0, 0.5], 2), vec![3.0, 8.0]);
    }
}
