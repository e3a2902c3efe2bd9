//! Similar tracks: for every track, the K other tracks with the highest cosine: exact (this
//! module), or approximate by an HNSW graph ([`approximate`]) for catalogues past
//! [`AUTO_APPROXIMATE_ABOVE`] tracks or when asked ([`IndexChoice`]).
//!
//! What the platform's "similar tracks" does on every request (rank every candidate against one
//! track), done once per version. Embeddings are L2-normalised, so the cosines are `Z·Zᵀ`; that
//! matrix is never held. Rows go in blocks of [`ROW_BLOCK`], columns in tiles of [`COLUMN_TILE`]:
//! each (block, tile) is one matrix product into a scratch buffer, scanned once while each row keeps
//! its best K so far. Blocks run in parallel over all cores, so memory is the output plus one
//! `ROW_BLOCK × COLUMN_TILE` tile per thread (16 MiB).
//!
//! **Order (the tie rule):** higher cosine first; equal cosines, lower track index first. A track
//! never lists itself. Tracks that are not `eligible` (collaborative rows with no learned embedding)
//! neither get neighbours nor appear as one. A row with fewer than K candidates ends with padding:
//! index [`PADDING`], cosine −∞.
//!
//! **Determinism:** the blocks and tiles are fixed, and each block's products run on one thread, so
//! the table is the same for any number of threads. A cosine is the blocked product's f32 sum, which
//! may differ from another summation order in the last bits; two tracks whose cosines differ only
//! there may be listed in either order by two implementations.

pub mod approximate;
pub mod device;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::system::cores::on_all_cores;

pub use approximate::HnswSettings;
pub use device::exact_on_device;

use crate::training::cpu_step::kernels::{Mat, matmul_single_thread};

/// Neighbours per track unless configured.
pub const DEFAULT_K: usize = 50;
/// The index of an empty slot (a track with fewer than K candidates).
pub const PADDING: u32 = u32::MAX;
const ROW_BLOCK: usize = 512;
const COLUMN_TILE: usize = 8192;
/// Each thread's score tile (16 MiB).
pub const SCRATCH_BYTES_PER_THREAD: u64 = (ROW_BLOCK * COLUMN_TILE * 4) as u64;

/// `k` neighbours per track, best first: `indices[t*k..(t+1)*k]` and their cosines.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbours {
    pub k: usize,
    pub indices: Vec<u32>,
    pub cosines: Vec<f32>,
}

impl Neighbours {
    pub fn num_tracks(&self) -> usize {
        self.indices.len().checked_div(self.k).unwrap_or(0)
    }

    /// Whether track `t` has any neighbour (not an ineligible track, nor one without candidates).
    pub fn is_listed(&self, t: usize) -> bool {
        self.k > 0 && self.indices[t * self.k] != PADDING
    }

    /// Track `t`'s neighbours and cosines, best first, padding included.
    pub fn of(&self, t: usize) -> (&[u32], &[f32]) {
        let range = t * self.k..(t + 1) * self.k;
        (&self.indices[range.clone()], &self.cosines[range])
    }

    /// Mean Jaccard similarity of the first `at` neighbours of each track `self` and `other` both
    /// list (`other_row[t]`: track `t`'s row in `other`, with `other`'s neighbour indices mapped back
    /// through `self_row_of_other`), and how many tracks that is. `None` when no track is in both or
    /// `at` is 0.
    pub fn mean_jaccard(
        &self,
        other: &Neighbours,
        at: usize,
        other_row: impl Fn(usize) -> Option<usize>,
        self_row_of_other: impl Fn(u32) -> Option<u32>,
    ) -> Option<(f64, usize)> {
        let at = at.min(self.k).min(other.k);
        let (mut sum, mut tracks) = (0f64, 0usize);
        for t in 0..self.num_tracks() {
            let Some(o) = other_row(t) else { continue };
            let mine: Vec<u32> = self.of(t).0[..at].iter().copied().filter(|&i| i != PADDING).collect();
            let theirs: Vec<u32> =
                other.of(o).0[..at].iter().filter(|&&i| i != PADDING).filter_map(|&i| self_row_of_other(i)).collect();
            let union = mine.len() + theirs.len();
            if union == 0 {
                continue;
            }
            let both = mine.iter().filter(|i| theirs.contains(i)).count();
            sum += both as f64 / (union - both) as f64;
            tracks += 1;
        }
        (tracks > 0 && at > 0).then(|| (sum / tracks as f64, tracks))
    }
}

