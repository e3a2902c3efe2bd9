//! The time-ordered hold-out: train on what came before an instant, evaluate on what users
//! discovered after it.

use crate::data::Interactions;

use super::index::{CoListenIndex, MiningStats};
use super::keys::*;
use super::user_tracks::UserTracks;

/// The timestamp of interactions that carry no time: playlist memberships (`db::load` stores them
/// at `i64::MIN`). They are never in a held-out period and never define a cutoff.
pub(super) const TIMELESS_MS: i64 = i64::MIN;

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
pub(super) fn heldout_cutoff(times: &mut [i64], fraction: f64) -> Option<i64> {
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
