//! Helpers of index building: positive kinds, (user, track) sort keys, distinct counts.

use crate::data::Interactions;

use super::user_tracks::UserTracks;

/// Which kind codes are positive: the named `positive_kinds` present in the data, and
/// [`crate::data::PLAYLIST_KIND`] (playlist co-membership rows exist only when that source was loaded).
pub(super) fn positive_mask(interactions: &Interactions, positive_kinds: &[String]) -> [bool; 256] {
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
pub(super) fn user_track_key(user: u32, track: u32) -> u64 {
    ((user as u64) << 32) | track as u64
}

pub(super) fn key_user(key: u64) -> u32 {
    (key >> 32) as u32
}

/// The CSR rows of the users with at least two tracks in `keys` (sorted, distinct), and their
/// original user indices (ascending).
pub(super) fn users_with_two_tracks(keys: &[u64]) -> (UserTracks, Vec<u32>) {
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
pub(super) fn count_distinct(v: &[u32]) -> usize {
    count_distinct_where(v, |_| true)
}

/// Distinct values among the `v[i]` with `keep(i)`.
pub(super) fn count_distinct_where(v: &[u32], keep: impl Fn(usize) -> bool) -> usize {
    let Some(&max) = v.iter().max() else { return 0 };
    let mut seen = vec![false; max as usize + 1];
    v.iter().enumerate().filter(|&(i, &x)| keep(i) && !std::mem::replace(&mut seen[x as usize], true)).count()
}