/// The exact top-`k` table of `embeddings` (`[n, dim]` row-major, L2-normalised), among the
/// `eligible` tracks (all when `None`). See the module documentation for the order.
pub fn exact(embeddings: &[f32], dim: usize, k: usize, eligible: Option<&[bool]>) -> Neighbours {
    exact_tiled(embeddings, dim, k, eligible, Tiles { rows: ROW_BLOCK, columns: COLUMN_TILE })
}

/// The exact top-`k` of the tracks `rows` only, against every track (one list per entry of
/// `rows`, in that order): what checks an approximate table on a sample of its tracks.
pub fn exact_of_rows(embeddings: &[f32], dim: usize, k: usize, rows: &[u32]) -> Neighbours {
    let n = embeddings.len().checked_div(dim).unwrap_or(0);
    let tile_len = ROW_BLOCK.min(rows.len()) * COLUMN_TILE.min(n);
    let blocks: Vec<(Vec<u32>, Vec<f32>)> = rows
        .par_chunks(ROW_BLOCK)
        .map_init(
            || vec![0f32; tile_len],
            |tile, chunk| {
                let queries: Vec<f32> = chunk
                    .iter()
                    .flat_map(|&t| &embeddings[t as usize * dim..(t as usize + 1) * dim])
                    .copied()
                    .collect();
                top_k_of_queries(embeddings, dim, k, &queries, |r| chunk[r] as usize, COLUMN_TILE, tile)
            },
        )
        .collect();
    let (indices, cosines): (Vec<Vec<u32>>, Vec<Vec<f32>>) = blocks.into_iter().unzip();
    Neighbours { k, indices: indices.concat(), cosines: cosines.concat() }
}

/// How the table is built: exact (`n²` cosines), approximate (an HNSW graph: [`approximate`]), or
/// exact up to [`AUTO_APPROXIMATE_ABOVE`] listed tracks and approximate beyond.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IndexChoice {
    Exact,
    Approximate,
    #[default]
    Auto,
}

/// Listed tracks above which `auto` builds the approximate table: extrapolated from 101k tracks on
/// 2 cores, the exact table (n²) and the graph (n·log n) cross near 600k, and at 1M the exact one
/// needs ~24 min against the graph's ~16 (BENCHMARKS.md; neither 1M figure is measured).
pub const AUTO_APPROXIMATE_ABOVE: usize = 1_000_000;

/// How a table was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Exact,
    /// An HNSW graph with [`HnswSettings::DEFAULT`].
    Hnsw,
}

impl IndexChoice {
    /// The method for a table of `listed` tracks.
    pub fn method(self, listed: usize) -> Method {
        match self {
            Self::Exact => Method::Exact,
            Self::Auto if listed <= AUTO_APPROXIMATE_ABOVE => Method::Exact,
            Self::Approximate | Self::Auto => Method::Hnsw,
        }
    }
}

/// The table by `choice`, on all cores, and the method that built it.
pub fn build_on_all_cores(
    embeddings: &[f32],
    dim: usize,
    k: usize,
    eligible: Option<&[bool]>,
    choice: IndexChoice,
) -> (Neighbours, Method) {
    let n = embeddings.len().checked_div(dim).unwrap_or(0);
    let method = method_for(n, eligible, choice);
    let table = on_all_cores(|| match method {
        Method::Exact => exact(embeddings, dim, k, eligible),
        Method::Hnsw => approximate::approximate(embeddings, dim, k, eligible, HnswSettings::DEFAULT),
    });
    (table, method)
}

/// The table by `choice` for embeddings on any device: an exact table of embeddings on a GPU is
/// built there ([`exact_on_device`]); otherwise on the host's cores ([`build_on_all_cores`]). The
/// method, and whether the device built it.
pub fn build(
    embeddings: &candle_core::Tensor,
    k: usize,
    eligible: Option<&[bool]>,
    choice: IndexChoice,
) -> candle_core::Result<(Neighbours, Method, bool)> {
    let (n, dim) = embeddings.dims2()?;
    if !embeddings.device().is_cpu() && method_for(n, eligible, choice) == Method::Exact {
        return Ok((exact_on_device(embeddings, k, eligible)?, Method::Exact, true));
    }
    let host: Vec<f32> =
        embeddings.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    let (table, method) = build_on_all_cores(&host, dim, k, eligible, choice);
    Ok((table, method, false))
}

