//! Ranking evaluation on held-out interactions (not held-out pairs).
//!
//! For every held-out (user, track): the query is the mean embedding of the user's *training* tracks;
//! all tracks are ranked by cosine to the query, excluding the user's training tracks and the user's
//! other held-out tracks (so each held-out track is judged on its own, leave-one-out style). Ties are
//! broken by track index, which is random with respect to everything else (tracks are ordered by id).
//!
//! - **Recall@10** = share of held-out (user, track) whose rank is < 10.
//! - **Standard error of Recall@10** = `sqrt(p·(1 − p) / n)` with `p` the Recall@10 and `n` the number of
//!   held-out (user, track), 0 when `n = 0`: each held-out pair is treated as one Bernoulli trial (hit or
//!   miss). A user's held-out pairs share one query and are not quite independent, so it is the scale of
//!   the sampling noise when two figures are compared, not an exact interval.
//! - **NDCG@10** = mean of `1 / log2(rank + 2)` over the same, 0 beyond rank 10 (one relevant item
//!   per query, so the ideal DCG is 1).
//!
//! Baselines use the same protocol (same users, same exclusions, same tie-breaking):
//!
//! - **raw features**: standardised raw features as embeddings;
//! - **popularity**: the number of training users of each track;
//! - **item-based collaborative filtering** ([`EvalSet::evaluate_item_cf`]): a track's score is the sum,
//!   over the user's training tracks `i`, of the cosine similarity of the two tracks' sets of training
//!   users, `cooc(i, j) / sqrt(cnt(i)·cnt(j))`;
//! - **shared artist** ([`EvalSet::evaluate_shared_labels`]): a track's score is the number of the
//!   user's training tracks that credit one of its artists;
//! - **random** ([`EvalSet::evaluate_random`]): seeded uniform scores, whose expected Recall@10 is
//!   `10 / candidates`, the floor any model must clear.
//!
//! An older model whose catalogue differs from today's is scored with
//! [`EvalSet::evaluate_embeddings_known`]: tracks it does not know add nothing to the queries and rank
//! last, so a held-out pair on such a track is a miss and the figure stays comparable.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::training::cpu_step::kernels::{Mat, matmul_single_thread};
use crate::training::pairs::UserTracks;

/// Cut-off of the ranking metrics.
pub const K: usize = 10;
/// Users scored per product in the embedding evaluation (each chunk's scores: this many × tracks).
pub const USERS_PER_CHUNK: usize = 64;

