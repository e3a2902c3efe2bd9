//! Pair mining: which tracks are "similar" because the same user listened to both.
//!
//! The old trainer materialised every unordered pair of each user's tracks, which is quadratic in a
//! user's history (one user with 5,000 plays gives 12.5 M pairs). Here memory stays O(interactions):
//!
//! 1. [`CoListenIndex::build`] keeps the *distinct positive* tracks of each user (interaction kinds in
//!    the positive set; skips and dislikes are never evidence of similarity) in a compressed
//!    user → tracks index (CSR: one `u32` per distinct user-track, one offset per user).
//! 2. [`CoListenIndex::split`] holds out a seeded fraction of each user's tracks for evaluation. Held-out
//!    tracks are never paired in training.
//! 3. [`PairSampler::sample_epoch`] draws a fresh pair set every epoch, item2vec style: each of a
//!    user's tracks is an anchor with up to `pairs_per_track` partners drawn uniformly from the same
//!    user's other tracks, at most `max_pairs_per_user` pairs per user, optionally after word2vec
//!    subsampling of very popular tracks. Pairs are then shuffled across users so that every batch mixes
//!    users (a batch of one user's pairs has no real in-batch negatives).
//!
//! Everything is a function of the seed: the same data and seed give the same pairs, epoch by epoch.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Interactions;

/// Interaction kinds that count as positive evidence by default (PLATFORM.md).
pub const DEFAULT_POSITIVE_KINDS: [&str; 5] = ["play", "listen", "like", "addToPlaylist", "add_to_playlist"];

/// A compressed user → tracks index (CSR). Users are dense indices `0..num_users`; each user's
/// tracks are sorted and distinct.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserTracks {
    offsets: Vec<usize>,
    tracks: Vec<u32>,
}

impl UserTracks {
    fn with_users(capacity: usize) -> Self {
        Self { offsets: vec![0], tracks: Vec::with_capacity(capacity) }
    }

    fn push_user(&mut self, tracks: impl IntoIterator<Item = u32>) {
        self.tracks.extend(tracks);
        self.offsets.push(self.tracks.len());
    }

    /// Builds the index from explicit per-user track lists (each sorted and distinct).
    pub fn from_users<'a>(users: impl IntoIterator<Item = &'a [u32]>) -> Self {
        let mut t = Self::with_users(0);
        for tracks in users {
            debug_assert!(tracks.windows(2).all(|w| w[0] < w[1]), "tracks must be sorted and distinct");
            t.push_user(tracks.iter().copied());
        }
        t
    }

    pub fn num_users(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The tracks of user `u`, sorted.
    pub fn user(&self, u: usize) -> &[u32] {
        &self.tracks[self.offsets[u]..self.offsets[u + 1]]
    }

    /// Total number of (user, track) entries.
    pub fn len(&self) -> usize {
        self.tracks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracks.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u32]> {
        (0..self.num_users()).map(|u| self.user(u))
    }
}

/// What pair mining kept and dropped, for logs and metadata.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MiningStats {
    pub interactions: usize,
    pub positive_interactions: usize,
    /// Interactions whose kind is not positive (skips, dislikes, unknown kinds).
    pub non_positive_interactions: usize,
    /// Positive interactions that repeat a (user, track) already seen.
    pub duplicate_positive_interactions: usize,
    /// Distinct (user, track) positives among the users that are kept.
    pub user_tracks: usize,
    /// Users with at least two distinct positive tracks (the only ones that yield pairs).
    pub users: usize,
    /// Users with one positive track, or none at all despite having interactions.
    pub users_below_two_tracks: usize,
}

/// Each kept user's distinct positive tracks.
#[derive(Debug, Clone)]
pub struct CoListenIndex {
    pub tracks: UserTracks,
    /// Original user index (into [`Interactions::user_ids`]) of each row of `tracks`.
    pub user_index: Vec<u32>,
    pub stats: MiningStats,
}