/// The method `choice` gives a table of `n` tracks, of which the `eligible` ones are listed.
fn method_for(n: usize, eligible: Option<&[bool]>, choice: IndexChoice) -> Method {
    choice.method(eligible.map_or(n, |e| e.iter().filter(|&&x| x).count()))
}

/// Row block and column tile sizes (small ones in tests exercise every edge on small inputs).
#[derive(Clone, Copy)]
struct Tiles {
    rows: usize,
    columns: usize,
}

/// [`exact_tiled`] with tiles of the test's choosing (for comparisons with other builders).
#[cfg(test)]
pub(crate) fn exact_tiled_for_tests(
    embeddings: &[f32],
    dim: usize,
    k: usize,
    eligible: Option<&[bool]>,
    rows: usize,
    columns: usize,
) -> Neighbours {
    exact_tiled(embeddings, dim, k, eligible, Tiles { rows, columns })
}

fn exact_tiled(embeddings: &[f32], dim: usize, k: usize, eligible: Option<&[bool]>, tiles: Tiles) -> Neighbours {
    let n = embeddings.len().checked_div(dim).unwrap_or(0);
    assert_eq!(embeddings.len(), n * dim, "embeddings of {} values are not rows of {dim}", embeddings.len());
    let mut out = Neighbours { k, indices: vec![PADDING; n * k], cosines: vec![f32::NEG_INFINITY; n * k] };
    if k == 0 || n == 0 {
        return out;
    }
    // Only eligible rows take part: compact them, so every product is useful; compact indices
    // map back in increasing order, which keeps the tie rule.
    let rows: Vec<u32> = (0..n as u32).filter(|&t| eligible.is_none_or(|e| e[t as usize])).collect();
    let compact: std::borrow::Cow<[f32]> = match eligible {
        None => embeddings.into(),
        Some(_) => rows
            .iter()
            .flat_map(|&t| &embeddings[t as usize * dim..(t as usize + 1) * dim])
            .copied()
            .collect::<Vec<f32>>()
            .into(),
    };
    let m = rows.len();
    // One score tile per thread, reused by every block the thread takes.
    let tile_len = tiles.rows.min(m) * tiles.columns.min(m);
    let blocks: Vec<(Vec<u32>, Vec<f32>)> = (0..m.div_ceil(tiles.rows))
        .into_par_iter()
        .map_init(
            || vec![0f32; tile_len],
            |tile, b| {
                top_k_of_block(&compact, dim, k, b * tiles.rows..((b + 1) * tiles.rows).min(m), tiles.columns, tile)
            },
        )
        .collect();
    for (b, (indices, cosines)) in blocks.into_iter().enumerate() {
        for (r, (idx, cos)) in indices.chunks(k).zip(cosines.chunks(k)).enumerate() {
            let t = rows[b * tiles.rows + r] as usize;
            for (slot, (&i, &c)) in idx.iter().zip(cos).enumerate() {
                if i != PADDING {
                    out.indices[t * k + slot] = rows[i as usize];
                    out.cosines[t * k + slot] = c;
                }
            }
        }
    }
    out
}

/// The best `k` (compact indices, cosines) of rows `block` of `z` (`[m, dim]`), padded.
fn top_k_of_block(
    z: &[f32],
    dim: usize,
    k: usize,
    block: std::ops::Range<usize>,
    column_tile: usize,
    tile: &mut [f32],
) -> (Vec<u32>, Vec<f32>) {
    let queries = &z[block.start * dim..block.end * dim];
    top_k_of_queries(z, dim, k, queries, |r| block.start + r, column_tile, tile)
}

