//! The arithmetic behind pairs/s (`bench --roofline`): FLOPs per trained pair, and how fast this
//! machine's matrix kernels run the training step's own products on the current thread count.
//!
//! Dividing the second by the first bounds pairs/s from above: a step can go no faster than its
//! matrix products alone. The gap between that bound and the measured pairs/s is everything else —
//! the softmax's exponentials, element-wise layers, Adam, pair sampling.

use std::time::Instant;

use serde::Serialize;

use crate::data::features::NUM_FEATURES;
use crate::training::cpu_step::kernels::{Mat, matmul};
use crate::training::loss::LossKind;

/// Floating-point operations (multiplies and adds counted apart) to train one pair: both rows of the
/// pair through the encoder's three Dense layers forward, weight gradients and input gradients
/// (3 × 2 × MACs), plus for the contrastive loss the `[B, B]` logits and their two gradients
/// (`3 × 2·B·E` per pair). Element-wise work is not counted: it is not multiply-add bound.
pub fn flops_per_pair(embedding_size: usize, batch: usize, loss: LossKind) -> f64 {
    let e = embedding_size;
    let macs_per_row = NUM_FEATURES * 2 * e + 2 * e * e + e * e;
    let encoder = 2 * 3 * 2 * macs_per_row;
    encoder as f64 + loss_flops_per_pair(embedding_size, batch, loss)
}

/// The objective's share of [`flops_per_pair`]: the in-batch logits and their two gradients.
pub fn loss_flops_per_pair(embedding_size: usize, batch: usize, loss: LossKind) -> f64 {
    match loss {
        LossKind::Contrastive => (3 * 2 * batch * embedding_size) as f64,
        LossKind::Cosine => 0.0,
    }
}

/// One matrix product of the step: `[m, k]·[k, n]`, with the operands' layouts as the step uses them.
struct Product {
    m: usize,
    k: usize,
    n: usize,
    a_transposed: bool,
    b_transposed: bool,
}

/// The products of one fused training step (`cpu_step`), in its order and layouts.
fn step_products(e: usize, batch: usize, loss: LossKind) -> Vec<Product> {
    let (f, h1, h2, n) = (NUM_FEATURES, 2 * e, e, 2 * batch);
    let p = |m, k, n, a_transposed, b_transposed| Product { m, k, n, a_transposed, b_transposed };
    let mut products = vec![p(n, f, h1, false, false), p(n, h1, h2, false, false), p(n, h2, e, false, false)];
    if loss == LossKind::Contrastive {
        products.extend([
            p(batch, e, batch, false, true),
            p(batch, batch, e, false, false),
            p(batch, batch, e, true, false),
        ]);
    }
    products.extend([
        p(h2, n, e, true, false),
        p(n, e, h2, false, true),
        p(h1, n, h2, true, false),
        p(n, h2, h1, false, true),
        p(f, n, h1, true, false),
        p(n, h1, f, false, true),
    ]);
    products
}

/// GFLOP/s of running `products` back to back for at least `seconds`.
fn gflops(products: &[Product], seconds: f64) -> f64 {
    let buffers: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = products
        .iter()
        .map(|p| {
            let a = (0..p.m * p.k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b = (0..p.k * p.n).map(|i| (i % 5) as f32 * 0.1).collect();
            (a, b, vec![0.0; p.m * p.n])
        })
        .collect();
    let flops_per_round: usize = products.iter().map(|p| 2 * p.m * p.k * p.n).sum();
    let (started, mut rounds) = (Instant::now(), 0usize);
    let mut buffers = buffers;
    while rounds == 0 || started.elapsed().as_secs_f64() < seconds {
        for (p, (a, b, out)) in products.iter().zip(&mut buffers) {
            let a = if p.a_transposed { Mat::new(a, p.k, p.m).t() } else { Mat::new(a, p.m, p.k) };
            let b = if p.b_transposed { Mat::new(b, p.n, p.k).t() } else { Mat::new(b, p.k, p.n) };
            matmul(out, a, b, 1.0, false);
        }
        rounds += 1;
    }
    (flops_per_round * rounds) as f64 / started.elapsed().as_secs_f64() / 1e9
}

/// One line of the roofline table.
#[derive(Debug, Serialize)]
pub struct Roofline {
    pub loss: String,
    pub batch_size: usize,
    pub threads: usize,
    /// [`flops_per_pair`], in MFLOP.
    pub mflop_per_pair: f64,
    /// The step's own products, back to back.
    pub step_products_gflops: f64,
    /// `step_products_gflops / flops_per_pair`: pairs/s if nothing but the products took time.
    pub products_only_pairs_per_second: f64,
    /// A large square product (1024³): about the best these kernels do on this machine.
    pub square_1024_gflops: f64,
}

pub fn measure(embedding_size: usize, batch: usize, loss: LossKind) -> Roofline {
    let flops = flops_per_pair(embedding_size, batch, loss);
    let step = gflops(&step_products(embedding_size, batch, loss), 2.0);
    let square = gflops(&[Product { m: 1024, k: 1024, n: 1024, a_transposed: false, b_transposed: false }], 2.0);
    Roofline {
        loss: loss.to_string(),
        batch_size: batch,
        threads: candle_core::utils::get_num_threads(),
        mflop_per_pair: flops / 1e6,
        step_products_gflops: step,
        products_only_pairs_per_second: step * 1e9 / flops,
        square_1024_gflops: square,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_per_pair_counts_the_encoder_and_the_contrastive_products() {
        // E = 64: 11·128 + 128·64 + 64·64 = 13,696 MACs per row; 2 rows × 3 passes × 2 FLOPs.
        assert_eq!(flops_per_pair(64, 1024, LossKind::Cosine), 164_352.0);
        assert_eq!(flops_per_pair(64, 1024, LossKind::Contrastive), 164_352.0 + 6.0 * 1024.0 * 64.0);
        // The step's products add up to the same count, per pair.
        for loss in [LossKind::Cosine, LossKind::Contrastive] {
            let total: usize = step_products(64, 1024, loss).iter().map(|p| 2 * p.m * p.k * p.n).sum();
            assert_eq!(total as f64 / 1024.0, flops_per_pair(64, 1024, loss), "{loss}");
        }
    }
}
