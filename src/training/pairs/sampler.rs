//! Per-epoch pair sampling, and the fixed validation pairs.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::index::track_counts;
use super::user_tracks::UserTracks;

/// Knobs of per-epoch pair sampling (see the module docs).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// Partners drawn per anchor track per epoch (capped at the user's other tracks).
    pub pairs_per_track: usize,
    /// At most this many pairs per user per epoch, so heavy users do not dominate.
    pub max_pairs_per_user: usize,
    /// word2vec subsampling threshold `t`: a track with frequency `f` (its share of all training
    /// user-tracks) is kept with probability `min(1, sqrt(t/f) + t/f)` each epoch. 0 disables it.
    pub subsample_threshold: f64,
    /// Train on at most this many pairs per epoch (a uniform sample of the epoch's pairs; 0 = all),
    /// so that epoch time stays bounded on very large histories.
    pub max_pairs_per_epoch: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { pairs_per_track: 5, max_pairs_per_user: 500, subsample_threshold: 0.0, max_pairs_per_epoch: 0 }
    }
}

/// Draws training pairs, one fresh set per epoch.
#[derive(Debug, Clone)]
pub struct PairSampler {
    config: SamplingConfig,
    /// Per-track keep probability (all 1 when subsampling is off).
    keep: Option<Vec<f32>>,
}

impl PairSampler {
    pub fn new(config: SamplingConfig, train: &UserTracks, num_tracks: usize) -> Self {
        let keep = (config.subsample_threshold > 0.0).then(|| {
            let total = train.len().max(1) as f64;
            let t = config.subsample_threshold;
            track_counts(train, num_tracks)
                .iter()
                .map(|&c| {
                    let f = c as f64 / total;
                    if f == 0.0 { 1.0 } else { ((t / f).sqrt() + t / f).min(1.0) as f32 }
                })
                .collect()
        });
        Self { config, keep }
    }

    /// An upper bound on the pairs one epoch yields (for progress bars and buffer sizes).
    pub fn max_pairs(&self, train: &UserTracks) -> usize {
        let all: usize = train.iter().map(|t| self.user_pair_count(t.len())).sum();
        match self.config.max_pairs_per_epoch {
            0 => all,
            cap => all.min(cap),
        }
    }

    fn user_pair_count(&self, n: usize) -> usize {
        if n < 2 {
            return 0;
        }
        (n * self.config.pairs_per_track.min(n - 1)).min(self.config.max_pairs_per_user)
    }

    /// One epoch's pairs `[anchor, partner]` (track indices), shuffled across users. Consumes
    /// randomness from `rng` only, so the sequence of epochs is reproducible from its state.
    pub fn sample_epoch(&self, train: &UserTracks, rng: &mut ChaCha8Rng) -> Vec<[u32; 2]> {
        let mut pairs = Vec::with_capacity(train.iter().map(|t| self.user_pair_count(t.len())).sum());
        let mut kept: Vec<u32> = Vec::new();
        for tracks in train.iter() {
            kept.clear();
            match &self.keep {
                Some(keep) => kept.extend(tracks.iter().copied().filter(|&t| rng.random::<f32>() < keep[t as usize])),
                None => kept.extend_from_slice(tracks),
            }
            let n = kept.len();
            let count = self.user_pair_count(n);
            if count == 0 {
                continue;
            }
            let per_anchor = self.config.pairs_per_track.min(n - 1);
            if n * per_anchor <= count {
                for (i, &anchor) in kept.iter().enumerate() {
                    for _ in 0..per_anchor {
                        pairs.push([anchor, kept[other_index(i, n, rng)]]);
                    }
                }
            } else {
                // Over the per-user cap: random anchors instead of every anchor.
                for _ in 0..count {
                    let i = rng.random_range(0..n);
                    pairs.push([kept[i], kept[other_index(i, n, rng)]]);
                }
            }
        }
        for i in (1..pairs.len()).rev() {
            pairs.swap(i, rng.random_range(0..=i));
        }
        // The list is shuffled, so its head is a uniform sample.
        if self.config.max_pairs_per_epoch > 0 {
            pairs.truncate(self.config.max_pairs_per_epoch);
        }
        pairs
    }
}

/// A uniform index in `0..n` other than `i` (n ≥ 2).
pub(super) fn other_index(i: usize, n: usize, rng: &mut ChaCha8Rng) -> usize {
    let j = rng.random_range(0..n - 1);
    if j >= i { j + 1 } else { j }
}

/// A fixed validation pair set: each held-out (user, track) paired with one of that user's training
/// tracks, shuffled, at most `max_pairs`. The same for every epoch, so validation losses compare.
pub fn validation_pairs(train: &UserTracks, heldout: &UserTracks, max_pairs: usize, seed: u64) -> Vec<[u32; 2]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7A11_DA7E_0000_0002);
    let mut pairs = Vec::with_capacity(heldout.len());
    for u in 0..heldout.num_users() {
        let anchors = train.user(u);
        for &h in heldout.user(u) {
            pairs.push([anchors[rng.random_range(0..anchors.len())], h]);
        }
    }
    for i in (1..pairs.len()).rev() {
        pairs.swap(i, rng.random_range(0..=i));
    }
    pairs.truncate(max_pairs);
    pairs
}