impl CoListenIndex {
    /// Builds the index from the interactions whose kind is in `positive_kinds` (names). Kinds not
    /// present in the data are simply never matched.
    pub fn build(interactions: &Interactions, positive_kinds: &[String]) -> Self {
        let mut positive = [false; 256];
        // Playlist co-membership rows exist only when that source was loaded; they are positive.
        let playlist = crate::data::PLAYLIST_KIND.to_string();
        for name in positive_kinds.iter().chain(std::iter::once(&playlist)) {
            if let Some(code) = interactions.kinds.code(name) {
                positive[code as usize] = true;
            }
        }
        // One u64 key per positive interaction, (user << 32 | track): sorting groups by user with
        // tracks in order, and dedup removes repeats. 8 bytes per interaction, transient.
        let mut keys: Vec<u64> = interactions
            .user
            .iter()
            .zip(&interactions.track)
            .zip(&interactions.kind)
            .filter(|(_, k)| positive[**k as usize])
            .map(|((&u, &t), _)| ((u as u64) << 32) | t as u64)
            .collect();
        let positive_interactions = keys.len();
        keys.sort_unstable();
        keys.dedup();
        let mut stats = MiningStats {
            interactions: interactions.len(),
            positive_interactions,
            non_positive_interactions: interactions.len() - positive_interactions,
            duplicate_positive_interactions: positive_interactions - keys.len(),
            ..MiningStats::default()
        };

        let mut tracks = UserTracks::with_users(keys.len());
        let mut user_index = Vec::new();
        for group in keys.chunk_by(|a, b| a >> 32 == b >> 32) {
            if group.len() < 2 {
                continue;
            }
            user_index.push((group[0] >> 32) as u32);
            tracks.push_user(group.iter().map(|k| *k as u32));
        }
        let users_with_interactions = count_distinct(&interactions.user);
        stats.user_tracks = tracks.len();
        stats.users = user_index.len();
        stats.users_below_two_tracks = users_with_interactions - stats.users;
        Self { tracks, user_index, stats }
    }

    /// Holds out a seeded `fraction` of each user's tracks: `floor(n·fraction)` plus one more with
    /// probability equal to the remainder (so the expected share is exactly `fraction`), leaving at
    /// least one training track. Returns (train, held-out) over the same users.
    pub fn split(&self, fraction: f64, seed: u64) -> (UserTracks, UserTracks) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5B11_7000_0000_0001);
        let mut train = UserTracks::with_users(self.tracks.len());
        let mut heldout = UserTracks::with_users((self.tracks.len() as f64 * fraction) as usize + 1);
        let mut scratch: Vec<u32> = Vec::new();
        for tracks in self.tracks.iter() {
            let n = tracks.len();
            let exact = n as f64 * fraction;
            let mut h = exact.floor() as usize;
            if rng.random::<f64>() < exact - exact.floor() {
                h += 1;
            }
            let h = h.min(n - 1);
            scratch.clear();
            scratch.extend_from_slice(tracks);
            // Partial Fisher–Yates: the first h slots become a uniform sample without replacement.
            for i in 0..h {
                let j = rng.random_range(i..n);
                scratch.swap(i, j);
            }
            let (held, kept) = scratch.split_at_mut(h);
            held.sort_unstable();
            kept.sort_unstable();
            heldout.push_user(held.iter().copied());
            train.push_user(kept.iter().copied());
        }
        (train, heldout)
    }
}

/// Distinct values in `v`, through a bitmap over `0..=max` (user indices are dense).
fn count_distinct(v: &[u32]) -> usize {
    let Some(&max) = v.iter().max() else { return 0 };
    let mut seen = vec![false; max as usize + 1];
    v.iter().filter(|&&x| !std::mem::replace(&mut seen[x as usize], true)).count()
}

