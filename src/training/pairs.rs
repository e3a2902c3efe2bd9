//! Pair mining: which tracks are "similar" because the same user listened to both.
//!
//! The old trainer materialised every unordered pair of each user's tracks, which is quadratic in a
//! user's history (one user with 5,000 plays gives 12.5 M pairs). Here memory stays O(interactions):
//!
//! 1. [`CoListenIndex::build`] keeps the *distinct positive* tracks of each user (interaction kinds in
//!    the positive set; skips and dislikes are never evidence of similarity) in a compressed
//!    user → tracks index (CSR: one `u32` per distinct user-track, one offset per user).
//! 2. A hold-out for evaluation, in one of two ways; held-out tracks are never paired in training.
//!    [`CoListenIndex::split`] holds out a seeded random fraction of each user's tracks.
//!    [`split_by_time`] holds out by time instead, the way a recommender is really used: the newest
//!    share of positive interactions (at or after a cutoff instant) is the held-out period, training
//!    sees only what came before it, and each kept user's held-out tracks are the ones new to them in
//!    that period (re-listens are not discoveries), so the model never learns from the future.
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
        let positive = positive_mask(interactions, positive_kinds);
        // One u64 key per positive interaction, (user << 32 | track): sorting groups by user with
        // tracks in order, and dedup removes repeats. 8 bytes per interaction, transient.
        let mut keys: Vec<u64> = interactions
            .user
            .iter()
            .zip(&interactions.track)
            .zip(&interactions.kind)
            .filter(|(_, k)| positive[**k as usize])
            .map(|((&u, &t), _)| user_track_key(u, t))
            .collect();
        let positive_interactions = keys.len();
        keys.sort_unstable();
        keys.dedup();
        let (tracks, user_index) = users_with_two_tracks(&keys);
        let users_with_interactions = count_distinct(&interactions.user);
        let stats = MiningStats {
            interactions: interactions.len(),
            positive_interactions,
            non_positive_interactions: interactions.len() - positive_interactions,
            duplicate_positive_interactions: positive_interactions - keys.len(),
            user_tracks: tracks.len(),
            users: user_index.len(),
            users_below_two_tracks: users_with_interactions - user_index.len(),
        };
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

/// The timestamp of interactions that carry no time: playlist memberships (`db::load` stores them
/// at `i64::MIN`). They are never in a held-out period and never define a cutoff.
const TIMELESS_MS: i64 = i64::MIN;

/// A time-ordered hold-out, built by [`split_by_time`]: the model trains on what users listened to
/// before an instant and is evaluated on the tracks they discovered at or after it.
#[derive(Debug, Clone)]
pub struct TimeSplit {
    /// The training side: each kept user's distinct positive tracks first listened before the cutoff
    /// (users with >= 2 such tracks, exactly as [`CoListenIndex::build`] keeps users). Its `stats`
    /// describe the training period only: interactions before the cutoff (timeless ones included),
    /// and users with interactions before the cutoff.
    pub index: CoListenIndex,
    /// Aligned row for row with `index.tracks` (same users, same row order): each user's held-out
    /// tracks, sorted (a row may be empty).
    pub heldout: UserTracks,
    /// Interactions at or after this instant (ms) are in the held-out period. `i64::MAX` when nothing
    /// is held out (and then nothing is, not even an interaction stamped `i64::MAX`).
    pub cutoff_ms: i64,
    /// Positive interactions in the held-out period, and how many (user, track) of them became
    /// held-out pairs.
    pub heldout_period_positives: usize,
    pub heldout_pairs: usize,
    /// Distinct (user, track) among the held-out period's positives:
    /// `heldout_pairs + heldout_known_tracks + heldout_cold_user_tracks`.
    pub heldout_period_user_tracks: usize,
    /// Of those, dropped because the user already had a positive with the track before the cutoff
    /// (a re-listen is not a discovery).
    pub heldout_known_tracks: usize,
    /// Of those, new tracks dropped because their user has fewer than two training tracks (such a
    /// user is not a row of the index, so there is nothing to predict from).
    pub heldout_cold_user_tracks: usize,
    /// Positive interactions without a time (playlist memberships): always on the training side and
    /// not counted when placing the cutoff.
    pub timeless_positives: usize,
}

