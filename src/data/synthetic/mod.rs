//! A synthetic catalogue and listening history with real latent structure: the embedded default
//! when no database is configured.
//!
//! What makes learning measurable, and not trivial:
//! - **Genres.** Each track belongs to one of `genres` clusters. Eight features are *informative*:
//!   their values are drawn around the genre's centre with a spread wide enough that genres overlap.
//!   Three are *noise*: `key`, `mode` and `liveness` ignore the genre. Cosine over standardised raw
//!   features weighs the noise like the signal, so a model that learns which features matter beats it.
//! - **Personal taste inside a genre.** For each genre a user likes, the user has a taste point near
//!   the genre's centre; a track of that genre is chosen by popularity *and* by closeness of its
//!   informative features to the taste point (a Gaussian kernel, sampled by rejection). So tracks one
//!   user plays together are similar in a user-specific way, finer than the genre.
//! - **Taste neighbourhoods.** Genres sit on a ring; a user likes a primary genre and often its ring
//!   neighbour. Centres are drawn independently of ring position, so "people who play genre 3 also
//!   play genre 4" is visible only in co-listening, never in the features.
//! - **Popularity.** Genre sizes and the choice of track within a genre follow Zipf-like laws, and
//!   heavy users listen far more than light ones (log-normal activity).
//! - **Negative signal.** Users sometimes stray outside their taste; those plays are mostly skips and
//!   dislikes, which pair mining must ignore.
//!
//! The generator is a pure function of its [`SyntheticSpec`]: same spec, same dataset, bit for bit.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, StandardNormal};

use super::source::{DataSource, SyntheticSpec};
use super::tags::TrackTags;
use super::{Catalogue, Dataset, Interactions};
use crate::data::features::{FeatureRow, NUM_FEATURES, idx};

pub mod posterior;

/// Fixed end of the synthetic history, so that the watermark (and everything else) does not depend
/// on the wall clock: 2026-01-01T00:00:00Z.
const HISTORY_END_MS: i64 = 1_767_225_600_000;
const HISTORY_SPAN_MS: i64 = 90 * 24 * 3600 * 1000;

/// Interaction kinds a user emits for tracks of a genre they like, with their probabilities.
const IN_TASTE_KINDS: [(&str, f64); 7] = [
    ("play", 0.55),
    ("listen", 0.15),
    ("like", 0.10),
    ("addToPlaylist", 0.05),
    ("add_to_playlist", 0.03),
    ("skip", 0.10),
    ("dislike", 0.02),
];
/// Kinds for tracks outside the user's taste: mostly rejections.
const OUT_OF_TASTE_KINDS: [(&str, f64); 3] = [("play", 0.3), ("skip", 0.5), ("dislike", 0.2)];
/// Probability that an interaction strays outside the user's taste.
const STRAY_PROBABILITY: f64 = 0.15;
/// Probability that a user also likes a ring neighbour of their primary genre (either side alike).
const NEIGHBOUR_PROBABILITY: f64 = 0.6;
/// Probability that a user likes one more genre, drawn uniformly.
const EXTRA_GENRE_PROBABILITY: f64 = 0.25;
/// Share of a user's in-taste listens that go to the primary genre when they like others too.
const PRIMARY_SHARE: f64 = 0.6;

/// The features that carry genre and taste, with their within-genre spread (one standard
/// deviation of the noise around a genre centre).
const INFORMATIVE: [(usize, f32); 8] = [
    (idx::ACOUSTICNESS, 0.13),
    (idx::DANCEABILITY, 0.13),
    (idx::ENERGY, 0.13),
    (idx::INSTRUMENTALNESS, 0.13),
    (idx::SPEECHINESS, 0.13),
    (idx::VALENCE, 0.13),
    (idx::LOUDNESS, 3.5),
    (idx::TEMPO, 14.0),
];
/// Width of the taste kernel, in within-genre spreads: a track at scaled squared distance d² from
/// the taste point is accepted with probability exp(−d² / (2·width²)).
const TASTE_KERNEL_WIDTH: f32 = 2.0;
/// Rejection-sampling attempts before the last popularity draw is taken as is.
const MAX_TASTE_ATTEMPTS: usize = 64;

