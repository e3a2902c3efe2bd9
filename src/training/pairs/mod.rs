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
//!
//! Files: [`index`] (the index, the random hold-out, popularity), [`time_split`], [`sampler`], and
//! below them `keys` (helpers of index building) and `user_tracks` (the rows they all share).

pub mod cold;
pub mod index;
mod keys;
pub mod sampler;
pub mod time_split;
mod user_tracks;

pub use cold::{ColdSplit, split_cold_tracks};
pub use index::{CoListenIndex, MiningStats, track_counts};
pub use sampler::{PairSampler, SamplingConfig, validation_pairs};
pub use time_split::{TimeSplit, split_by_time};
pub use user_tracks::UserTracks;

/// Interaction kinds that count as positive evidence by default (PLATFORM.md).
pub const DEFAULT_POSITIVE_KINDS: [&str; 5] = ["play", "listen", "like", "addToPlaylist", "add_to_playlist"];

#[cfg(test)]
mod tests;
