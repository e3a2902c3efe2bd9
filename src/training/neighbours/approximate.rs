//! Similar tracks, approximately: an HNSW graph (the maintained `hnsw_rs` crate) for catalogues
//! where the exact table's `n²` cosines take too long.
//!
//! The exact table costs `n² · E` multiply-adds: 12–13 s for 100k tracks on 2 cores, so ~21 min
//! for 1M and ~35 h for 10M. An HNSW graph costs about `n · log n` distance evaluations to build
//! and to query, and finds most, not all, of each track's true nearest tracks: how many is
//! measured against the exact table by `bench-neighbours --index approximate` (its recall@10 on
//! sampled tracks) and reported there, in BENCHMARKS.md.
//!
//! The table has the exact table's layout and order: each track's neighbours (the graph's
//! candidates, the track itself dropped) are ranked by their cosine recomputed here, higher first,
//! ties to the lower index, padding after. What differs is which tracks are found: a true
//! neighbour the graph misses is absent, and the list goes on with the next one it found.
//!
//! **Determinism:** the graph is built by inserting tracks from several threads at once, so two
//! builds of the same embeddings may link it differently and list a few tracks differently. A
//! table that must be the same bit for bit on every run is the exact one.

use hnsw_rs::prelude::{Distance, Hnsw};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Neighbours, PADDING};

/// The graph's settings: links per node, and the candidate lists kept while building and searching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswSettings {
    /// Links per node and layer (HNSW's `M`); layer 0 keeps twice as many.
    pub connections: usize,
    /// Candidates kept while inserting a node (`ef_construction`).
    pub ef_construction: usize,
    /// Candidates kept while searching (`ef`); at least K + 1.
    pub ef_search: usize,
}

impl HnswSettings {
    /// Values from the HNSW paper's range for low-dimensional embeddings (M 16–48, ef_construction
    /// 100–400), chosen before measuring: the recall they give is in BENCHMARKS.md.
    pub const DEFAULT: Self = Self { connections: 24, ef_construction: 200, ef_search: 128 };
}

/// The approximate top-`k` table of `embeddings` (`[n, dim]` row-major, L2-normalised) among the
/// `eligible` tracks (all when `None`), on the current rayon pool.
pub fn approximate(
    embeddings: &[f32],
    dim: usize,
    k: usize,
    eligible: Option<&[bool]>,
    settings: HnswSettings,
) -> Neighbours {
    let n = embeddings.len().checked_div(dim).unwrap_or(0);
    assert_eq!(embeddings.len(), n * dim, "embeddings of {} values are not rows of {dim}", embeddings.len());
    let mut out = Neighbours { k, indices: vec![PADDING; n * k], cosines: vec![f32::NEG_INFINITY; n * k] };
    let rows: Vec<u32> = (0..n as u32).filter(|&t| eligible.is_none_or(|e| e[t as usize])).collect();
    if k == 0 || rows.len() < 2 {
        return out;
    }
    let row = |t: u32| &embeddings[t as usize * dim..(t as usize + 1) * dim];
    // Layers: the graph's height grows as log(n); hnsw_rs caps it at 16.
    let layers = 16.min((rows.len() as f64).ln().ceil() as usize).max(1);
    let mut graph = Hnsw::<f32, OneMinusCosine>::new(
        settings.connections,
        rows.len(),
        layers,
        settings.ef_construction,
        OneMinusCosine,
    );
    let points: Vec<(&[f32], usize)> = rows.iter().map(|&t| (row(t), t as usize)).collect();
    graph.parallel_insert_slice(&points);
    graph.set_searching_mode(true);
    // One more than K: the track itself is normally its own first hit.
    let ef = settings.ef_search.max(k + 1);
    let lists: Vec<Vec<(f32, u32)>> = rows
        .par_iter()
        .map(|&t| {
            let query = row(t);
            let mut found: Vec<(f32, u32)> = graph
                .search(query, k + 1, ef)
                .into_iter()
                .map(|hit| hit.d_id as u32)
                .filter(|&j| j != t)
                .map(|j| (dot(query, row(j)), j))
                .collect();
            found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            found.truncate(k);
            found
        })
        .collect();
    for (&t, list) in rows.iter().zip(lists) {
        for (slot, (cosine, j)) in list.into_iter().enumerate() {
            out.indices[t as usize * k + slot] = j;
            out.cosines[t as usize * k + slot] = cosine;
        }
    }
    out
}

/// `1 − cos`, floored at 0. (hnsw_rs's own `DistDot` asserts `1 − a·b ≥ 0`, which the dot of a
/// normalised f32 row with itself can break by an ulp.)
struct OneMinusCosine;