/// Number of training users each track appears with: its popularity, used by the popularity
/// baseline, popular-track subsampling and the logQ correction.
pub fn track_counts(train: &UserTracks, num_tracks: usize) -> Vec<u32> {
    let mut counts = vec![0u32; num_tracks];
    for &t in &train.tracks {
        counts[t as usize] += 1;
    }
    counts
}

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
fn other_index(i: usize, n: usize, rng: &mut ChaCha8Rng) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn history(rows: &[(u32, u32, &str)]) -> Interactions {
        let mut it = Interactions::default();
        let users = rows.iter().map(|r| r.0).max().map_or(0, |m| m + 1);
        it.user_ids = (0..users).map(|u| format!("user-{u}")).collect();
        for (i, &(u, t, kind)) in rows.iter().enumerate() {
            let code = it.kinds.intern(kind).unwrap();
            it.push(u, t, code, i as i64);
        }
        it
    }

    fn positives() -> Vec<String> {
        DEFAULT_POSITIVE_KINDS.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn user_with_one_track_yields_no_pairs() {
        let idx = CoListenIndex::build(&history(&[(0, 1, "play"), (0, 1, "like")]), &positives());
        assert_eq!(idx.stats.users, 0);
        assert_eq!(idx.stats.users_below_two_tracks, 1);
        assert_eq!(idx.stats.duplicate_positive_interactions, 1);
        let s = PairSampler::new(SamplingConfig::default(), &idx.tracks, 4);
        assert!(s.sample_epoch(&idx.tracks, &mut ChaCha8Rng::seed_from_u64(1)).is_empty());
    }

    #[test]
    fn duplicate_interactions_count_once() {
        let rows = [(0, 1, "play"), (0, 1, "play"), (0, 1, "listen"), (0, 2, "play"), (0, 2, "like")];
        let idx = CoListenIndex::build(&history(&rows), &positives());
        assert_eq!(idx.tracks.user(0), &[1, 2]);
        assert_eq!(idx.stats.positive_interactions, 5);
        assert_eq!(idx.stats.duplicate_positive_interactions, 3);
        assert_eq!(idx.stats.user_tracks, 2);
    }

    #[test]
    fn skips_and_dislikes_are_never_positive() {
        let rows = [(0, 1, "skip"), (0, 2, "skip"), (0, 3, "dislike"), (1, 1, "play"), (1, 2, "skip")];
        let idx = CoListenIndex::build(&history(&rows), &positives());
        assert_eq!(idx.stats.users, 0, "user 0 has only skips, user 1 one positive track");
        assert_eq!(idx.stats.users_below_two_tracks, 2);
        assert_eq!(idx.stats.non_positive_interactions, 4);
    }

    #[test]
    fn positive_kinds_are_configurable() {
        let rows = [(0, 1, "skip"), (0, 2, "skip")];
        let idx = CoListenIndex::build(&history(&rows), &["skip".to_string()]);
        assert_eq!(idx.tracks.user(0), &[1, 2]);
    }

    #[test]
    fn empty_history_is_empty() {
        let idx = CoListenIndex::build(&Interactions::default(), &positives());
        assert_eq!(idx.stats, MiningStats::default());
        let (train, heldout) = idx.split(0.2, 1);
        assert!(train.is_empty() && heldout.is_empty());
        assert!(validation_pairs(&train, &heldout, 10, 1).is_empty());
    }

    fn many_users() -> CoListenIndex {
        let mut rows = Vec::new();
        for u in 0..40u32 {
            for t in 0..(2 + u * 3) {
                rows.push((u, (t * 7 + u) % 300, "play"));
            }
        }
        CoListenIndex::build(&history(&rows), &positives())
    }

    #[test]
    fn split_is_seeded_disjoint_and_keeps_a_training_track() {
        let idx = many_users();
        let (train, heldout) = idx.split(0.2, 9);
        assert_eq!(idx.split(0.2, 9), (train.clone(), heldout.clone()));
        assert_ne!(idx.split(0.2, 10).1, heldout);
        let mut total_held = 0;
        for u in 0..idx.tracks.num_users() {
            let (tr, he) = (train.user(u), heldout.user(u));
            assert!(!tr.is_empty());
            assert!(he.iter().all(|h| !tr.contains(h)));
            assert_eq!(tr.len() + he.len(), idx.tracks.user(u).len());
            total_held += he.len();
        }
        let share = total_held as f64 / idx.tracks.len() as f64;
        assert!((share - 0.2).abs() < 0.03, "held-out share {share}");
    }

    #[test]
    fn epoch_pairs_are_within_user_capped_and_reproducible() {
        let idx = many_users();
        let (train, _) = idx.split(0.2, 3);
        let config = SamplingConfig { pairs_per_track: 4, max_pairs_per_user: 50, ..SamplingConfig::default() };
        let sampler = PairSampler::new(config.clone(), &train, 300);
        let a = sampler.sample_epoch(&train, &mut ChaCha8Rng::seed_from_u64(5));
        let b = sampler.sample_epoch(&train, &mut ChaCha8Rng::seed_from_u64(5));
        assert_eq!(a, b);
        assert_eq!(a.len(), sampler.max_pairs(&train));
        // Every pair belongs to one user, and no pair pairs a track with itself.
        let owner = |p: &[u32; 2]| {
            (0..train.num_users()).any(|u| train.user(u).contains(&p[0]) && train.user(u).contains(&p[1]))
        };
        assert!(a.iter().all(|p| p[0] != p[1] && owner(p)));
        // The cap holds for the heaviest user (119 tracks × 4 partners ≫ 50).
        assert!(sampler.max_pairs(&train) < train.len() * 4);
        let capped = PairSampler::new(SamplingConfig { max_pairs_per_epoch: 100, ..config }, &train, 300);
        assert_eq!(capped.sample_epoch(&train, &mut ChaCha8Rng::seed_from_u64(5)).len(), 100);
        assert_eq!(capped.max_pairs(&train), 100);
    }

    #[test]
    fn subsampling_drops_popular_tracks_more_often() {
        // Track 0 is in every user's history; the others are rare.
        let mut rows = Vec::new();
        for u in 0..200u32 {
            rows.push((u, 0, "play"));
            rows.push((u, 1 + u, "play"));
            rows.push((u, 201 + u, "play"));
        }
        let idx = CoListenIndex::build(&history(&rows), &positives());
        let config = SamplingConfig { subsample_threshold: 1e-3, ..SamplingConfig::default() };
        let sampler = PairSampler::new(config, &idx.tracks, 401);
        let pairs = sampler.sample_epoch(&idx.tracks, &mut ChaCha8Rng::seed_from_u64(2));
        let with_popular = pairs.iter().filter(|p| p.contains(&0)).count();
        assert!(!pairs.is_empty());
        assert!((with_popular as f64) < 0.2 * pairs.len() as f64, "{with_popular} of {}", pairs.len());
    }
}