struct Genre {
    centre: FeatureRow,
    /// Track indices of this genre, most popular first.
    tracks: Vec<u32>,
    /// Cumulative Zipf weights over `tracks`.
    cumulative: Vec<f64>,
}

/// Generates the dataset described by `spec`. Track and user ids are UUID strings drawn from the
/// seeded generator; tracks are ordered by id, as the Postgres loader orders them.
pub fn generate(spec: &SyntheticSpec) -> Dataset {
    generate_with_truth(spec).0
}

/// [`generate`], with the generator's own listening probabilities ([`GenerativeTruth`]).
pub fn generate_with_truth(spec: &SyntheticSpec) -> (Dataset, GenerativeTruth) {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x5EED_DA7A_5EED_DA7A);
    let genres = spec.genres.max(1);
    let centres: Vec<FeatureRow> = (0..genres).map(|_| genre_centre(&mut rng)).collect();
    let (mut catalogue, mut genre_tracks) = generate_catalogue(spec.tracks, &centres, &mut rng);
    // Artists and albums come from a generator of their own, so that adding them changed nothing
    // else: the features and the history are what they were before tracks had artists.
    let mut tag_rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0xA271_57A1_B0B5_0003);
    catalogue.tags = generate_tags(&catalogue.features, &genre_tracks, &centres, &mut tag_rng);
    let genre_weights = zipf_weights(genres, 0.6);
    let genres: Vec<Genre> = genre_tracks
        .iter_mut()
        .zip(centres)
        .map(|(tracks, centre)| {
            // A random popularity order inside the genre, then Zipf (s = 1) over it.
            shuffle(tracks, &mut rng);
            Genre { centre, cumulative: cumulative(&zipf_weights(tracks.len(), 1.0)), tracks: std::mem::take(tracks) }
        })
        .collect();
    let (mut interactions, tastes) = generate_history(spec, &genres, &genre_weights, &catalogue.features, &mut rng);
    let total_weight: f64 = genre_weights.iter().sum();
    let truth = GenerativeTruth {
        user_ids: interactions.user_ids.clone(),
        tastes,
        centres: genres.iter().map(|g| g.centre).collect(),
        genres: genres.into_iter().map(|g| (g.tracks, probabilities(&g.cumulative))).collect(),
        features: catalogue.features.clone(),
        genre_weights: genre_weights.iter().map(|w| w / total_weight).collect(),
    };
    interactions.canonicalize_users();
    let watermark = super::Watermark::of(&interactions);
    (Dataset { catalogue, interactions, watermark, source: DataSource::Synthetic(spec.clone()) }, truth)
}

/// What the generator knows and a model can only estimate: each user's liked genres and taste
/// points. From them, [`Self::positive_listen_probabilities`] gives the exact probability that the
/// user's next interaction is a positive listen of each track: the Bayes-optimal ranking of a
/// user's future listens, and so the ceiling of Recall@10 on a synthetic history (the `synthetic-ceiling`
/// command measures it).
pub struct GenerativeTruth {
    /// User ids in generation order (`tastes[i]` is `user_ids[i]`'s).
    user_ids: Vec<String>,
    tastes: Vec<Vec<(usize, FeatureRow)>>,
    /// Per genre: its tracks, most popular first, and the probability that a popularity draw
    /// proposes each.
    genres: Vec<(Vec<u32>, Vec<f64>)>,
    features: Vec<FeatureRow>,
    /// Per genre: its centre (the prior mean of a taste point) and its share of primary genres.
    centres: Vec<FeatureRow>,
    genre_weights: Vec<f64>,
}

impl GenerativeTruth {
    /// User ids in generation order: the index of an id is the `user` argument of
    /// [`Self::positive_listen_probabilities`].
    pub fn user_ids(&self) -> &[String] {
        &self.user_ids
    }