/// The best `k` (rows of `z`, cosines) of each row of `queries`, padded; query `r` is row `own(r)`
/// of `z`, which it never lists.
fn top_k_of_queries(
    z: &[f32],
    dim: usize,
    k: usize,
    queries: &[f32],
    own: impl Fn(usize) -> usize,
    column_tile: usize,
    tile: &mut [f32],
) -> (Vec<u32>, Vec<f32>) {
    let m = z.len() / dim;
    let rows = queries.len() / dim;
    let mut best = vec![TopK::new(k); rows];
    let queries = Mat::new(queries, rows, dim);
    for start in (0..m).step_by(column_tile) {
        let cols = column_tile.min(m - start);
        let scores = &mut tile[..rows * cols];
        matmul_single_thread(scores, queries, Mat::new(&z[start * dim..(start + cols) * dim], cols, dim).t());
        for (r, row) in scores.chunks_mut(cols).enumerate() {
            let own = own(r);
            if (start..start + cols).contains(&own) {
                row[own - start] = f32::NEG_INFINITY;
            }
            best[r].scan(row, start as u32);
        }
    }
    let (mut indices, mut cosines) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    for top in best {
        indices.extend(top.indices.iter().copied().chain(std::iter::repeat(PADDING)).take(k));
        cosines.extend(top.cosines.iter().copied().chain(std::iter::repeat(f32::NEG_INFINITY)).take(k));
    }
    (indices, cosines)
}