/// Splits the history by time, the way a recommender is evaluated: predict each user's next new
/// tracks from what came before, never from the future. Deterministic (no randomness).
///
/// Only positive interactions count (the kinds in `positive_kinds`, and
/// [`crate::data::PLAYLIST_KIND`], as in [`CoListenIndex::build`]); skips and dislikes neither place
/// the cutoff nor are held out. The cutoff is the timestamp at index `floor(n·(1 − fraction))` of the
/// `n` timed positive timestamps in ascending order, so that the newest `fraction` share of them is at
/// or after it. Every interaction stamped exactly at the cutoff belongs to the held-out period, so a
/// held-out interaction is never older than a training one; with ties at the cutoff, slightly more
/// than `fraction` is held out. `fraction <= 0` (or NaN) holds out nothing (`cutoff_ms = i64::MAX`);
/// `fraction >= 1` puts every timed positive in the held-out period. Timeless positives (playlist
/// memberships) are always training.
///
/// - Training: each distinct (user, track) with a positive interaction before the cutoff; users with
///   at least two such tracks are kept, as in [`CoListenIndex::build`].
/// - Held out: each distinct (user, track) with a positive interaction at or after the cutoff whose
///   track is new to the user (no positive with it before the cutoff), for kept users only.
///   Everything in the held-out period is excluded from training, so it is never paired.
///
/// Memory is O(interactions): a transient timestamp and a `u64` key per positive interaction.
pub fn split_by_time(interactions: &Interactions, positive_kinds: &[String], fraction: f64) -> TimeSplit {
    let positive = positive_mask(interactions, positive_kinds);
    let mut times: Vec<i64> = interactions
        .kind
        .iter()
        .zip(&interactions.timestamp_ms)
        .filter(|&(&k, &t)| positive[k as usize] && t != TIMELESS_MS)
        .map(|(_, &t)| t)
        .collect();
    let cutoff = heldout_cutoff(&mut times, fraction);
    drop(times);
    let in_heldout_period = |t: i64| cutoff.is_some_and(|c| t >= c);

    // (user << 32 | track) keys, as in `build`, for each side of the cutoff.
    let mut train_keys: Vec<u64> = Vec::new();
    let mut held_keys: Vec<u64> = Vec::new();
    let mut train_interactions = 0;
    let mut timeless_positives = 0;
    for (((&u, &t), &k), &ts) in
        interactions.user.iter().zip(&interactions.track).zip(&interactions.kind).zip(&interactions.timestamp_ms)
    {
        let held = in_heldout_period(ts);
        train_interactions += usize::from(!held);
        if !positive[k as usize] {
            continue;
        }
        timeless_positives += usize::from(ts == TIMELESS_MS);
        let key = user_track_key(u, t);
        if held {
            held_keys.push(key);
        } else {
            train_keys.push(key);
        }
    }
    let (train_positives, heldout_period_positives) = (train_keys.len(), held_keys.len());
    train_keys.sort_unstable();
    train_keys.dedup();
    held_keys.sort_unstable();
    held_keys.dedup();

    let (tracks, user_index) = users_with_two_tracks(&train_keys);
    let train_users = count_distinct_where(&interactions.user, |i| !in_heldout_period(interactions.timestamp_ms[i]));
    let stats = MiningStats {
        interactions: train_interactions,
        positive_interactions: train_positives,
        non_positive_interactions: train_interactions - train_positives,
        duplicate_positive_interactions: train_positives - train_keys.len(),
        user_tracks: tracks.len(),
        users: user_index.len(),
        users_below_two_tracks: train_users - user_index.len(),
    };

    // Merge the sorted held-out keys with the sorted training keys (is the track known to the
    // user?) and with the kept users (ascending), emitting one held-out row per kept user.
    let mut heldout = UserTracks::with_users(held_keys.len());
    let (mut row, mut j) = (0, 0);
    let (mut known, mut cold) = (0, 0);
    let mut new_tracks: Vec<u32> = Vec::new();
    for group in held_keys.chunk_by(|&a, &b| key_user(a) == key_user(b)) {
        let user = key_user(group[0]);
        while row < user_index.len() && user_index[row] < user {
            heldout.push_user([]);
            row += 1;
        }
        let kept = user_index.get(row) == Some(&user);
        new_tracks.clear();
        for &key in group {
            while train_keys.get(j).is_some_and(|&k| k < key) {
                j += 1;
            }
            if train_keys.get(j) == Some(&key) {
                known += 1;
            } else if kept {
                new_tracks.push(key as u32);
            } else {
                cold += 1;
            }
        }
        if kept {
            heldout.push_user(new_tracks.iter().copied());
            row += 1;
        }
    }
    while row < user_index.len() {
        heldout.push_user([]);
        row += 1;
    }

    TimeSplit {
        heldout_pairs: heldout.len(),
        heldout,
        index: CoListenIndex { tracks, user_index, stats },
        cutoff_ms: cutoff.unwrap_or(i64::MAX),
        heldout_period_positives,
        heldout_period_user_tracks: held_keys.len(),
        heldout_known_tracks: known,
        heldout_cold_user_tracks: cold,
        timeless_positives,
    }
}

