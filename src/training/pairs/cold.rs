//! The cold-track hold-out: a seeded share of the catalogue is held out with all its listens, so
//! that a model is judged on tracks it has never seen anyone play — what every new release is.
//!
//! The cold tracks' interactions are removed before the warm split is made, so no part of training
//! (pairs, popularity, logQ, item-CF) sees them. The cold held-out set is every distinct (user,
//! cold track) with a positive interaction, for the users training keeps (they have a query),
//! whatever its time: a cold track has no history to order it against.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Interactions;

use super::keys::{positive_mask, user_track_key};
use super::user_tracks::UserTracks;

/// The cold tracks and the listens kept for training.
pub struct ColdSplit {
    /// `is_cold[t]`: track `t` is held out.
    pub is_cold: Vec<bool>,
    /// The interactions of warm tracks (everything training may see).
    pub warm: Interactions,
    /// The interactions of cold tracks.
    cold: Interactions,
}

/// Holds out `round(share · num_tracks)` tracks, a seeded uniform sample, with all their interactions.
pub fn split_cold_tracks(interactions: &Interactions, num_tracks: usize, share: f64, seed: u64) -> ColdSplit {
    let cold_count = ((num_tracks as f64 * share).round() as usize).min(num_tracks);
    let mut order: Vec<u32> = (0..num_tracks as u32).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC01D_7AC0_0000_0009);
    for i in 0..cold_count {
        let j = rng.random_range(i..num_tracks);
        order.swap(i, j);
    }
    let mut is_cold = vec![false; num_tracks];
    for &t in &order[..cold_count] {
        is_cold[t as usize] = true;
    }
    let empty = || Interactions { user_ids: Vec::new(), kinds: interactions.kinds.clone(), ..Interactions::default() };
    let (mut warm, mut cold) = (empty(), empty());
    for i in 0..interactions.len() {
        let side = if is_cold[interactions.track[i] as usize] { &mut cold } else { &mut warm };
        side.push(interactions.user[i], interactions.track[i], interactions.kind[i], interactions.timestamp_ms[i]);
    }
    warm.user_ids = interactions.user_ids.clone();
    ColdSplit { is_cold, warm, cold }
}

impl ColdSplit {
    /// The cold held-out tracks of each training user: `user_index[row]` is the original user of
    /// training row `row` (as [`super::CoListenIndex::user_index`]).
    pub fn heldout(&self, positive_kinds: &[String], user_index: &[u32]) -> UserTracks {
        let positive = positive_mask(&self.cold, positive_kinds);
        let mut row_of = vec![u32::MAX; self.warm.user_ids.len()];
        for (row, &u) in user_index.iter().enumerate() {
            row_of[u as usize] = row as u32;
        }
        let mut keys: Vec<u64> = (0..self.cold.len())
            .filter(|&i| positive[self.cold.kind[i] as usize] && row_of[self.cold.user[i] as usize] != u32::MAX)
            .map(|i| user_track_key(row_of[self.cold.user[i] as usize], self.cold.track[i]))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut per_user: Vec<Vec<u32>> = vec![Vec::new(); user_index.len()];
        for key in keys {
            per_user[(key >> 32) as usize].push(key as u32);
        }
        UserTracks::from_users(per_user.iter().map(Vec::as_slice))
    }

    pub fn cold_tracks(&self) -> usize {
        self.is_cold.iter().filter(|c| **c).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::pairs::CoListenIndex;

    #[test]
    fn cold_tracks_leave_training_entirely_and_come_back_as_the_cold_heldout() {
        let mut interactions = Interactions::default();
        let play = interactions.kinds.intern("play").unwrap();
        let skip = interactions.kinds.intern("skip").unwrap();
        interactions.user_ids = (0..30).map(|u| format!("u{u}")).collect();
        for u in 0..30u32 {
            for t in 0..10u32 {
                interactions.push(u, (u + t) % 40, play, 0);
            }
            interactions.push(u, (u + 11) % 40, skip, 0);
        }
        let kinds = vec!["play".to_string()];
        let split = split_cold_tracks(&interactions, 40, 0.25, 7);
        assert_eq!(split.cold_tracks(), 10);
        assert!(split.warm.track.iter().all(|&t| !split.is_cold[t as usize]), "no cold listen is trained on");
        assert_eq!(split.warm.len() + split.cold.len(), interactions.len());
        let index = CoListenIndex::build(&split.warm, &kinds);
        let heldout = split.heldout(&kinds, &index.user_index);
        assert_eq!(heldout.num_users(), index.tracks.num_users());
        for (row, &u) in index.user_index.iter().enumerate() {
            let expected: Vec<u32> = {
                let mut e: Vec<u32> = (0..10).map(|t| (u + t) % 40).filter(|&t| split.is_cold[t as usize]).collect();
                e.sort_unstable();
                e
            };
            assert_eq!(heldout.user(row), expected, "user {u}: plays of cold tracks, skips excluded");
        }
        let again = split_cold_tracks(&interactions, 40, 0.25, 7);
        assert_eq!(again.is_cold, split.is_cold, "seeded");
        assert_ne!(split_cold_tracks(&interactions, 40, 0.25, 8).is_cold, split.is_cold);
    }
}
