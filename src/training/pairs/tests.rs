use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::sampler::*;
use super::time_split::*;
use super::*;
use crate::data::Interactions;

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
    let owner =
        |p: &[u32; 2]| (0..train.num_users()).any(|u| train.user(u).contains(&p[0]) && train.user(u).contains(&p[1]));
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
    let mut rows: Vec<(u32, u32, &str, i64)> = (0..20).map(|t| (0, t, crate::data::PLAYLIST_KIND, i64::MIN)).collect();
    rows.extend([(1, 1, "play", 10), (1, 2, "play", 20), (1, 3, "play", 30), (1, 4, "play", 40), (0, 50, "play", 50)]);
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