impl Distance<f32> for OneMinusCosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Recall@`at` of `approx` against `truth` over the tracks `rows`: the share of each track's first
/// `at` exact neighbours (padding excluded) that `approx` lists among its first `at`. `truth` has
/// one list per entry of `rows`, in that order ([`super::exact_of_rows`]).
pub fn recall(approx: &Neighbours, truth: &Neighbours, rows: &[u32], at: usize) -> f64 {
    let at = at.min(approx.k).min(truth.k);
    let (mut found, mut wanted) = (0usize, 0usize);
    for (r, &t) in rows.iter().enumerate() {
        let exact: Vec<u32> = truth.of(r).0[..at].iter().copied().filter(|&i| i != PADDING).collect();
        let listed = &approx.of(t as usize).0[..at];
        found += exact.iter().filter(|i| listed.contains(i)).count();
        wanted += exact.len();
    }
    if wanted == 0 { 1.0 } else { found as f64 / wanted as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::neighbours::{exact, exact_of_rows};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    /// `n` rows near `clusters` random directions (as trained embeddings are: tracks gather by
    /// genre and artist), L2-normalised.
    fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut normal = || -> f32 { StandardNormal.sample(&mut rng) };
        let centres: Vec<f32> = (0..clusters * dim).map(|_| normal()).collect();
        let mut z = Vec::with_capacity(n * dim);
        for t in 0..n {
            let c = t % clusters;
            let row: Vec<f32> = (0..dim).map(|d| centres[c * dim + d] + 0.5 * normal()).collect();
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            z.extend(row.iter().map(|x| x / norm));
        }
        z
    }

    #[test]
    fn finds_almost_every_exact_neighbour_in_the_exact_tables_order() {
        let (n, dim, k) = (3000, 16, 10);
        let z = clustered(n, dim, 30, 3);
        let truth = exact(&z, dim, k, None);
        let all: Vec<u32> = (0..n as u32).collect();
        assert_eq!(exact_of_rows(&z, dim, k, &all), truth, "the sampled exact lists are the table's");
        let table = approximate(&z, dim, k, None, HnswSettings::DEFAULT);
        let r = recall(&table, &truth, &all, k);
        assert!(r >= 0.99, "recall@10 {r}");
        for t in 0..n {
            let (indices, cosines) = table.of(t);
            assert!(!indices.contains(&(t as u32)), "track {t} lists itself");
            assert!(indices.iter().all(|&i| i != PADDING), "track {t} has padding among 3,000 tracks");
            assert!(cosines.windows(2).all(|w| w[0] >= w[1]), "track {t}: cosines out of order");
            for (&i, &c) in indices.iter().zip(cosines) {
                assert_eq!(c, dot(&z[t * dim..(t + 1) * dim], &z[i as usize * dim..(i as usize + 1) * dim]));
            }
        }
    }

    #[test]
    fn lists_only_eligible_tracks_and_pads_short_lists() {
        let (n, dim, k) = (400, 8, 5);
        let z = clustered(n, dim, 4, 9);
        let eligible: Vec<bool> = (0..n).map(|t| t % 3 != 0).collect();
        let table = approximate(&z, dim, k, Some(&eligible), HnswSettings::DEFAULT);
        for t in 0..n {
            let (indices, _) = table.of(t);
            if eligible[t] {
                assert!(indices.iter().all(|&i| i != PADDING && eligible[i as usize]), "track {t}: {indices:?}");
            } else {
                assert!(!table.is_listed(t) && indices.iter().all(|&i| i == PADDING));
            }
        }
        // Two eligible tracks: each is the other's only neighbour.
        let two: Vec<bool> = (0..n).map(|t| t == 7 || t == 11).collect();
        let table = approximate(&z, dim, k, Some(&two), HnswSettings::DEFAULT);
        assert_eq!(table.of(7).0, &[11, PADDING, PADDING, PADDING, PADDING]);
        assert_eq!(table.of(11).0, &[7, PADDING, PADDING, PADDING, PADDING]);
    }

    #[test]
    fn recall_counts_the_exact_neighbours_found() {
        let approx = Neighbours { k: 2, indices: vec![2, 3, 0, 2, 1, PADDING], cosines: vec![0.0; 6] };
        // Track 0: 1 of 2; track 1: 2 of 2; track 2: 0 of 1 (padding is not a neighbour).
        let truth = Neighbours { k: 2, indices: vec![1, 2, 0, 2, 0, PADDING], cosines: vec![0.0; 6] };
        assert!((recall(&approx, &truth, &[0, 1, 2], 2) - 3.0 / 5.0).abs() < 1e-12);
        // Lists in sample order: track 1 alone.
        let truth = Neighbours { k: 2, indices: vec![0, 2], cosines: vec![0.0; 2] };
        assert!((recall(&approx, &truth, &[1], 1) - 1.0).abs() < 1e-12);
    }
}