/// One row's best `k` so far, best first; columns arrive in increasing index order, so an equal
/// cosine arriving later (a higher index) goes after those already kept.
#[derive(Clone)]
struct TopK {
    k: usize,
    indices: Vec<u32>,
    cosines: Vec<f32>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self { k, indices: Vec::with_capacity(k), cosines: Vec::with_capacity(k) }
    }

    fn scan(&mut self, scores: &[f32], first_index: u32) {
        let mut threshold = self.threshold();
        for (j, &s) in scores.iter().enumerate() {
            // −∞ (the track itself) and NaN never pass: neither is greater than anything.
            if s > threshold {
                self.insert(s, first_index + j as u32);
                threshold = self.threshold();
            }
        }
    }

    fn threshold(&self) -> f32 {
        if self.cosines.len() < self.k { f32::NEG_INFINITY } else { self.cosines[self.k - 1] }
    }

    fn insert(&mut self, cosine: f32, index: u32) {
        let at = self.cosines.partition_point(|&c| c >= cosine);
        if self.cosines.len() == self.k {
            self.cosines.pop();
            self.indices.pop();
        }
        self.cosines.insert(at, cosine);
        self.indices.insert(at, index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The definition: every other eligible track, sorted by (cosine desc, index asc), cosines in f64.
    pub(super) fn brute_force(z: &[f32], dim: usize, k: usize, eligible: Option<&[bool]>) -> Vec<Vec<(u32, f64)>> {
        let n = z.len() / dim;
        let ok = |t: usize| eligible.is_none_or(|e| e[t]);
        (0..n)
            .map(|i| {
                if !ok(i) {
                    return Vec::new();
                }
                let mut all: Vec<(u32, f64)> = (0..n)
                    .filter(|&j| j != i && ok(j))
                    .map(|j| {
                        let dot = (0..dim).map(|d| z[i * dim + d] as f64 * z[j * dim + d] as f64).sum();
                        (j as u32, dot)
                    })
                    .collect();
                all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                all.truncate(k);
                all
            })
            .collect()
    }

    pub(super) fn normalised(n: usize, dim: usize, rng: &mut ChaCha8Rng, grid: bool) -> Vec<f32> {
        let mut z = Vec::with_capacity(n * dim);
        for _ in 0..n {
            // On a grid of quarters with four non-zeros of ±1/2 the cosines are exact in f32 in any
            // summation order, so ties are real ties; otherwise uniform directions.
            let row: Vec<f32> = if grid {
                let mut row = vec![0f32; dim];
                for _ in 0..4 {
                    let d = rng.random_range(0..dim);
                    row[d] = if rng.random_bool(0.5) { 0.5 } else { -0.5 };
                }
                row
            } else {
                (0..dim).map(|_| rng.random_range(-1f32..1.0)).collect()
            };
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            z.extend(row.iter().map(|x| if grid { *x } else { x / norm }));
        }
        z
    }

    pub(super) fn assert_matches(got: &Neighbours, want: &[Vec<(u32, f64)>], exact_ties: bool) {
        for (t, want) in want.iter().enumerate() {
            let (idx, cos) = got.of(t);
            for (slot, (&i, &c)) in idx.iter().zip(cos).enumerate() {
                match want.get(slot) {
                    None => assert!(i == PADDING && c == f32::NEG_INFINITY, "track {t} slot {slot}: {i} {c}"),
                    Some(&(wi, wc)) => {
                        assert!((c as f64 - wc).abs() < 1e-5, "track {t} slot {slot}: cosine {c} vs {wc}");
                        if exact_ties {
                            assert_eq!(i, wi, "track {t} slot {slot}: cosine {c}");
                        } else {
                            // Uniform directions: the index must match unless its cosine ties the
                            // wanted one to float precision.
                            let theirs = want.iter().find(|(j, _)| *j == i).map(|w| w.1);
                            assert!(
                                i == wi || theirs.is_some_and(|x| (x - wc).abs() < 1e-5),
                                "track {t} slot {slot}: {i} vs {wi}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_brute_force_across_blocks_and_tiles_with_exact_ties_by_index() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, dim, k) = (1_300, 8, 10);
        let z = normalised(n, dim, &mut rng, true);
        let want = brute_force(&z, dim, k, None);
        let got = exact(&z, dim, k, None);
        assert_matches(&got, &want, true);
        // Small tiles: many blocks and tiles, none of them full at the edges; the same table.
        let small = exact_tiled(&z, dim, k, None, Tiles { rows: 37, columns: 101 });
        assert_eq!(small, got);
        // The grid has many exact ties: the rule is visible.
        let tied = (0..n).filter(|&t| got.of(t).1.windows(2).any(|w| w[0] == w[1])).count();
        assert!(tied > n / 2, "only {tied} tracks had tied neighbours");
    }

    #[test]
    fn matches_brute_force_on_uniform_directions() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (n, dim, k) = (700, 16, 25);
        let z = normalised(n, dim, &mut rng, false);
        assert_matches(&exact(&z, dim, k, None), &brute_force(&z, dim, k, None), false);
    }

    #[test]
    fn ineligible_tracks_are_neither_listed_nor_given_neighbours_and_short_rows_are_padded() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (n, dim) = (40, 4);
        let z = normalised(n, dim, &mut rng, true);
        let eligible: Vec<bool> = (0..n).map(|t| t % 3 != 0).collect();
        // 26 eligible tracks, 25 candidates each: K = 30 leaves 5 padded slots.
        let got = exact(&z, dim, 30, Some(&eligible));
        assert_matches(&got, &brute_force(&z, dim, 30, Some(&eligible)), true);
        for t in 0..n {
            let (idx, _) = got.of(t);
            assert!(idx.iter().all(|&i| i == PADDING || eligible[i as usize]), "track {t} lists an ineligible track");
            let listed = idx.iter().filter(|&&i| i != PADDING).count();
            assert_eq!(listed, if eligible[t] { 25 } else { 0 }, "track {t}");
        }
    }

    #[test]
    fn the_table_does_not_depend_on_the_thread_count() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let z = normalised(1_100, 12, &mut rng, false);
        let pool = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        let one = pool(1).install(|| exact(&z, 12, 7, None));
        let three = pool(3).install(|| exact(&z, 12, 7, None));
        assert_eq!(one, three);
    }

    #[test]
    fn jaccard_counts_shared_neighbours_through_the_row_maps() {
        let a = Neighbours { k: 2, indices: vec![1, 2, 0, 2, 0, 1], cosines: vec![0.0; 6] };
        // `b` lists the same tracks in reverse row order: row r of b is track 2 − r of a.
        let b = Neighbours { k: 2, indices: vec![1, 2, 2, 0, 1, PADDING], cosines: vec![0.0; 6] };
        let map = |r: u32| Some(2 - r);
        // Track 0: {1,2} vs b row 2 → {1} → a-tracks {1}: 1/2. Track 1: {0,2} vs b row 1 {2,0} →
        // {0,2}: 1. Track 2: {0,1} vs b row 0 {1,2} → {1,0}: 1.
        let (j, tracks) = a.mean_jaccard(&b, 2, |t| Some(2 - t), map).expect("tracks in both");
        assert!((j - (0.5 + 1.0 + 1.0) / 3.0).abs() < 1e-12, "{j}");
        assert_eq!(tracks, 3);
        assert_eq!(a.mean_jaccard(&b, 2, |_| None, map), None);
    }

    #[test]
    fn auto_is_exact_up_to_the_threshold_and_approximate_past_it() {
        assert_eq!(IndexChoice::Auto.method(AUTO_APPROXIMATE_ABOVE), Method::Exact);
        assert_eq!(IndexChoice::Auto.method(AUTO_APPROXIMATE_ABOVE + 1), Method::Hnsw);
        assert_eq!(IndexChoice::Exact.method(usize::MAX), Method::Exact);
        assert_eq!(IndexChoice::Approximate.method(2), Method::Hnsw);
    }
}