    /// Writes into `out` (one slot per catalogue track, overwritten) the probability that one
    /// interaction of generated user `user` is a positive listen (a kind `is_positive` accepts) of each
    /// track, following [`generate_history`] step by step:
    /// - with [`STRAY_PROBABILITY`] a uniform genre and a track by popularity alone;
    /// - otherwise the primary genre (always, or with [`PRIMARY_SHARE`] when there are others) or
    ///   one of the others uniformly, then "popularity proposes, taste accepts": with proposal `p` and acceptance `a`,
    ///   `A = Σ p·a`, up to 63 tests and the 64th proposal taken as is, so
    ///   `P(t) = p(t)·(a(t)·(1 − (1 − A)^63) / A + (1 − A)^63)`;
    /// - then the kind: positive with the in-taste or out-of-taste probabilities of the genre.
    pub fn positive_listen_probabilities(&self, user: usize, is_positive: impl Fn(&str) -> bool, out: &mut [f32]) {
        let taste = &self.tastes[user];
        let k = self.genres.len();
        let (in_taste, out_of_taste) = positive_rates(is_positive);
        let mut prob = vec![0f64; out.len()];
        for (g, (tracks, proposal)) in self.genres.iter().enumerate() {
            let liked = taste.iter().any(|(l, _)| *l == g);
            let weight = STRAY_PROBABILITY / k as f64 * if liked { in_taste } else { out_of_taste };
            for (&t, p) in tracks.iter().zip(proposal) {
                prob[t as usize] += weight * p;
            }
        }
        for (i, (g, point)) in taste.iter().enumerate() {
            let weight = (1.0 - STRAY_PROBABILITY) * taste_share(taste.len(), i) * in_taste;
            let tracks = &self.genres[*g].0;
            for (&t, given) in tracks.iter().zip(self.given_taste(*g, point)) {
                prob[t as usize] += weight * given;
            }
        }
        for (o, p) in out.iter_mut().zip(prob) {
            *o = p as f32;
        }
    }

    /// For each track of genre `g` (in the genre's order), the probability that a listen the
    /// generator draws in `g` for taste point `point` lands on it: popularity proposes, taste
    /// accepts, up to 63 tests and the 64th proposal taken as is. With proposal `p`, acceptance `a`
    /// and `A = Σ p·a`: `p·(a·(1 − (1 − A)^63) / A + (1 − A)^63)`.
    fn given_taste(&self, g: usize, point: &FeatureRow) -> Vec<f64> {
        let (tracks, proposal) = &self.genres[g];
        let accept: Vec<f64> =
            tracks.iter().map(|&t| taste_affinity(&self.features[t as usize], point) as f64).collect();
        let a_total: f64 = accept.iter().zip(proposal).map(|(a, p)| a * p).sum();
        let none_accepted = (1.0 - a_total).powi((MAX_TASTE_ATTEMPTS - 1) as i32);
        let per_accept = if a_total > 0.0 { (1.0 - none_accepted) / a_total } else { 0.0 };
        accept.iter().zip(proposal).map(|(a, p)| p * (a * per_accept + none_accepted)).collect()
    }
}

/// The probabilities that one interaction is a positive listen (a kind `is_positive` accepts) in
/// a genre the user likes and in one they do not.
fn positive_rates(is_positive: impl Fn(&str) -> bool) -> (f64, f64) {
    let rate =
        |kinds: &[(&str, f64)]| -> f64 { kinds.iter().filter(|(name, _)| is_positive(name)).map(|(_, p)| p).sum() };
    (rate(&IN_TASTE_KINDS), rate(&OUT_OF_TASTE_KINDS))
}

/// Share of a user's in-taste listens that go to the `i`-th of their `liked` genres: the primary
/// genre takes [`PRIMARY_SHARE`] when there are others, which split the rest evenly.
const fn taste_share(liked: usize, i: usize) -> f64 {
    match (liked, i) {
        (1, _) => 1.0,
        (_, 0) => PRIMARY_SHARE,
        (n, _) => (1.0 - PRIMARY_SHARE) / (n - 1) as f64,
    }
}