/// Recall@10 and NDCG@10 over a set of held-out (user, track).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RankingMetrics {
    pub recall_at_10: f64,
    /// Standard error of `recall_at_10`: each held-out (user, track) is a Bernoulli trial, so
    /// `sqrt(p·(1 − p) / heldout)` with `p = recall_at_10`, and 0 when nothing was held out. It ignores
    /// that one user's held-out pairs share a query, so it slightly understates the noise. Metadata
    /// written before this field existed reads as 0.
    #[serde(default)]
    pub recall_at_10_se: f64,
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
    /// When set, only these tracks are ranked (the cold-start evaluation: the cold tracks).
    candidates: Option<&'a [bool]>,
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
        Self { train, heldout, users, candidates: None }
    }

    /// The same users, ranking only the tracks `candidates` marks (every held-out track must be one).
    pub fn only_candidates(self, candidates: &'a [bool]) -> Self {
        Self { candidates: Some(candidates), ..self }
    }

    fn accumulator(&self, num_tracks: usize) -> Accumulator<'a> {
        Accumulator::new(num_tracks, self.candidates)
    }

    /// Metrics for L2-normalised embeddings `[num_tracks, D]` (model output or normalised raw features).
    pub fn evaluate_embeddings(&self, embeddings: &Tensor) -> candle_core::Result<RankingMetrics> {
        self.evaluate_embeddings_masked(embeddings, None)
    }

    /// Metrics for an older model's L2-normalised embeddings `[num_tracks, D]` when its catalogue
    /// differs from today's: `known[j]` says whether the model knows track `j` (rows of unknown tracks
    /// may be zeros, or anything). Unknown tracks add nothing to a user's query and score −∞, so they
    /// rank last: a held-out pair on a track the model never saw is a miss, as it would be in
    /// production, and the figure is comparable with that of a model that knows every track.
    pub fn evaluate_embeddings_known(
        &self,
        embeddings: &Tensor,
        known: &[bool],
    ) -> candle_core::Result<RankingMetrics> {
        self.evaluate_embeddings_masked(embeddings, Some(known))
    }

    /// The one implementation behind [`Self::evaluate_embeddings`] (`known = None`: every track is
    /// known) and [`Self::evaluate_embeddings_known`].
    ///
    /// On the CPU, users are scored in parallel in fixed chunks (a single-threaded product per chunk
    /// into that thread's own score tile, then the top-K scan), merged in order, so the figures do not
    /// depend on the number of threads. The scan is most of the work (every track, for every user):
    /// done on one thread behind a parallel product, it made this evaluation — run every epoch —
    /// most of a warm epoch's time. On another device the product runs there, chunk by chunk.
    fn evaluate_embeddings_masked(
        &self,
        embeddings: &Tensor,
        known: Option<&[bool]>,
    ) -> candle_core::Result<RankingMetrics> {
        let (n, d) = embeddings.dims2()?;
        if let Some(known) = known
            && known.len() != n
        {
            candle_core::bail!("known has {} entries for {n} embedding rows", known.len());
        }
        let host: Vec<f32> = embeddings.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        if !embeddings.device().is_cpu() {
            return self.evaluate_on_device(embeddings, &host, known);
        }
        let tracks = Mat::new(&host, n, d).t();
        let parts: Vec<Accumulator> = self
            .users
            .par_chunks(USERS_PER_CHUNK)
            .map_init(Vec::new, |scores: &mut Vec<f32>, chunk| {
                let queries = self.queries(chunk, &host, d, known);
                scores.resize(chunk.len() * n, 0.0);
                matmul_single_thread(scores, Mat::new(&queries, chunk.len(), d), tracks);
                let mut acc = self.accumulator(n);
                for (row, &u) in chunk.iter().enumerate() {
                    self.add_scored_user(&mut acc, &mut scores[row * n..(row + 1) * n], u, known);
                }
                acc
            })
            .collect();
        Ok(parts.into_iter().reduce(Accumulator::merge).unwrap_or_else(|| self.accumulator(0)).finish())
    }

    /// [`Self::evaluate_embeddings_masked`] with the product on the embeddings' device (a GPU).
    fn evaluate_on_device(
        &self,
        embeddings: &Tensor,
        host: &[f32],
        known: Option<&[bool]>,
    ) -> candle_core::Result<RankingMetrics> {
        let (n, d) = embeddings.dims2()?;
        let on_device_t = embeddings.to_dtype(DType::F32)?.t()?.contiguous()?;
        let mut acc = self.accumulator(n);
        for chunk in self.users.chunks(USERS_PER_CHUNK) {
            let q = Tensor::from_vec(self.queries(chunk, host, d, known), (chunk.len(), d), embeddings.device())?;
            let mut scores: Vec<f32> = q.matmul(&on_device_t)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            for (row, &u) in chunk.iter().enumerate() {
                self.add_scored_user(&mut acc, &mut scores[row * n..(row + 1) * n], u, known);
            }
        }
        Ok(acc.finish())
    }

    /// The queries of `users`, `[users, d]` row-major: each the sum of the rows of `host` of the
    /// user's training tracks that the model knows (cosine ranking needs only the direction).
    fn queries(&self, users: &[usize], host: &[f32], d: usize, known: Option<&[bool]>) -> Vec<f32> {
        let mut queries = vec![0f32; users.len() * d];
        for (row, &u) in users.iter().enumerate() {
            add_query(&mut queries[row * d..(row + 1) * d], host, self.train.user(u), known);
        }
        queries
    }

    /// Ranks user `u` by `scores` (tracks the model does not know first set to −∞) into `acc`.
    fn add_scored_user(&self, acc: &mut Accumulator, scores: &mut [f32], u: usize, known: Option<&[bool]>) {
        if let Some(known) = known {
            mask_unknown(scores, known);
        }
        acc.add_user(scores, self.train.user(u), self.heldout.user(u));
    }

    /// Metrics for per-user scores: `fill(training tracks, scores)` writes one score per track.
    ///
    /// The score buffer is zeroed in full before each user: O(num_tracks) per user, the same order as
    /// the top-K scan that ranks the user's candidates anyway.
    pub fn evaluate_user_scores(&self, num_tracks: usize, mut fill: impl FnMut(&[u32], &mut [f32])) -> RankingMetrics {
        self.evaluate_each_user(num_tracks, |_, train, scores| fill(train, scores))
    }

    /// [`Self::evaluate_user_scores`] for scorers that need to know who the user is:
    /// `fill(user row, training tracks, scores)`, the row indexing `train` and `heldout`.
    pub fn evaluate_each_user(
        &self,
        num_tracks: usize,
        mut fill: impl FnMut(usize, &[u32], &mut [f32]),
    ) -> RankingMetrics {
        let mut acc = self.accumulator(num_tracks);
        let mut scores = vec![0f32; num_tracks];
        for &u in &self.users {
            scores.iter_mut().for_each(|s| *s = 0.0);
            fill(u, self.train.user(u), &mut scores);
            acc.add_user(&scores, self.train.user(u), self.heldout.user(u));
        }
        acc.finish()
    }

    /// Metrics for ranking every user's candidates by one global score (popularity).
    pub fn evaluate_global_scores(&self, scores: &[f32]) -> RankingMetrics {
        let mut acc = self.accumulator(scores.len());
        for &u in &self.users {
            acc.add_user(scores, self.train.user(u), self.heldout.user(u));
        }
        acc.finish()
    }

    /// Item-based collaborative filtering baseline, what a platform without a learned model would
    /// serve: `score(j) = Σ_{i ∈ training tracks} cooc(i, j) / sqrt(cnt(i)·cnt(j))`, with `cooc` the
    /// number of training users having both tracks and `cnt` the number having one. Only `self.train`
    /// is read, so held-out tracks are never evidence. Memory is O(interactions): no item × item matrix
    /// is formed (see [`ItemCf`]).
    ///
    /// Scoring a user walks every training user sharing a track with it, which on a popular catalogue
    /// is most of them (≈ the whole training set per evaluated user), so users are scored in parallel:
    /// fixed chunks, each with its own buffers and running sums, merged in order, so the figures do not
    /// depend on the number of threads.
    pub fn evaluate_item_cf(&self, num_tracks: usize) -> RankingMetrics {
        self.evaluate_item_cf_unless(num_tracks, &|| false).expect("never stopped")
    }

    /// [`Self::evaluate_item_cf`], or `None` once `stop()` says so (checked before each chunk of
    /// users): the longest baseline, computed beside training, must not hold up a stop request.
    pub fn evaluate_item_cf_unless(
        &self,
        num_tracks: usize,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Option<RankingMetrics> {
        const USERS_PER_TASK: usize = 32;
        let cf = ItemCf::new(self.train, num_tracks);
        let parts: Option<Vec<Accumulator>> = self
            .users
            .par_chunks(USERS_PER_TASK)
            .map(|chunk| {
                if stop() {
                    return None;
                }
                let mut acc = self.accumulator(num_tracks);
                let mut scratch = cf.scratch();
                let mut scores = vec![0f32; num_tracks];
                for &u in chunk {
                    scores.fill(0.0);
                    cf.score(&mut scratch, self.train.user(u), &mut scores);
                    acc.add_user(&scores, self.train.user(u), self.heldout.user(u));
                }
                Some(acc)
            })
            .collect();
        Some(parts?.into_iter().reduce(Accumulator::merge).unwrap_or_else(|| self.accumulator(0)).finish())
    }

    /// Shared-label baseline (same artist, same subgenre): a track scores the number of the user's
    /// training tracks it shares a label with, `Σ_{l ∈ labels(j)} #{i ∈ I : l ∈ labels(i)}`. What a
    /// platform's "more by this artist" rule does; unlike item-CF it ranks tracks no one has played.
    /// `labels(t)` are track `t`'s distinct label ids, all below `num_labels`.
    pub fn evaluate_shared_labels<'l>(
        &self,
        num_tracks: usize,
        num_labels: usize,
        labels: impl Fn(usize) -> &'l [u32],
    ) -> RankingMetrics {
        let mut weight = vec![0f32; num_labels];
        self.evaluate_user_scores(num_tracks, |train, scores| {
            weight.fill(0.0);
            for &t in train {
                for &l in labels(t as usize) {
                    weight[l as usize] += 1.0;
                }
            }
            for (j, score) in scores.iter_mut().enumerate() {
                *score = labels(j).iter().map(|&l| weight[l as usize]).sum();
            }
        })
    }

    /// Random baseline: each user's candidates ranked by seeded uniform scores, so Recall@10 is about
    /// `10 / candidates`. The draws follow the evaluated users in order: the figure is a function of
    /// the seed and the evaluation set.
    pub fn evaluate_random(&self, num_tracks: usize, seed: u64) -> RankingMetrics {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4A4D_0000_0000_0005);
        self.evaluate_user_scores(num_tracks, |_, scores| scores.iter_mut().for_each(|s| *s = rng.random()))
    }
}

