//! Ranking evaluation on held-out interactions (not held-out pairs).
//!
//! For every held-out (user, track): the query is the mean embedding of the user's *training* tracks;
//! all tracks are ranked by cosine to the query, excluding the user's training tracks and the user's
//! other held-out tracks (so each held-out track is judged on its own, leave-one-out style). Ties are
//! broken by track index, which is random with respect to everything else (tracks are ordered by id).
//!
//! - **Recall@10** = share of held-out (user, track) whose rank is < 10.
//! - **NDCG@10** = mean of `1 / log2(rank + 2)` over the same, 0 beyond rank 10 (one relevant item
//!   per query, so the ideal DCG is 1).
//!
//! Baselines use the same protocol: standardised raw features as embeddings, and popularity (the
//! number of training users of each track).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::pairs::UserTracks;

/// Cut-off of the ranking metrics.
pub const K: usize = 10;

/// Recall@10 and NDCG@10 over a set of held-out (user, track).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RankingMetrics {
    pub recall_at_10: f64,
    pub ndcg_at_10: f64,
    /// Held-out (user, track) evaluated.
    pub heldout: usize,
    pub users: usize,
}

/// The users to evaluate: those with held-out tracks, at most `max_users` of them (a seeded sample,
/// so that evaluation cost stays bounded on large datasets and the same users are used every epoch).
pub struct EvalSet<'a> {
    pub train: &'a UserTracks,
    pub heldout: &'a UserTracks,
    pub users: Vec<usize>,
}

impl<'a> EvalSet<'a> {
    pub fn new(train: &'a UserTracks, heldout: &'a UserTracks, max_users: usize, seed: u64) -> Self {
        let mut users: Vec<usize> = (0..heldout.num_users()).filter(|&u| !heldout.user(u).is_empty()).collect();
        if users.len() > max_users {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xE7A1_0000_0000_0003);
            for i in 0..max_users {
                let j = rng.random_range(i..users.len());
                users.swap(i, j);
            }
            users.truncate(max_users);
            users.sort_unstable();
        }
        Self { train, heldout, users }
    }

    /// Metrics for L2-normalised embeddings `[num_tracks, D]` (model output or normalised raw features).
    pub fn evaluate_embeddings(&self, embeddings: &Tensor) -> candle_core::Result<RankingMetrics> {
        const USERS_PER_CHUNK: usize = 64;
        let (n, d) = embeddings.dims2()?;
        let host: Vec<f32> = embeddings.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let on_device_t = embeddings.to_dtype(DType::F32)?.t()?.contiguous()?;
        let mut acc = Accumulator::new(n);
        for chunk in self.users.chunks(USERS_PER_CHUNK) {
            let mut queries = vec![0f32; chunk.len() * d];
            for (row, &u) in chunk.iter().enumerate() {
                let q = &mut queries[row * d..(row + 1) * d];
                for &t in self.train.user(u) {
                    for (qi, ei) in q.iter_mut().zip(&host[t as usize * d..(t as usize + 1) * d]) {
                        *qi += ei;
                    }
                }
            }
            // Cosine ranking needs only the direction of the query: no division by the count.
            let q = Tensor::from_vec(queries, (chunk.len(), d), embeddings.device())?;
            let scores: Vec<f32> = q.matmul(&on_device_t)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            for (row, &u) in chunk.iter().enumerate() {
                acc.add_user(&scores[row * n..(row + 1) * n], self.train.user(u), self.heldout.user(u));
            }
        }
        Ok(acc.finish())
    }

    /// Metrics for per-user scores: `fill(training tracks, scores)` writes one score per track.
    pub fn evaluate_user_scores(&self, num_tracks: usize, mut fill: impl FnMut(&[u32], &mut [f32])) -> RankingMetrics {
        let mut acc = Accumulator::new(num_tracks);
        let mut scores = vec![0f32; num_tracks];
        for &u in &self.users {
            scores.iter_mut().for_each(|s| *s = 0.0);
            fill(self.train.user(u), &mut scores);
            acc.add_user(&scores, self.train.user(u), self.heldout.user(u));
        }
        acc.finish()
    }

    /// Metrics for ranking every user's candidates by one global score (popularity).
    pub fn evaluate_global_scores(&self, scores: &[f32]) -> RankingMetrics {
        let mut acc = Accumulator::new(scores.len());
        for &u in &self.users {
            acc.add_user(scores, self.train.user(u), self.heldout.user(u));
        }
        acc.finish()
    }
}

/// Running sums of hits and discounted gains, plus a stamp array that marks each user's excluded
/// tracks without clearing an N-sized buffer per user.
struct Accumulator {
    stamp: Vec<u32>,
    current: u32,
    hits: f64,
    gains: f64,
    heldout: usize,
    users: usize,
}

impl Accumulator {
    fn new(num_tracks: usize) -> Self {
        Self { stamp: vec![0; num_tracks], current: 0, hits: 0.0, gains: 0.0, heldout: 0, users: 0 }
    }