fn generate_catalogue(n: usize, centres: &[FeatureRow], rng: &mut ChaCha8Rng) -> (Catalogue, Vec<Vec<u32>>) {
    let genres = centres.len();
    let size_cum = cumulative(&zipf_weights(genres, 0.6));
    let mut rows: Vec<(String, FeatureRow, usize)> = (0..n)
        .map(|_| {
            let g = sample_cumulative(&size_cum, rng);
            (uuid_from(rng), track_features(&centres[g], rng), g)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut genre_tracks = vec![Vec::new(); genres];
    let mut catalogue = Catalogue::default();
    for (i, (id, features, g)) in rows.into_iter().enumerate() {
        catalogue.track_ids.push(id);
        catalogue.features.push(features);
        genre_tracks[g].push(i as u32);
    }
    (catalogue, genre_tracks)
}

/// Mean tracks per artist; artist sizes inside a genre are Zipf-like around it.
const TRACKS_PER_ARTIST: usize = 8;
/// Tracks per album, at most (an artist's tracks in id order, cut into albums).
const TRACKS_PER_ALBUM: usize = 10;
/// Artists a track's sound is compared with: drawn by share from its genre's artists.
const ARTIST_CANDIDATES: usize = 8;
/// Share of tracks that credit a second artist of the same genre (a feature).
const FEATURING_PROBABILITY: f64 = 0.1;

/// Artists within genres and albums within artists. Each artist of a genre has a sound of its own
/// (a point near the genre's centre) and a Zipf-like share of the genre's tracks; a track goes to
/// one of a few artists drawn by share, the one whose sound is closest to its features most likely. So an artist's tracks sound alike and, since listeners choose by sound, are
/// listened to together: artists carry signal, as they do on a real platform.
fn generate_tags(
    features: &[FeatureRow],
    genre_tracks: &[Vec<u32>],
    centres: &[FeatureRow],
    rng: &mut ChaCha8Rng,
) -> TrackTags {
    let mut artist_of = vec![Vec::new(); features.len()];
    let mut names = NameMaker::default();
    let mut artist_tracks: Vec<Vec<u32>> = Vec::new();
    let mut artist_names: Vec<String> = Vec::new();
    for (tracks, centre) in genre_tracks.iter().zip(centres) {
        let n_artists = tracks.len().div_ceil(TRACKS_PER_ARTIST).max(1);
        let first = artist_tracks.len();
        let sounds: Vec<FeatureRow> = (0..n_artists).map(|_| jitter(centre, 0.6, rng)).collect();
        let shares = cumulative(&zipf_weights(n_artists, 0.8));
        for _ in 0..n_artists {
            artist_names.push(names.artist(rng));
            artist_tracks.push(Vec::new());
        }
        for &t in tracks {
            // Candidates drawn by share, one kept by closeness: share × closeness without scoring
            // every artist of the genre for every track (quadratic in the genre's size).
            let candidates: [usize; ARTIST_CANDIDATES] = std::array::from_fn(|_| sample_cumulative(&shares, rng));
            let closeness: Vec<f64> =
                candidates.iter().map(|&c| taste_affinity(&features[t as usize], &sounds[c]) as f64 + 1e-12).collect();
            let a = first + candidates[sample_cumulative(&cumulative(&closeness), rng)];
            artist_of[t as usize].push(a);
            artist_tracks[a].push(t);
            if n_artists > 1 && rng.random_bool(FEATURING_PROBABILITY) {
                let other = first + (a - first + rng.random_range(1..n_artists)) % n_artists;
                artist_of[t as usize].push(other);
            }
        }
    }
    let mut album_names = Vec::new();
    let mut album_of = vec![0usize; features.len()];
    for (a, tracks) in artist_tracks.iter().enumerate() {
        for chunk in tracks.chunks(TRACKS_PER_ALBUM) {
            for &t in chunk {
                album_of[t as usize] = album_names.len();
            }
            album_names.push(format!("{} — {}", artist_names[a], names.album(rng)));
        }
    }
    let mut tags = TrackTags::default();
    for (artists, &album) in artist_of.iter().zip(&album_of) {
        tags.push(artists.iter().map(|&a| artist_names[a].as_str()), Some(album_names[album].as_str()));
    }
    tags
}

/// Plausible band and album names. Artist names are distinct: a pair of words already used gets
/// a number ("Velvet Harbor 2"); album names are prefixed with their artist's.
#[derive(Default)]
struct NameMaker {
    /// Artists named so far after each (first, second) word pair.
    uses: std::collections::HashMap<(usize, usize), u32>,
}

impl NameMaker {
    const FIRST: [&str; 16] = [
        "Velvet", "Neon", "Silver", "Midnight", "Paper", "Golden", "Electric", "Hollow", "Crimson", "Lunar", "Static",
        "Wild", "Glass", "Northern", "Quiet", "Sunday",
    ];
    const SECOND: [&str; 16] = [
        "Harbor",
        "Echoes",
        "Foxes",
        "Machines",
        "Lights",
        "Rivers",
        "Parade",
        "Ghosts",
        "Tigers",
        "Satellites",
        "Gardens",
        "Wolves",
        "Kites",
        "Avenue",
        "Signals",
        "Orchards",
    ];

    fn artist(&mut self, rng: &mut ChaCha8Rng) -> String {
        let pair = (rng.random_range(0..Self::FIRST.len()), rng.random_range(0..Self::SECOND.len()));
        let uses = self.uses.entry(pair).or_insert(0);
        *uses += 1;
        let base = format!("{} {}", Self::FIRST[pair.0], Self::SECOND[pair.1]);
        if *uses == 1 { base } else { format!("{base} {uses}") }
    }

    fn album(&mut self, rng: &mut ChaCha8Rng) -> String {
        format!(
            "{} {}",
            Self::SECOND[rng.random_range(0..Self::SECOND.len())],
            Self::FIRST[rng.random_range(0..Self::FIRST.len())]
        )
    }
}

/// A genre's centre in the informative features; noise features stay 0 (unused).
fn genre_centre(rng: &mut ChaCha8Rng) -> FeatureRow {
    let mut c = [0f32; NUM_FEATURES];
    c[idx::ACOUSTICNESS] = rng.random_range(0.02..0.95);
    c[idx::DANCEABILITY] = rng.random_range(0.3..0.9);
    c[idx::ENERGY] = rng.random_range(0.1..0.95);
    // Most genres are vocal; a few are instrumental.
    c[idx::INSTRUMENTALNESS] =
        if rng.random_bool(0.7) { rng.random_range(0.0..0.1) } else { rng.random_range(0.5..0.9) };
    c[idx::LOUDNESS] = rng.random_range(-20.0..-3.0);
    c[idx::SPEECHINESS] = rng.random_range(0.03..0.4);
    c[idx::TEMPO] = rng.random_range(70.0..180.0);
    c[idx::VALENCE] = rng.random_range(0.1..0.9);
    c
}

fn track_features(centre: &FeatureRow, rng: &mut ChaCha8Rng) -> FeatureRow {
    let mut r = jitter(centre, 1.0, rng);
    // Noise features: independent of the genre.
    r[idx::KEY] = rng.random_range(0..12) as f32;
    r[idx::MODE] = if rng.random_bool(0.65) { 1.0 } else { 0.0 };
    r[idx::LIVENESS] = 0.03 + 0.9 * rng.random::<f32>().powi(3);
    r
}

/// `centre` plus Gaussian noise of `scale` within-genre spreads on the informative features, clamped
/// to their physical ranges; other features are copied.
fn jitter(centre: &FeatureRow, scale: f32, rng: &mut ChaCha8Rng) -> FeatureRow {
    let mut r = *centre;
    for (f, spread) in INFORMATIVE {
        let (lo, hi) = crate::data::features::FEATURE_RANGES[f];
        r[f] = (centre[f] + scale * spread * rng.sample::<f32, _>(StandardNormal)).clamp(lo, hi);
    }
    r
}

/// Acceptance probability of a track for a taste point (see [`TASTE_KERNEL_WIDTH`]).
fn taste_affinity(track: &FeatureRow, taste: &FeatureRow) -> f32 {
    let d2: f32 = INFORMATIVE.iter().map(|&(f, spread)| ((track[f] - taste[f]) / spread).powi(2)).sum();
    (-d2 / (2.0 * TASTE_KERNEL_WIDTH * TASTE_KERNEL_WIDTH)).exp()
}

fn generate_history(
    spec: &SyntheticSpec,
    genres: &[Genre],
    genre_weights: &[f64],
    features: &[FeatureRow],
    rng: &mut ChaCha8Rng,
) -> (Interactions, Vec<Vec<(usize, FeatureRow)>>) {
    let k = genres.len();
    let genre_cum = cumulative(genre_weights);
    let mut out = Interactions::default();
    let kind_codes: Vec<u8> =
        IN_TASTE_KINDS.iter().map(|(name, _)| out.kinds.intern(name).expect("few kinds")).collect();
    let in_taste_cum = cumulative(&IN_TASTE_KINDS.map(|(_, p)| p));
    let out_taste: Vec<(u8, f64)> =
        OUT_OF_TASTE_KINDS.iter().map(|(name, p)| (out.kinds.code(name).expect("interned above"), *p)).collect();
    let out_taste_cum = cumulative(&out_taste.iter().map(|(_, p)| *p).collect::<Vec<_>>());

    // Each user's taste: a primary genre, often its ring neighbour, sometimes one more genre, each
    // with a personal taste point one within-genre spread around the genre's centre.
    let tastes: Vec<Vec<(usize, FeatureRow)>> = (0..spec.users)
        .map(|_| {
            let primary = sample_cumulative(&genre_cum, rng);
            let mut liked = vec![primary];
            if k > 1 && rng.random_bool(NEIGHBOUR_PROBABILITY) {
                let neighbour = if rng.random_bool(0.5) { (primary + 1) % k } else { (primary + k - 1) % k };
                liked.push(neighbour);
            }
            if k > 2 && rng.random_bool(EXTRA_GENRE_PROBABILITY) {
                liked.push(rng.random_range(0..k));
            }
            liked.dedup();
            liked.into_iter().map(|g| (g, jitter(&genres[g].centre, 1.0, rng))).collect()
        })
        .collect();
    let activity = LogNormal::new(0.0, 1.0).expect("valid log-normal");
    let user_cum = cumulative(&(0..spec.users).map(|_| activity.sample(rng)).collect::<Vec<f64>>());
    out.user_ids = (0..spec.users).map(|_| uuid_from(rng)).collect();
    if spec.users == 0 || genres.iter().all(|g| g.tracks.is_empty()) {
        return (out, tastes);
    }
    for _ in 0..spec.interactions {
        let u = sample_cumulative(&user_cum, rng);
        let taste = &tastes[u];
        let stray = rng.random_bool(STRAY_PROBABILITY);
        let (g, taste_point) = if stray {
            (rng.random_range(0..k), None)
        } else if taste.len() == 1 || rng.random_bool(PRIMARY_SHARE) {
            (taste[0].0, Some(&taste[0].1))
        } else {
            let (g, point) = &taste[rng.random_range(1..taste.len())];
            (*g, Some(point))
        };
        let genre = &genres[g];
        if genre.tracks.is_empty() {
            continue;
        }
        let mut track = genre.tracks[sample_cumulative(&genre.cumulative, rng)];
        if let Some(point) = taste_point {
            // Popularity proposes, taste accepts.
            for _ in 1..MAX_TASTE_ATTEMPTS {
                if rng.random::<f32>() < taste_affinity(&features[track as usize], point) {
                    break;
                }
                track = genre.tracks[sample_cumulative(&genre.cumulative, rng)];
            }
        }
        let in_taste = taste.iter().any(|(liked, _)| *liked == g);
        let kind = if in_taste {
            kind_codes[sample_cumulative(&in_taste_cum, rng)]
        } else {
            out_taste[sample_cumulative(&out_taste_cum, rng)].0
        };
        let ts = HISTORY_END_MS - rng.random_range(0..HISTORY_SPAN_MS);
        out.push(u as u32, track, kind, ts);
    }
    (out, tastes)
}

/// Each index's probability under the weights behind `cum` (a running sum).
fn probabilities(cum: &[f64]) -> Vec<f64> {
    let total = cum.last().copied().unwrap_or(1.0);
    let mut previous = 0.0;
    cum.iter()
        .map(|&c| {
            let p = (c - previous) / total;
            previous = c;
            p
        })
        .collect()
}

fn zipf_weights(n: usize, s: f64) -> Vec<f64> {
    (0..n).map(|r| 1.0 / ((r + 1) as f64).powf(s)).collect()
}

fn cumulative(weights: &[f64]) -> Vec<f64> {
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w;
            acc
        })
        .collect()
}