/// Adds to `query` the embeddings (rows of `host`, `query.len()` wide) of `tracks` the model knows.
fn add_query(query: &mut [f32], host: &[f32], tracks: &[u32], known: Option<&[bool]>) {
    let d = query.len();
    for &t in tracks.iter().filter(|&&t| known.is_none_or(|k| k[t as usize])) {
        for (qi, ei) in query.iter_mut().zip(&host[t as usize * d..(t as usize + 1) * d]) {
            *qi += ei;
        }
    }
}

/// Unknown tracks score −∞: below every known track, whatever their (meaningless) embedding says.
fn mask_unknown(scores: &mut [f32], known: &[bool]) {
    for (s, _) in scores.iter_mut().zip(known).filter(|(_, k)| !**k) {
        *s = f32::NEG_INFINITY;
    }
}

/// Cosine item-CF scorer over the training interactions, in O(interactions) memory: the transposed
/// index track → training users (CSR, one `u32` per (user, track) and one offset per track) and the
/// per-track `1 / sqrt(cnt)`, shared read-only; plus, per worker, one weight per training user
/// ([`CfScratch`]).
///
/// For a user with training tracks `I`, `score(j) = Σ_{i ∈ I} Σ_{v ∋ i, j} inv(i)·inv(j)` with
/// `inv(t) = 1 / sqrt(cnt(t))`, which sums to `cooc(i, j) / sqrt(cnt(i)·cnt(j))` per `i`. It is computed
/// as `inv(j) · Σ_{v ∋ j} w(v)` with `w(v) = Σ_{i ∈ I ∩ v} inv(i)`: the same sum, but every co-listening
/// user `v` is walked once instead of once per shared track, and the inner loop is a single add.
struct ItemCf<'a> {
    train: &'a UserTracks,
    /// `users[offsets[t]..offsets[t + 1]]` are the training users of track `t`.
    offsets: Vec<usize>,
    users: Vec<u32>,
    /// `1 / sqrt(cnt(t))`; 0 for a track no training user has (it has no co-occurrence either).
    inv_sqrt: Vec<f32>,
}