    fn add_user(&mut self, scores: &[f32], train: &[u32], heldout: &[u32]) {
        self.current += 1;
        for &t in train.iter().chain(heldout) {
            self.stamp[t as usize] = self.current;
        }
        let top = top_k(scores, &self.stamp, self.current);
        for &h in heldout {
            let rank = top.iter().filter(|&&(s, j)| beats(s, j, scores[h as usize], h as usize)).count();
            if rank < K {
                self.hits += 1.0;
                self.gains += 1.0 / ((rank + 2) as f64).log2();
            }
        }
        self.heldout += heldout.len();
        self.users += 1;
    }

    fn finish(self) -> RankingMetrics {
        let n = self.heldout.max(1) as f64;
        RankingMetrics {
            recall_at_10: self.hits / n,
            ndcg_at_10: self.gains / n,
            heldout: self.heldout,
            users: self.users,
        }
    }
}

/// Candidate `(s, j)` ranks above `(sh, h)`: higher score, or the same score and a lower index.
fn beats(s: f32, j: usize, sh: f32, h: usize) -> bool {
    s > sh || (s == sh && j < h)
}

/// The K best `(score, index)` among tracks not stamped `current`, best first.
fn top_k(scores: &[f32], stamp: &[u32], current: u32) -> Vec<(f32, usize)> {
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(K + 1);
    for (j, &s) in scores.iter().enumerate() {
        if stamp[j] == current {
            continue;
        }
        if top.len() == K {
            let (ws, wj) = top[K - 1];
            if !beats(s, j, ws, wj) {
                continue;
            }
            top.pop();
        }
        let pos = top.partition_point(|&(ts, tj)| beats(ts, tj, s, j));
        top.insert(pos, (s, j));
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(users: &[&[u32]]) -> UserTracks {
        UserTracks::from_users(users.iter().copied())
    }

    #[test]
    fn perfect_and_worst_rankings() {
        // 20 tracks; user 0 trained on track 0, held out track 1.
        let train = csr(&[&[0]]);
        let heldout = csr(&[&[1]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        let mut scores = vec![0f32; 20];
        scores[1] = 5.0; // best candidate → rank 0
        let m = set.evaluate_global_scores(&scores);
        assert_eq!((m.recall_at_10, m.ndcg_at_10, m.heldout), (1.0, 1.0, 1));
        scores[1] = -1.0; // worst of 19 candidates → rank 18
        let m = set.evaluate_global_scores(&scores);
        assert_eq!((m.recall_at_10, m.ndcg_at_10), (0.0, 0.0));
    }

    #[test]
    fn rank_counts_only_non_excluded_and_discounts() {
        // Tracks 0..30 scored by index descending (track 29 best). User trains on 29, 28; holds out
        // 20 and 25. For 25: better non-excluded candidates are 27, 26 (29, 28 train; 25 itself) → rank 2.
        // For 20: 27, 26, 24, 23, 22, 21 (25 is the other held-out track, excluded) → rank 6.
        let train = csr(&[&[28, 29]]);
        let heldout = csr(&[&[20, 25]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        let scores: Vec<f32> = (0..30).map(|i| i as f32).collect();
        let m = set.evaluate_global_scores(&scores);
        let expected_ndcg = (1.0 / 4f64.log2() + 1.0 / 8f64.log2()) / 2.0;
        assert_eq!(m.recall_at_10, 1.0);
        assert!((m.ndcg_at_10 - expected_ndcg).abs() < 1e-12);
    }

    #[test]
    fn ties_are_broken_by_index() {
        let train = csr(&[&[0]]);
        let heldout = csr(&[&[15]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        // All equal: 14 candidates (1..15) have a lower index → rank 13 → miss.
        assert_eq!(set.evaluate_global_scores(&[1.0; 40]).recall_at_10, 0.0);
        let heldout = csr(&[&[5]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        // Candidates 1..5 rank above → rank 4 → hit.
        assert_eq!(set.evaluate_global_scores(&[1.0; 40]).recall_at_10, 1.0);
    }

    #[test]
    fn embedding_queries_use_the_mean_of_training_tracks() {
        // 2-d embeddings: tracks 0,1 near (1,0); track 2 near (0,1); 12 distractors on (−1, 0).
        let mut rows = vec![[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0]];
        rows.extend(std::iter::repeat_n([-1.0, 0.0], 12));
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let emb = crate::model::l2_normalize(&Tensor::from_vec(flat, (15, 2), &Device::Cpu).unwrap()).unwrap();
        let train = csr(&[&[0], &[2]]);
        let heldout = csr(&[&[1], &[1]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        let m = set.evaluate_embeddings(&emb).unwrap();
        // User 0 ranks track 1 first; user 1's query (0,1) puts track 1 (0.9, 0.1) at rank 0 too,
        // since the distractors point away: both hit, both rank 0.
        assert_eq!((m.recall_at_10, m.users, m.heldout), (1.0, 2, 2));
    }

    #[test]
    fn user_sample_is_bounded_and_seeded() {
        let users: Vec<Vec<u32>> = (0..50).map(|u| vec![u]).collect();
        let refs: Vec<&[u32]> = users.iter().map(|v| v.as_slice()).collect();
        let train = csr(&refs);
        let heldout = csr(&refs);
        let a = EvalSet::new(&train, &heldout, 10, 1);
        let b = EvalSet::new(&train, &heldout, 10, 1);
        assert_eq!(a.users.len(), 10);
        assert_eq!(a.users, b.users);
        assert!(a.users.windows(2).all(|w| w[0] < w[1]));
    }
}