/// Index drawn with probability proportional to the weights behind `cum` (a running sum).
fn sample_cumulative(cum: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let total = *cum.last().expect("non-empty weights");
    let x = rng.random::<f64>() * total;
    cum.partition_point(|&c| c <= x).min(cum.len() - 1)
}

fn shuffle(v: &mut [u32], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.random_range(0..=i));
    }
}

fn uuid_from(rng: &mut ChaCha8Rng) -> String {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::features::FEATURE_RANGES;

    fn small() -> SyntheticSpec {
        SyntheticSpec { tracks: 600, users: 50, interactions: 4_000, genres: 8, seed: 7 }
    }

    #[test]
    fn the_generative_truth_matches_the_listens_the_generator_draws() {
        // One user, so every draw is theirs: each track's count of positive listens is binomial with
        // the probability the truth gives it.
        let spec = SyntheticSpec { tracks: 120, users: 1, interactions: 200_000, genres: 4, seed: 11 };
        let (dataset, truth) = generate_with_truth(&spec);
        let mut p = vec![0f32; spec.tracks];
        let positive = |kind: &str| !matches!(kind, "skip" | "dislike");
        truth.positive_listen_probabilities(0, positive, &mut p);
        let mut counts = vec![0f64; spec.tracks];
        let i = &dataset.interactions;
        for (&t, &k) in i.track.iter().zip(&i.kind) {
            if positive(i.kinds.name(k)) {
                counts[t as usize] += 1.0;
            }
        }
        let n = spec.interactions as f64;
        let positives: f64 = counts.iter().sum();
        let expected: f64 = p.iter().map(|&p| p as f64).sum();
        assert!((positives / n - expected).abs() < 0.005, "positive share {} vs {expected}", positives / n);
        let mut worst = 0f64;
        for (c, &p) in counts.iter().zip(&p) {
            let mean = p as f64 * n;
            let z = (c - mean) / (mean * (1.0 - p as f64)).sqrt().max(1.0);
            worst = worst.max(z.abs());
        }
        // 120 tracks: |z| beyond 4.5 by chance has probability ~1e-4.
        assert!(worst < 4.5, "a track's positive count is {worst:.1} standard errors off its probability");
    }

    #[test]
    fn same_spec_same_dataset() {
        let a = generate(&small());
        let b = generate(&small());
        assert_eq!(a.catalogue.track_ids, b.catalogue.track_ids);
        assert_eq!(a.catalogue.features, b.catalogue.features);
        assert_eq!(a.interactions.track, b.interactions.track);
        assert_eq!(a.interactions.timestamp_ms, b.interactions.timestamp_ms);
        let c = generate(&SyntheticSpec { seed: 8, ..small() });
        assert_ne!(a.interactions.track, c.interactions.track);
    }

    #[test]
    fn features_respect_physical_ranges_and_types() {
        let d = generate(&small());
        for row in &d.catalogue.features {
            for (f, &(lo, hi)) in FEATURE_RANGES.iter().enumerate() {
                assert!(row[f] >= lo && row[f] <= hi, "feature {f} = {} outside [{lo}, {hi}]", row[f]);
            }
            assert_eq!(row[idx::KEY].fract(), 0.0);
            assert!(row[idx::MODE] == 0.0 || row[idx::MODE] == 1.0);
        }
    }

    #[test]
    fn sizes_ids_and_kinds() {
        let d = generate(&small());
        assert_eq!(d.catalogue.len(), 600);
        assert_eq!(d.interactions.len(), 4_000);
        assert_eq!(d.interactions.user_ids.len(), 50);
        assert!(d.catalogue.track_ids.windows(2).all(|w| w[0] < w[1]), "tracks sorted by id, unique");
        for kind in ["play", "skip", "dislike", "like", "listen", "addToPlaylist", "add_to_playlist"] {
            let code = d.interactions.kinds.code(kind).unwrap();
            assert!(d.interactions.kind.contains(&code), "no {kind} generated");
        }
        assert!(d.watermark.newest_interaction_ms.unwrap() <= HISTORY_END_MS);
        assert!(d.interactions.user_ids.windows(2).all(|w| w[0] < w[1]), "users sorted by id");
    }

    #[test]
    fn popularity_is_skewed() {
        let d = generate(&SyntheticSpec { interactions: 20_000, ..small() });
        let mut counts = vec![0usize; d.catalogue.len()];
        for &t in &d.interactions.track {
            counts[t as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top_decile: usize = counts[..60].iter().sum();
        assert!(top_decile as f64 > 0.3 * 20_000.0, "top 10% of tracks get {top_decile} of 20000 plays");
    }

    #[test]
    fn artists_group_similar_tracks_within_a_genre_and_albums_within_an_artist() {
        let d = generate(&SyntheticSpec { tracks: 2_000, ..small() });
        let tags = &d.catalogue.tags;
        assert_eq!(tags.len(), 2_000);
        assert!((1..=2).contains(&tags.artists_of(0).len()));
        assert!((0..tags.len()).all(|t| !tags.artists_of(t).is_empty() && tags.album_of(t).is_some()));
        let mut sizes = tags.tracks_per_artist();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mean = sizes.iter().sum::<u32>() as f64 / sizes.len() as f64;
        assert!(sizes[0] as f64 > 3.0 * mean, "artist sizes are skewed: largest {} vs mean {mean:.1}", sizes[0]);
        // Tracks of one artist sound more alike than random pairs of tracks.
        let dist = |a: usize, b: usize| -> f32 {
            INFORMATIVE
                .iter()
                .map(|&(f, s)| ((d.catalogue.features[a][f] - d.catalogue.features[b][f]) / s).powi(2))
                .sum()
        };
        let (mut same, mut same_n, mut any, mut any_n) = (0f64, 0, 0f64, 0);
        for t in 1..tags.len() {
            any += dist(t - 1, t) as f64;
            any_n += 1;
            if let Some(u) = (0..t).rev().take(200).find(|&u| tags.artists_of(u)[0] == tags.artists_of(t)[0]) {
                same += dist(u, t) as f64;
                same_n += 1;
            }
        }
        assert!(
            same / (same_n as f64) < 0.7 * any / (any_n as f64),
            "same-artist distance {} vs random {}",
            same / same_n as f64,
            any / any_n as f64
        );
        // An album never spans two lead artists.
        let mut lead_of_album = std::collections::HashMap::new();
        for t in 0..tags.len() {
            let lead = tags.artists_of(t)[0];
            assert_eq!(*lead_of_album.entry(tags.album_of(t).unwrap()).or_insert(lead), lead);
        }
    }

    #[test]
    fn tags_are_a_function_of_the_seed() {
        let a = generate(&small());
        let b = generate(&small());
        assert_eq!(a.catalogue.tags, b.catalogue.tags);
        let c = generate(&SyntheticSpec { seed: 8, ..small() });
        assert_ne!(a.catalogue.tags, c.catalogue.tags);
    }
}