/// One worker's buffers for [`ItemCf::score`].
struct CfScratch {
    /// `w(v)` of the user being scored, per training user; all zeros between calls.
    weight: Vec<f32>,
    /// Users with a non-zero weight, so that only they are walked and reset.
    touched: Vec<u32>,
}

impl<'a> ItemCf<'a> {
    fn new(train: &'a UserTracks, num_tracks: usize) -> Self {
        let counts = crate::training::pairs::track_counts(train, num_tracks);
        let mut offsets = Vec::with_capacity(num_tracks + 1);
        offsets.push(0);
        for &c in &counts {
            offsets.push(offsets[offsets.len() - 1] + c as usize);
        }
        let mut next = offsets[..num_tracks].to_vec();
        let mut users = vec![0u32; train.len()];
        for (v, tracks) in train.iter().enumerate() {
            for &t in tracks {
                users[next[t as usize]] = v as u32;
                next[t as usize] += 1;
            }
        }
        let inv_sqrt = counts.iter().map(|&c| if c == 0 { 0.0 } else { 1.0 / (c as f32).sqrt() }).collect();
        Self { train, offsets, users, inv_sqrt }
    }

    fn scratch(&self) -> CfScratch {
        CfScratch { weight: vec![0.0; self.train.num_users()], touched: Vec::new() }
    }

    /// Adds the cosine item-CF score of every track for a user with training `tracks` to `scores`
    /// (zeroed by the caller). The user itself is one of the training users walked; it only adds to
    /// its own training tracks, which are never candidates.
    fn score(&self, scratch: &mut CfScratch, tracks: &[u32], scores: &mut [f32]) {
        for &i in tracks {
            let (inv_i, range) = (self.inv_sqrt[i as usize], self.offsets[i as usize]..self.offsets[i as usize + 1]);
            for &v in &self.users[range] {
                // inv_i > 0 here (track i has this training user), so a zero weight means first touch.
                let w = &mut scratch.weight[v as usize];
                if *w == 0.0 {
                    scratch.touched.push(v);
                }
                *w += inv_i;
            }
        }
        for v in scratch.touched.drain(..) {
            let w = std::mem::take(&mut scratch.weight[v as usize]);
            for &j in self.train.user(v as usize) {
                scores[j as usize] += w;
            }
        }
        for (s, &inv_j) in scores.iter_mut().zip(&self.inv_sqrt) {
            *s *= inv_j;
        }
    }
}

/// Running sums of hits and discounted gains, plus a stamp array that marks each user's excluded
/// tracks without clearing an N-sized buffer per user.
struct Accumulator<'a> {
    stamp: Vec<u32>,
    candidates: Option<&'a [bool]>,
    current: u32,
    hits: f64,
    gains: f64,
    heldout: usize,
    users: usize,
}

impl<'a> Accumulator<'a> {
    fn new(num_tracks: usize, candidates: Option<&'a [bool]>) -> Self {
        Self { stamp: vec![0; num_tracks], candidates, current: 0, hits: 0.0, gains: 0.0, heldout: 0, users: 0 }
    }

