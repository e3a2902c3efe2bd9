//! The index of each user's positive listens, the random hold-out, and track popularity.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Interactions;

use super::keys::{count_distinct, positive_mask, user_track_key, users_with_two_tracks};
use super::user_tracks::UserTracks;

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

/// Number of training users each track appears with: its popularity, used by the popularity
/// baseline, popular-track subsampling and the logQ correction.
pub fn track_counts(train: &UserTracks, num_tracks: usize) -> Vec<u32> {
    let mut counts = vec![0u32; num_tracks];
    for &t in train.iter().flatten() {
        counts[t as usize] += 1;
    }
    counts
}