/// The first timestamp of the held-out period: the element at index `floor(n·(1 − fraction))` of
/// `times` in ascending order, or `None` when that leaves nothing to hold out. Reorders `times`.
fn heldout_cutoff(times: &mut [i64], fraction: f64) -> Option<i64> {
    let n = times.len();
    if n == 0 || fraction.is_nan() || fraction <= 0.0 {
        return None;
    }
    let exact = n as f64 * (1.0 - fraction.min(1.0));
    // A floor that forgives float error: 10 × (1 − 0.8) evaluates just below 2.
    let nearest = exact.round();
    let first = if (exact - nearest).abs() < 1e-9 { nearest } else { exact.floor() } as usize;
    if first >= n {
        return None;
    }
    Some(*times.select_nth_unstable(first).1)
}

/// Which kind codes are positive: the named `positive_kinds` present in the data, and
/// [`crate::data::PLAYLIST_KIND`] (playlist co-membership rows exist only when that source was loaded).
fn positive_mask(interactions: &Interactions, positive_kinds: &[String]) -> [bool; 256] {
    let mut positive = [false; 256];
    let playlist = crate::data::PLAYLIST_KIND.to_string();
    for name in positive_kinds.iter().chain(std::iter::once(&playlist)) {
        if let Some(code) = interactions.kinds.code(name) {
            positive[code as usize] = true;
        }
    }
    positive
}

/// The sort key of a (user, track): sorting groups by user, with each user's tracks in order.
fn user_track_key(user: u32, track: u32) -> u64 {
    ((user as u64) << 32) | track as u64
}

fn key_user(key: u64) -> u32 {
    (key >> 32) as u32
}

/// The CSR rows of the users with at least two tracks in `keys` (sorted, distinct), and their
/// original user indices (ascending).
fn users_with_two_tracks(keys: &[u64]) -> (UserTracks, Vec<u32>) {
    let mut tracks = UserTracks::with_users(keys.len());
    let mut user_index = Vec::new();
    for group in keys.chunk_by(|&a, &b| key_user(a) == key_user(b)) {
        if group.len() < 2 {
            continue;
        }
        user_index.push(key_user(group[0]));
        tracks.push_user(group.iter().map(|&k| k as u32));
    }
    (tracks, user_index)
}

