//! The exact table with its products and its selection on the embeddings' device (a GPU): each
//! block of [`ROW_BLOCK`] rows times each tile of [`COLUMN_TILE`] columns is one matrix product,
//! sorted there row by row (candle's `arg_sort_last_dim`, one thread block per row on CUDA, which
//! holds a tile of this width in shared memory); only each row's best `k + 1` of the tile come
//! back to the host, `(k + 1) / COLUMN_TILE` of the scores, where they are merged in index order by
//! the same [`TopK`] the CPU table uses.
//!
//! What holds against [`super::exact`]: the same cosines at every slot to float precision (the
//! device sums in its own order); the same tracks except among cosines that tie, where the
//! device's sort may keep a higher index than the tie rule would at a tile's last kept place.

use candle_core::{DType, Device, Tensor};

use super::{Neighbours, PADDING, TopK};

/// Rows per product: the `[ROW_BLOCK, COLUMN_TILE]` score tile is 16 MiB of device memory.
const ROW_BLOCK: usize = 1024;
/// Columns per product and sort: a row of the tile is 16 KiB, inside a CUDA block's shared memory.
const COLUMN_TILE: usize = 4096;

/// The exact top-`k` table of `embeddings` (`[n, dim]`, L2-normalised, on any device) among the
/// `eligible` tracks, computed on that device; see the module documentation for what matches the
/// CPU table.
pub fn exact_on_device(embeddings: &Tensor, k: usize, eligible: Option<&[bool]>) -> candle_core::Result<Neighbours> {
    exact_tiled_on_device(embeddings, k, eligible, ROW_BLOCK, COLUMN_TILE)
}

fn exact_tiled_on_device(
    embeddings: &Tensor,
    k: usize,
    eligible: Option<&[bool]>,
    row_block: usize,
    column_tile: usize,
) -> candle_core::Result<Neighbours> {
    let (n, _) = embeddings.dims2()?;
    let mut out = Neighbours { k, indices: vec![PADDING; n * k], cosines: vec![f32::NEG_INFINITY; n * k] };
    if let Some(eligible) = eligible
        && eligible.len() != n
    {
        candle_core::bail!("{} eligibility flags for {n} tracks", eligible.len());
    }
    if k == 0 || n == 0 {
        return Ok(out);
    }
    let device = embeddings.device();
    // Only eligible rows take part, compacted; compact indices map back in increasing order.
    let rows: Vec<u32> = (0..n as u32).filter(|&t| eligible.is_none_or(|e| e[t as usize])).collect();
    let z = embeddings.to_dtype(DType::F32)?;
    let z = match eligible {
        None => z,
        Some(_) => z.index_select(&Tensor::from_vec(rows.clone(), rows.len(), device)?, 0)?,
    };
    let m = rows.len();
    if m == 0 {
        return Ok(out);
    }
    for block_start in (0..m).step_by(row_block) {
        let r = row_block.min(m - block_start);
        let queries = z.narrow(0, block_start, r)?;
        let mut best = vec![TopK::new(k); r];
        for tile_start in (0..m).step_by(column_tile) {
            let c = column_tile.min(m - tile_start);
            let tile = z.narrow(0, tile_start, c)?.t()?.contiguous()?;
            let scores = queries.matmul(&tile)?;
            // k + 1: the row's own track may be among the best of its tile.
            let take = (k + 1).min(c);
            let order = scores.arg_sort_last_dim(false)?.narrow(1, 0, take)?.contiguous()?;
            let top = scores.gather(&order, 1)?;
            let order = to_host::<u32>(&order)?;
            let top = to_host::<f32>(&top)?;
            let mut kept: Vec<(u32, f32)> = Vec::with_capacity(take);
            for (row, best) in best.iter_mut().enumerate() {
                let own = (block_start + row) as u32;
                kept.clear();
                let range = row * take..(row + 1) * take;
                kept.extend(
                    order[range.clone()]
                        .iter()
                        .map(|&j| tile_start as u32 + j)
                        .zip(top[range].iter().copied())
                        .filter(|&(j, _)| j != own),
                );
                // TopK keeps ties in arrival order: arrivals by increasing index give the tie rule.
                kept.sort_unstable_by_key(|&(j, _)| j);
                // NaN never passes the threshold (it is greater than nothing), as in `TopK::scan`.
                for &(j, cosine) in &kept {
                    if cosine > best.threshold() {
                        best.insert(cosine, j);
                    }
                }
            }
        }
        for (row, top) in best.into_iter().enumerate() {
            let t = rows[block_start + row] as usize;
            for (slot, (&i, &cosine)) in top.indices.iter().zip(&top.cosines).enumerate() {
                out.indices[t * k + slot] = rows[i as usize];
                out.cosines[t * k + slot] = cosine;
            }
        }
    }
    Ok(out)
}

fn to_host<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::neighbours::tests::{assert_matches, brute_force, normalised};
    use crate::training::neighbours::{exact, exact_tiled_for_tests};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn tensor(z: &[f32], dim: usize) -> Tensor {
        Tensor::from_vec(z.to_vec(), (z.len() / dim, dim), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn the_device_table_matches_brute_force_across_blocks_and_tiles() {
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        let (n, dim, k) = (900, 16, 12);
        let z = normalised(n, dim, &mut rng, false);
        let want = brute_force(&z, dim, k, None);
        // Blocks and tiles that do not divide the catalogue; the last tile (10 columns) is narrower
        // than k + 1.
        let got = exact_tiled_on_device(&tensor(&z, dim), k, None, 128, 89).expect("device table");
        assert_matches(&got, &want, false);
        let whole = exact_on_device(&tensor(&z, dim), k, None).expect("device table");
        assert_matches(&whole, &want, false);
        assert_eq!(whole.indices, exact(&z, dim, k, None).indices, "uniform directions have no ties to break");
    }

    #[test]
    fn the_device_table_lists_the_cpu_tables_cosines_on_a_grid_full_of_ties() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let (n, dim, k) = (600, 8, 10);
        let z = normalised(n, dim, &mut rng, true);
        let cpu = exact_tiled_for_tests(&z, dim, k, None, 64, 50);
        let device = exact_tiled_on_device(&tensor(&z, dim), k, None, 64, 50).expect("device table");
        assert_eq!(device.cosines, cpu.cosines);
        assert_matches(&device, &brute_force(&z, dim, k, None), false);
    }

    #[test]
    fn ineligible_tracks_are_left_out_on_the_device_too() {
        let mut rng = ChaCha8Rng::seed_from_u64(18);
        let (n, dim) = (50, 4);
        let z = normalised(n, dim, &mut rng, false);
        let eligible: Vec<bool> = (0..n).map(|t| t % 4 != 1).collect();
        // 37 eligible tracks, 36 candidates each: K = 40 leaves 4 padded slots.
        let got = exact_tiled_on_device(&tensor(&z, dim), 40, Some(&eligible), 16, 16).expect("device table");
        assert_matches(&got, &brute_force(&z, dim, 40, Some(&eligible)), false);
        for t in 0..n {
            let (idx, _) = got.of(t);
            let listed = idx.iter().filter(|&&i| i != PADDING).count();
            assert_eq!(listed, if eligible[t] { 36 } else { 0 }, "track {t}");
            assert!(idx.iter().all(|&i| i == PADDING || eligible[i as usize]), "track {t} lists an ineligible track");
        }
        let wrong = exact_on_device(&tensor(&z, dim), 5, Some(&eligible[..10])).expect_err("flags of the wrong length");
        assert!(wrong.to_string().contains("10 eligibility flags for 50 tracks"), "{wrong}");
    }
}