    fn add_user(&mut self, scores: &[f32], train: &[u32], heldout: &[u32]) {
        self.current += 1;
        for &t in train.iter().chain(heldout) {
            self.stamp[t as usize] = self.current;
        }
        let top = match self.candidates {
            None => top_k(scores, &self.stamp, self.current, |_| true),
            Some(c) => top_k(scores, &self.stamp, self.current, |j| c[j]),
        };
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

    /// Sums of two disjoint sets of users (`other`'s stamps are dropped: it has finished its users).
    fn merge(mut self, other: Self) -> Self {
        self.hits += other.hits;
        self.gains += other.gains;
        self.heldout += other.heldout;
        self.users += other.users;
        self
    }

    fn finish(self) -> RankingMetrics {
        let n = self.heldout.max(1) as f64;
        let recall_at_10 = self.hits / n;
        RankingMetrics {
            recall_at_10,
            recall_at_10_se: bernoulli_se(recall_at_10, self.heldout),
            ndcg_at_10: self.gains / n,
            heldout: self.heldout,
            users: self.users,
        }
    }
}

/// Standard error of the share `p` of successes in `n` independent Bernoulli trials, `sqrt(p(1 − p)/n)`;
/// 0 when there were no trials.
fn bernoulli_se(p: f64, n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    (p * (1.0 - p) / n as f64).sqrt()
}

/// Candidate `(s, j)` ranks above `(sh, h)`: higher score, or the same score and a lower index.
fn beats(s: f32, j: usize, sh: f32, h: usize) -> bool {
    s > sh || (s == sh && j < h)
}

/// The K best `(score, index)` among the `candidate` tracks not stamped `current`, best first.
fn top_k(scores: &[f32], stamp: &[u32], current: u32, candidate: impl Fn(usize) -> bool) -> Vec<(f32, usize)> {
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(K + 1);
    for (j, &s) in scores.iter().enumerate() {
        if stamp[j] == current || !candidate(j) {
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
    fn only_candidates_are_ranked_when_the_set_is_restricted() {
        // 20 tracks scored by index (19 best); the held-out track 5 is beaten by 14 others, but among
        // the candidates {3, 5, 7} only 7 beats it: rank 1.
        let train = csr(&[&[0]]);
        let heldout = csr(&[&[5]]);
        let scores: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let everything = EvalSet::new(&train, &heldout, 100, 0).evaluate_global_scores(&scores);
        assert_eq!(everything.recall_at_10, 0.0);
        let candidates: Vec<bool> = (0..20).map(|t| [3, 5, 7].contains(&t)).collect();
        let cold = EvalSet::new(&train, &heldout, 100, 0).only_candidates(&candidates);
        let m = cold.evaluate_global_scores(&scores);
        assert_eq!(m.recall_at_10, 1.0);
        assert!((m.ndcg_at_10 - 1.0 / 3f64.log2()).abs() < 1e-12);
        // Shared labels: track 3 shares the user's label and ranks first; 5 and 7 tie at 0 and the
        // lower index wins, so 5 is at rank 1.
        let labels: Vec<Vec<u32>> = (0..20).map(|t| if t == 0 || t == 3 { vec![0] } else { vec![] }).collect();
        let m = cold.evaluate_shared_labels(20, 1, |t| &labels[t]);
        assert_eq!(m.recall_at_10, 1.0);
        assert!((m.ndcg_at_10 - 1.0 / 3f64.log2()).abs() < 1e-12, "{m:?}");
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
        let emb =
            crate::training::model::l2_normalize(&Tensor::from_vec(flat, (15, 2), &Device::Cpu).unwrap()).unwrap();
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

    #[test]
    fn recall_se_is_the_bernoulli_standard_error() {
        // 40 tracks scored by index ascending-is-better (track 0 best); every user trains on track 39.
        // Eight users each hold out one track: 1 and 5 rank 0 and 4 (hits), 20..=25 rank 19..=24
        // (misses) → p = 2/8 = 0.25, se = sqrt(0.25·0.75/8) ≈ 0.1531.
        let heldout_tracks: [u32; 8] = [1, 5, 20, 21, 22, 23, 24, 25];
        let heldout_rows: Vec<[u32; 1]> = heldout_tracks.iter().map(|&t| [t]).collect();
        let train = csr(&[&[39][..]; 8]);
        let heldout = csr(&heldout_rows.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
        let set = EvalSet::new(&train, &heldout, 100, 0);
        let scores: Vec<f32> = (0..40).map(|i| -(i as f32)).collect();
        let m = set.evaluate_global_scores(&scores);
        assert_eq!((m.recall_at_10, m.heldout), (0.25, 8));
        assert!((m.recall_at_10_se - (0.25f64 * 0.75 / 8.0).sqrt()).abs() < 1e-12);
        assert!((m.recall_at_10_se - 0.153_093).abs() < 1e-6);

        // All hits: p = 1 → se = 0. No held-out pairs at all: se = 0, not NaN.
        let all_hit = csr(&[&[1][..]; 8]);
        let set = EvalSet::new(&train, &all_hit, 100, 0);
        assert_eq!(set.evaluate_global_scores(&scores).recall_at_10_se, 0.0);
        let none = csr(&[&[][..]; 8]);
        let set = EvalSet::new(&train, &none, 100, 0);
        let m = set.evaluate_global_scores(&scores);
        assert_eq!((m.heldout, m.recall_at_10, m.recall_at_10_se), (0, 0.0, 0.0));
    }

    #[test]
    fn metrics_stored_before_the_se_still_deserialize() {
        let old = r#"{"recall_at_10":0.5,"ndcg_at_10":0.25,"heldout":4,"users":2}"#;
        let m: RankingMetrics = serde_json::from_str(old).unwrap();
        assert_eq!(
            m,
            RankingMetrics { recall_at_10: 0.5, recall_at_10_se: 0.0, ndcg_at_10: 0.25, heldout: 4, users: 2 }
        );
        let round: RankingMetrics = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(round, m);
    }

    /// Training users of the item-CF case below; user 0 is evaluated, holding out track 1.
    ///
    /// cnt: t0 = 4 (users 0–3), t1 = 1, t2 = 5 (users 2–6), t3 = 3 (users 2, 3, 6), t4 = t5 = 1.
    /// cooc with t0: t1 = 1 (user 1), t2 = 2 (users 2, 3), t3 = 2 (users 2, 3), t4 = t5 = 0.
    const CF_TRAIN: [&[u32]; 7] = [&[0], &[0, 1], &[0, 2, 3], &[0, 2, 3], &[2, 4], &[2, 5], &[2, 3]];

    #[test]
    fn item_cf_scores_are_cosine_sums() {
        // User 0 trains on t0 only, so score(j) = cooc(0, j) / sqrt(cnt(0)·cnt(j)):
        // t1 = 1/sqrt(4·1) = 0.5, t2 = 2/sqrt(4·5) = 1/sqrt(5) ≈ 0.4472, t3 = 2/sqrt(4·3) = 1/sqrt(3)
        // ≈ 0.5774, t4 = t5 = 0, and t0 itself 4/sqrt(4·4) = 1 (a training track, never a candidate).
        let train = csr(&CF_TRAIN);
        let cf = ItemCf::new(&train, 6);
        let mut scratch = cf.scratch();
        let mut scores = vec![0f32; 6];
        cf.score(&mut scratch, train.user(0), &mut scores);
        let expected = [1.0, 0.5, 1.0 / 5f32.sqrt(), 1.0 / 3f32.sqrt(), 0.0, 0.0];
        for (j, (s, e)) in scores.iter().zip(expected).enumerate() {
            assert!((s - e).abs() < 1e-6, "track {j}: {s} vs {e}");
        }
        // Two training tracks sum their similarities: user 4 = {t2, t4}. cnt(t4) = 1, only user 4.
        // t3: cooc(2,3)/sqrt(5·3) + cooc(4,3)/sqrt(1·3) = 3/sqrt(15) + 0 ≈ 0.7746;
        // t0: 2/sqrt(5·4) + 0 ≈ 0.4472; t5: 1/sqrt(5·1) + 0 ≈ 0.4472; t1: 0.
        // The weights are reset between calls: the same user scored twice gives the same scores.
        for _ in 0..2 {
            let mut scores = vec![0f32; 6];
            cf.score(&mut scratch, train.user(4), &mut scores);
            assert!((scores[3] - 3.0 / 15f32.sqrt()).abs() < 1e-6);
            assert!((scores[0] - 1.0 / 5f32.sqrt()).abs() < 1e-6);
            assert!((scores[5] - 1.0 / 5f32.sqrt()).abs() < 1e-6);
            assert_eq!(scores[1], 0.0);
        }
    }

    #[test]
    fn item_cf_ranks_by_cosine_not_raw_counts_or_popularity() {
        // Held-out t1 among candidates t1..t5 (t0 is training). Hand-computed ranks of t1:
        // - cosine (0.5 vs t3 0.577, t2 0.447): only t3 is above → rank 1, NDCG 1/log2(3);
        // - raw co-occurrence (t1 = 1, t2 = t3 = 2): rank 2, NDCG 1/log2(4) = 0.5;
        // - cooc / (cnt·cnt), no square root (t1 = 1/4, t2 = 2/20, t3 = 2/12): rank 0, NDCG 1;
        // - popularity (t2 = 5, t3 = 3 above t1 = 1): rank 2, NDCG 0.5.
        let train = csr(&CF_TRAIN);
        let heldout = csr(&[&[1], &[], &[], &[], &[], &[], &[]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        let cosine = set.evaluate_item_cf(6);
        assert_eq!((cosine.users, cosine.heldout, cosine.recall_at_10), (1, 1, 1.0));
        assert!((cosine.ndcg_at_10 - 1.0 / 3f64.log2()).abs() < 1e-12, "{cosine:?}");

        // The wrong normalisations, computed by brute force over the training users, rank differently.
        let counts = crate::training::pairs::track_counts(&train, 6);
        let brute = |power: f32| {
            set.evaluate_user_scores(6, |tracks, scores| {
                for v in train.iter() {
                    for &i in tracks.iter().filter(|i| v.contains(i)) {
                        for &j in v {
                            scores[j as usize] += 1.0 / ((counts[i as usize] * counts[j as usize]) as f32).powf(power);
                        }
                    }
                }
            })
        };
        assert!((brute(0.5).ndcg_at_10 - cosine.ndcg_at_10).abs() < 1e-12, "the brute-force cosine agrees");
        assert_eq!(brute(0.0).ndcg_at_10, 0.5, "raw co-occurrence");
        assert_eq!(brute(1.0).ndcg_at_10, 1.0, "no square root");
        let popularity: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        assert_eq!(set.evaluate_global_scores(&popularity).ndcg_at_10, 0.5, "popularity");
    }

    #[test]
    fn item_cf_never_reads_the_users_own_heldout() {
        // User 0 trains on t0 and holds out t25; user 1 has {t0, t2}; user 2 has {t25}. In training,
        // t25 never co-occurs with t0, so its score is 0 and the 23 zero-scored tracks with a lower
        // index (t1, t3..t24) plus t2 (1/sqrt(2·1)) rank above it: rank 24, a miss. Counting user 0's
        // held-out track as co-occurring would give t25 1/sqrt(2·2) = 0.5 > 0 → rank 1, a hit.
        let train = csr(&[&[0], &[0, 2], &[25]]);
        let heldout = csr(&[&[25], &[], &[]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        let m = set.evaluate_item_cf(30);
        assert_eq!((m.users, m.recall_at_10, m.ndcg_at_10), (1, 0.0, 0.0));
        let cf = ItemCf::new(&train, 30);
        let mut scores = vec![0f32; 30];
        cf.score(&mut cf.scratch(), train.user(0), &mut scores);
        assert_eq!(scores[25], 0.0);
        assert!((scores[2] - 1.0 / 2f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn item_cf_matches_a_dense_cosine_matrix() {
        // Seeded random histories over 40 tracks; compare with cosine sums from an explicit matrix.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let users: Vec<Vec<u32>> = (0..30)
            .map(|_| {
                let mut t: Vec<u32> = (0..rng.random_range(1..9)).map(|_| rng.random_range(0..40)).collect();
                t.sort_unstable();
                t.dedup();
                t
            })
            .collect();
        let train = UserTracks::from_users(users.iter().map(|v| v.as_slice()));
        let mut cooc = vec![[0f64; 40]; 40];
        for v in &users {
            for &i in v {
                for &j in v {
                    cooc[i as usize][j as usize] += 1.0;
                }
            }
        }
        let cf = ItemCf::new(&train, 40);
        let mut scratch = cf.scratch();
        for v in &users {
            let mut scores = vec![0f32; 40];
            cf.score(&mut scratch, v, &mut scores);
            for (j, &s) in scores.iter().enumerate() {
                let e: f64 =
                    v.iter().map(|&i| cooc[i as usize][j] / (cooc[i as usize][i as usize] * cooc[j][j]).sqrt()).sum();
                let e = if e.is_nan() { 0.0 } else { e }; // 0/0 for a track nobody has
                assert!((s as f64 - e).abs() < 1e-5, "track {j}: {s} vs {e}");
            }
        }
    }

    #[test]
    fn random_baseline_recall_is_k_over_candidates() {
        // 4000 users train on t0 and hold out t999: 998 candidates, so p = 10/998 ≈ 0.01002 and
        // se = sqrt(p(1 − p)/4000) ≈ 0.00158. An index-ordered or per-user-identical ranking would
        // give 0 (6 se away) or 1.
        let train = csr(&[&[0][..]; 4000]);
        let heldout = csr(&[&[999][..]; 4000]);
        let set = EvalSet::new(&train, &heldout, 4000, 0);
        let m = set.evaluate_random(1000, 42);
        let p = 10.0 / 998.0;
        let se = (p * (1.0 - p) / 4000.0f64).sqrt();
        assert_eq!((m.users, m.heldout), (4000, 4000));
        assert!((m.recall_at_10 - p).abs() < 4.0 * se, "{m:?}");
        assert_eq!(set.evaluate_random(1000, 42), m, "same seed, same figures");
        assert_ne!(set.evaluate_random(1000, 43).ndcg_at_10, m.ndcg_at_10, "another seed, other draws");
    }

    /// L2-normalised rows as a `[n, 2]` tensor.
    fn embeddings(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        crate::training::model::l2_normalize(&Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn unknown_tracks_rank_last() {
        // User 0 trains on t0 (1, 0) and holds out t11 (0.9, 0.1). Tracks t1..=t10 are unknown but
        // their rows point exactly at the query: unmasked they take ranks 0..=9 and t11 is rank 10, a
        // miss; masked they score −∞ and t11 is rank 0. 12 known distractors (−1, 0) follow.
        let mut rows = vec![[1.0f32, 0.0]];
        rows.extend(std::iter::repeat_n([1.0, 0.0], 10));
        rows.push([0.9, 0.1]);
        rows.extend(std::iter::repeat_n([-1.0, 0.0], 12));
        let emb = embeddings(&rows);
        let known: Vec<bool> = (0..rows.len()).map(|j| !(1..=10).contains(&j)).collect();
        let train = csr(&[&[0]]);
        let heldout = csr(&[&[11]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        assert_eq!(set.evaluate_embeddings(&emb).unwrap().recall_at_10, 0.0);
        let m = set.evaluate_embeddings_known(&emb, &known).unwrap();
        assert_eq!((m.recall_at_10, m.ndcg_at_10), (1.0, 1.0));

        // A held-out pair on an unknown track is a miss, however well its row matches the query.
        let heldout = csr(&[&[1]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        assert_eq!(set.evaluate_embeddings(&emb).unwrap().recall_at_10, 1.0);
        assert_eq!(set.evaluate_embeddings_known(&emb, &known).unwrap().recall_at_10, 0.0);

        // All known: the same figures as the unmasked evaluation. A mask of the wrong length is an error.
        let all = vec![true; rows.len()];
        assert_eq!(set.evaluate_embeddings_known(&emb, &all).unwrap(), set.evaluate_embeddings(&emb).unwrap());
        assert!(set.evaluate_embeddings_known(&emb, &all[1..]).is_err());
    }

    #[test]
    fn unknown_tracks_add_nothing_to_the_query() {
        // User 0 trains on t0 (1, 0) and on t1, unknown, whose stale row is (0, 1); holds out t2
        // (0.9, 0.1). 12 known distractors (0.6, 0.8). Query without t1 = (1, 0): t2 scores 0.994,
        // distractors 0.6 → rank 0. Query with t1 = (1, 1)/√2: t2 scores 0.781, distractors 0.990 →
        // rank 12, a miss.
        let mut rows = vec![[1.0f32, 0.0], [0.0, 1.0], [0.9, 0.1]];
        rows.extend(std::iter::repeat_n([0.6, 0.8], 12));
        let emb = embeddings(&rows);
        let known: Vec<bool> = (0..rows.len()).map(|j| j != 1).collect();
        let train = csr(&[&[0, 1]]);
        let heldout = csr(&[&[2]]);
        let set = EvalSet::new(&train, &heldout, 100, 0);
        assert_eq!(set.evaluate_embeddings(&emb).unwrap().recall_at_10, 0.0);
        let m = set.evaluate_embeddings_known(&emb, &known).unwrap();
        assert_eq!((m.recall_at_10, m.ndcg_at_10), (1.0, 1.0));
    }

    /// 150 seeded users over 60 tracks, every other one holding out up to two tracks: 75 evaluated
    /// users, so more than one chunk of [`USERS_PER_CHUNK`].
    fn random_history() -> (UserTracks, UserTracks) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut rows = |n: usize| -> Vec<Vec<u32>> {
            (0..150)
                .map(|_| {
                    let mut t: Vec<u32> = (0..n).map(|_| rng.random_range(0..60)).collect();
                    t.sort_unstable();
                    t.dedup();
                    t
                })
                .collect()
        };
        let train_rows = rows(8);
        let heldout_rows: Vec<Vec<u32>> = rows(2)
            .into_iter()
            .zip(&train_rows)
            .enumerate()
            .map(|(u, (h, t))| if u % 2 == 0 { h.into_iter().filter(|x| !t.contains(x)).collect() } else { vec![] })
            .collect();
        let train = UserTracks::from_users(train_rows.iter().map(|v| v.as_slice()));
        let heldout = UserTracks::from_users(heldout_rows.iter().map(|v| v.as_slice()));
        (train, heldout)
    }

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    #[test]
    fn item_cf_in_parallel_chunks_matches_one_sequential_pass() {
        // The chunked, parallel evaluation must count every user once and agree with the sequential
        // evaluation of the same scorer, whatever the number of threads.
        let (train, heldout) = random_history();
        let set = EvalSet::new(&train, &heldout, 1000, 0);
        assert!(set.users.len() > USERS_PER_CHUNK, "{} users: one chunk", set.users.len());

        let cf = ItemCf::new(&train, 60);
        let mut scratch = cf.scratch();
        let sequential = set.evaluate_user_scores(60, |tracks, scores| cf.score(&mut scratch, tracks, scores));
        let (one, three) = (in_pool(1, || set.evaluate_item_cf(60)), in_pool(3, || set.evaluate_item_cf(60)));
        assert_same_evaluation(&one, &three, &sequential);
    }

    /// One and three threads give the same figures, which are a sequential pass's (the sums of
    /// discounted gains up to their order) and neither all hits nor none.
    fn assert_same_evaluation(one: &RankingMetrics, three: &RankingMetrics, sequential: &RankingMetrics) {
        assert_eq!(one, three);
        assert_eq!(
            (one.users, one.heldout, one.recall_at_10),
            (sequential.users, sequential.heldout, sequential.recall_at_10)
        );
        assert!(one.recall_at_10 > 0.0 && one.recall_at_10 < 1.0, "{one:?}");
        assert!((one.ndcg_at_10 - sequential.ndcg_at_10).abs() < 1e-12);
    }

    #[test]
    fn item_cf_gives_up_at_a_stop_request_and_otherwise_agrees() {
        let (train, heldout) = random_history();
        let set = EvalSet::new(&train, &heldout, 1000, 0);
        assert_eq!(set.evaluate_item_cf_unless(60, &|| true), None);
        // A stop asked after the first chunk: the rest are not scored.
        let chunks = std::sync::atomic::AtomicUsize::new(0);
        let after_one = || chunks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1;
        assert_eq!(in_pool(1, || set.evaluate_item_cf_unless(60, &after_one)), None);
        assert_eq!(set.evaluate_item_cf_unless(60, &|| false), Some(set.evaluate_item_cf(60)));
    }

    #[test]
    fn embedding_evaluation_in_parallel_chunks_matches_one_sequential_pass() {
        // Integer embeddings, so every score is exact in f32 and the chunked products must rank as a
        // plain dot product per user does: the same hits, whatever the number of threads, with and
        // without tracks the model does not know.
        let (train, heldout) = random_history();
        let set = EvalSet::new(&train, &heldout, 1000, 0);
        assert!(set.users.len() > USERS_PER_CHUNK, "{} users: one chunk", set.users.len());
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let rows: Vec<f32> = (0..60 * 4).map(|_| rng.random_range(-3i32..=3) as f32).collect();
        let embeddings = Tensor::from_vec(rows.clone(), (60, 4), &Device::Cpu).unwrap();
        let known: Vec<bool> = (0..60).map(|j| j % 5 != 0).collect();
        for mask in [None, Some(known.as_slice())] {
            let sequential = set.evaluate_each_user(60, |_, tracks, scores| {
                let mut query = [0f32; 4];
                add_query(&mut query, &rows, tracks, mask);
                for (j, score) in scores.iter_mut().enumerate() {
                    *score = (0..4).map(|c| query[c] * rows[j * 4 + c]).sum();
                }
                if let Some(known) = mask {
                    mask_unknown(scores, known);
                }
            });
            let run = |threads| in_pool(threads, || set.evaluate_embeddings_masked(&embeddings, mask).unwrap());
            assert_same_evaluation(&run(1), &run(3), &sequential);
        }
    }
}