/// Distinct values in `v`, through a bitmap over `0..=max` (user indices are dense).
fn count_distinct(v: &[u32]) -> usize {
    count_distinct_where(v, |_| true)
}

/// Distinct values among the `v[i]` with `keep(i)`.
fn count_distinct_where(v: &[u32], keep: impl Fn(usize) -> bool) -> usize {
    let Some(&max) = v.iter().max() else { return 0 };
    let mut seen = vec![false; max as usize + 1];
    v.iter().enumerate().filter(|&(i, &x)| keep(i) && !std::mem::replace(&mut seen[x as usize], true)).count()
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

    /// A history with explicit timestamps: (user, track, kind, timestamp_ms).
    fn timed(rows: &[(u32, u32, &str, i64)]) -> Interactions {
        let mut it = Interactions::default();
        let users = rows.iter().map(|r| r.0).max().map_or(0, |m| m + 1);
        it.user_ids = (0..users).map(|u| format!("user-{u}")).collect();
        for &(u, t, kind, ts) in rows {
            let code = it.kinds.intern(kind).unwrap();
            it.push(u, t, code, ts);
        }
        it
    }

    fn row_of(split: &TimeSplit, user: u32) -> Option<usize> {
        split.index.user_index.iter().position(|&u| u == user)
    }

    /// Checks every documented property of `split` against a brute-force reading of `it`.
    fn check_time_split(it: &Interactions, split: &TimeSplit) {
        let positive = |i: usize| {
            let kind = it.kinds.name(it.kind[i]);
            DEFAULT_POSITIVE_KINDS.contains(&kind) || kind == crate::data::PLAYLIST_KIND
        };
        let users = it.user_ids.len() as u32;
        assert_eq!(split.heldout.num_users(), split.index.tracks.num_users());
        assert_eq!(split.index.user_index.len(), split.index.tracks.num_users());
        let mut rows = 0;
        let mut pairs = 0;
        for u in 0..users {
            let (mut before, mut after) = (Vec::new(), Vec::new());
            for i in (0..it.len()).filter(|&i| it.user[i] == u && positive(i)) {
                if it.timestamp_ms[i] < split.cutoff_ms { before.push(it.track[i]) } else { after.push(it.track[i]) }
            }
            before.sort_unstable();
            before.dedup();
            let mut new: Vec<u32> = after.into_iter().filter(|t| !before.contains(t)).collect();
            new.sort_unstable();
            new.dedup();
            let Some(r) = row_of(split, u) else {
                assert!(before.len() < 2, "user {u} has {} training tracks but no row", before.len());
                continue;
            };
            rows += 1;
            let (train, held) = (split.index.tracks.user(r), split.heldout.user(r));
            assert!(train.len() >= 2);
            assert_eq!(train, before.as_slice(), "user {u}: training tracks are those heard before the cutoff");
            assert_eq!(held, new.as_slice(), "user {u}: held out are the tracks first heard at/after the cutoff");
            assert!(held.iter().all(|h| !train.contains(h)), "user {u}: held-out and training tracks overlap");
            // Every held-out track's first positive is at/after the cutoff, and after every training
            // positive of the same user; every training track has a positive before the cutoff.
            let first = |t: u32| {
                (0..it.len())
                    .filter(|&i| it.user[i] == u && it.track[i] == t && positive(i))
                    .map(|i| it.timestamp_ms[i])
                    .min()
                    .unwrap()
            };
            let newest_train = train.iter().map(|&t| first(t)).max().unwrap();
            for &h in held {
                assert!(first(h) >= split.cutoff_ms && first(h) >= newest_train, "user {u} track {h}");
            }
            assert!(train.iter().all(|&t| first(t) < split.cutoff_ms));
            pairs += held.len();
        }
        assert_eq!(rows, split.index.tracks.num_users());
        assert_eq!(split.heldout_pairs, pairs);
        assert_eq!(split.heldout.len(), pairs);
        assert_eq!(
            split.heldout_period_user_tracks,
            split.heldout_pairs + split.heldout_known_tracks + split.heldout_cold_user_tracks
        );
        let in_period = (0..it.len()).filter(|&i| positive(i) && it.timestamp_ms[i] >= split.cutoff_ms).count();
        assert_eq!(split.heldout_period_positives, in_period);
    }

    /// 60 users over 1,000 instants, with re-listens, skips, ties and users who start late.
    fn messy_history(seed: u64) -> Interactions {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut rows = Vec::new();
        for _ in 0..4_000 {
            let u = rng.random_range(0..60u32);
            let start = (u as i64 % 7) * 100;
            let kind = ["play", "play", "like", "listen", "skip", "dislike"][rng.random_range(0..6)];
            rows.push((u, rng.random_range(0..50u32 + u), kind, rng.random_range(start..1_000)));
        }
        timed(&rows)
    }

    #[test]
    fn time_split_holds_out_only_tracks_first_heard_after_the_cutoff() {
        for (seed, fraction) in [(1, 0.2), (2, 0.05), (3, 0.5), (4, 0.9)] {
            let it = messy_history(seed);
            let split = split_by_time(&it, &positives(), fraction);
            assert!(split.heldout_pairs > 0 && split.index.stats.users > 0, "seed {seed}");
            check_time_split(&it, &split);
            // Deterministic.
            let again = split_by_time(&it, &positives(), fraction);
            assert_eq!(
                (again.index.tracks, again.heldout, again.cutoff_ms),
                (split.index.tracks, split.heldout, split.cutoff_ms)
            );
        }
    }

    #[test]
    fn time_split_training_stats_describe_the_training_period() {
        let rows = [
            (0, 1, "play", 0),
            (0, 1, "play", 1),
            (0, 2, "skip", 2),
            (0, 2, "like", 3),
            (1, 5, "play", 4),
            (0, 3, "play", 5), // cutoff: the newest 2 of 6 positives
            (1, 6, "play", 6),
        ];
        let split = split_by_time(&timed(&rows), &positives(), 2.0 / 6.0);
        assert_eq!(split.cutoff_ms, 5);
        let expected = MiningStats {
            interactions: 5,
            positive_interactions: 4,
            non_positive_interactions: 1,
            duplicate_positive_interactions: 1,
            user_tracks: 2,
            users: 1,
            users_below_two_tracks: 1,
        };
        assert_eq!(split.index.stats, expected);
        assert_eq!(split.index.user_index, [0]);
        assert_eq!(split.heldout.user(0), &[3]);
        assert_eq!((split.heldout_period_positives, split.heldout_pairs, split.heldout_cold_user_tracks), (2, 1, 1));
    }

    #[test]
    fn relistened_tracks_are_not_held_out() {
        let rows = [
            (0, 1, "play", 10),
            (0, 2, "play", 20),
            (0, 3, "like", 30),
            (0, 1, "play", 100), // held-out period from here
            (0, 3, "listen", 110),
            (0, 4, "play", 120),
            (0, 4, "play", 130),
        ];
        let it = timed(&rows);
        let split = split_by_time(&it, &positives(), 4.0 / 7.0);
        assert_eq!(split.cutoff_ms, 100);
        assert_eq!(split.index.tracks.user(0), &[1, 2, 3]);
        assert_eq!(split.heldout.user(0), &[4]);
        assert_eq!(split.heldout_known_tracks, 2);
        assert_eq!((split.heldout_period_positives, split.heldout_period_user_tracks, split.heldout_pairs), (4, 3, 1));
        check_time_split(&it, &split);
    }

    #[test]
    fn heldout_tracks_are_never_paired_in_training() {
        // Tracks 100.. are released at time 1,000 (the cutoff): every listen of them is held out.
        let mut rows = Vec::new();
        for u in 0..30u32 {
            for t in 0..8 {
                rows.push((u, (u + t) % 20, "play", (u * 8 + t) as i64));
            }
            rows.push((u, 100 + u % 5, "play", 1_000 + u as i64));
            rows.push((u, 100 + (u + 1) % 5, "like", 1_500 + u as i64));
            rows.push((u, u % 20, "play", 2_000)); // a re-listen, held-out period but known
        }
        let it = timed(&rows);
        let split = split_by_time(&it, &positives(), 90.0 / 330.0);
        assert_eq!(split.cutoff_ms, 1_000);
        check_time_split(&it, &split);
        assert_eq!(split.heldout_pairs, 60);
        let sampler = PairSampler::new(SamplingConfig::default(), &split.index.tracks, 200);
        for epoch in 0..5 {
            let pairs = sampler.sample_epoch(&split.index.tracks, &mut ChaCha8Rng::seed_from_u64(epoch));
            assert!(!pairs.is_empty());
            assert!(pairs.iter().flatten().all(|&t| t < 100), "a held-out track was paired");
            // Each pair lies within one user's training row, which is disjoint from their held-out row.
            assert!(pairs.iter().all(|p| (0..split.index.tracks.num_users()).any(|r| {
                let (train, held) = (split.index.tracks.user(r), split.heldout.user(r));
                p.iter().all(|t| train.contains(t) && !held.contains(t))
            })));
        }
    }

    #[test]
    fn users_below_two_training_tracks_get_no_heldout_tracks() {
        let rows = [
            (0, 1, "play", 0),
            (0, 2, "play", 1),
            (1, 1, "play", 2), // one training track
            (2, 1, "skip", 3), // no positive training track
            (0, 3, "play", 10),
            (1, 2, "play", 11),
            (1, 3, "play", 12),
            (2, 2, "play", 13),
            (2, 3, "play", 14),
            (3, 1, "play", 15), // only after the cutoff
            (3, 2, "play", 16),
        ];
        let it = timed(&rows);
        let split = split_by_time(&it, &positives(), 7.0 / 10.0);
        assert_eq!(split.cutoff_ms, 10);
        assert_eq!(split.index.user_index, [0], "only user 0 has two training tracks");
        assert_eq!(split.heldout.num_users(), 1);
        assert_eq!(split.heldout.user(0), &[3]);
        assert_eq!(split.heldout_cold_user_tracks, 6);
        assert_eq!(split.index.stats.users_below_two_tracks, 2, "users 1 and 2 had training interactions");
        check_time_split(&it, &split);
    }

    #[test]
    fn skips_neither_place_the_cutoff_nor_are_held_out() {
        let mut rows: Vec<(u32, u32, &str, i64)> = (0..10).map(|t| (0, t, "play", t as i64)).collect();
        // Many newer non-positive interactions, some with tracks new to the user.
        rows.extend((0..50).map(|i| (0, 100 + i, if i % 2 == 0 { "skip" } else { "dislike" }, 100 + i as i64)));
        let it = timed(&rows);
        let split = split_by_time(&it, &positives(), 0.2);
        assert_eq!(split.cutoff_ms, 8, "the newest 2 of 10 positives");
        assert_eq!(split.heldout_period_positives, 2);
        assert_eq!(split.heldout.user(0), &[8, 9]);
        assert_eq!(split.index.tracks.user(0), &(0..8).collect::<Vec<_>>()[..]);
        assert_eq!(split.index.stats.interactions, 8);
        check_time_split(&it, &split);
    }

    #[test]
    fn cutoff_holds_out_the_requested_share() {
        // 100 positives at distinct times, stored out of time order.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut times: Vec<i64> = (0..100).map(|i| 1_700_000_000_000 + i * 1_000).collect();
        for i in (1..times.len()).rev() {
            times.swap(i, rng.random_range(0..=i));
        }
        let rows: Vec<_> = times.iter().enumerate().map(|(i, &ts)| ((i % 5) as u32, i as u32, "play", ts)).collect();
        let it = timed(&rows);
        for (fraction, held) in [(0.2, 20), (0.3, 30), (0.01, 1), (0.5, 50), (0.999, 100)] {
            let split = split_by_time(&it, &positives(), fraction);
            assert_eq!(split.heldout_period_positives, held, "fraction {fraction}");
            assert_eq!(split.cutoff_ms, 1_700_000_000_000 + (100 - held as i64) * 1_000);
            assert_eq!(split.heldout_pairs, if held == 100 { 0 } else { held });
            check_time_split(&it, &split);
        }
        // 10 × (1 − 0.8) is just below 2 in floating point; the share is still exact.
        let small = timed(&(0..10).map(|i| (0, i, "play", i as i64)).collect::<Vec<_>>());
        assert_eq!(split_by_time(&small, &positives(), 0.8).heldout_period_positives, 8);
    }

    #[test]
    fn interactions_at_the_cutoff_are_all_held_out() {
        let rows = [(0, 1, "play", 1), (0, 2, "play", 2), (0, 3, "play", 3), (0, 4, "play", 3), (0, 5, "play", 3)];
        let it = timed(&rows);
        let split = split_by_time(&it, &positives(), 0.2);
        assert_eq!(split.cutoff_ms, 3);
        assert_eq!(split.heldout.user(0), &[3, 4, 5]);
        check_time_split(&it, &split);
    }

    #[test]
    fn zero_fraction_holds_out_nothing() {
        let it = messy_history(5);
        let all = CoListenIndex::build(&it, &positives());
        for fraction in [0.0, -0.5, f64::NAN] {
            let split = split_by_time(&it, &positives(), fraction);
            assert_eq!(split.cutoff_ms, i64::MAX);
            assert_eq!((split.heldout_pairs, split.heldout_period_positives, split.heldout.len()), (0, 0, 0));
            assert_eq!(split.heldout.num_users(), all.tracks.num_users());
            assert_eq!(split.index.tracks, all.tracks);
            assert_eq!(split.index.user_index, all.user_index);
            assert_eq!(split.index.stats, all.stats);
        }
        let empty = split_by_time(&Interactions::default(), &positives(), 0.2);
        assert_eq!(
            (empty.cutoff_ms, empty.heldout.num_users(), empty.index.stats.clone()),
            (i64::MAX, 0, MiningStats::default())
        );
    }

    #[test]
    fn playlist_memberships_are_timeless_training() {
        let mut rows: Vec<(u32, u32, &str, i64)> =
            (0..20).map(|t| (0, t, crate::data::PLAYLIST_KIND, i64::MIN)).collect();
        rows.extend([
            (1, 1, "play", 10),
            (1, 2, "play", 20),
            (1, 3, "play", 30),
            (1, 4, "play", 40),
            (0, 50, "play", 50),
        ]);
        let it = timed(&rows);
        let split = split_by_time(&it, &positives(), 0.4);
        // The cutoff comes from the five timed positives only, and the playlist stays whole.
        assert_eq!(split.cutoff_ms, 40);
        assert_eq!(split.timeless_positives, 20);
        assert_eq!(split.index.user_index, [0, 1]);
        assert_eq!(split.index.tracks.user(0).len(), 20);
        assert_eq!(split.heldout.user(0), &[50]);
        assert_eq!(split.heldout.user(1), &[4]);
        check_time_split(&it, &split);
        // All timeless: nothing can be held out.
        let only = timed(&rows[..20]);
        let split = split_by_time(&only, &positives(), 0.4);
        assert_eq!((split.cutoff_ms, split.heldout_pairs, split.index.stats.user_tracks), (i64::MAX, 0, 20));
    }
}
