//! The best ranking a user's *history* allows, as opposed to the ceiling, which knows the user.
//!
//! [`GenerativeTruth::positive_listen_probabilities`] ranks by each user's true genres and taste
//! points, which no ranker can see. [`HistoryPosterior`] knows everything else the generator knows —
//! every track's genre and popularity, the genre centres, the taste kernel, the priors over genres
//! and taste points — and infers the user's genres and taste points from the tracks they played, by
//! Bayes' rule:
//! - **Taste points** by importance sampling, per user and genre they played: points drawn near
//!   where their tracks in the genre sit (see [`HistoryPosterior::draw_tastes`]), weighted by the
//!   generator's own prior (the genre's centre jittered by one within-genre spread) times the
//!   likelihood of those tracks, over the proposal.
//! - **Genres** by enumeration: every (primary, ring neighbour or none, extra genre or none) the
//!   generator can draw, with its prior, times the likelihood of the user's tracks (a genre the
//!   hypothesis does not like explains its tracks as strays only).
//!
//! The predictive probability of a positive listen of each track is then averaged over both.
//! What it leaves out, so that the figure is an estimate of the achievable, not a proof: the history
//! is the user's *set* of positive tracks (repeats and the skips and dislikes that also carry genre
//! are not seen, as no model sees them either), treated as independent draws; a hypothesis that
//! likes its primary genre twice (`[p, n, p]`, about 1 % of users) is scored as one taste point with
//! both shares; and finitely many taste samples (the `synthetic-ceiling` figures settle within one
//! standard error as they grow, see the README).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::{
    EXTRA_GENRE_PROBABILITY, GenerativeTruth, INFORMATIVE, NEIGHBOUR_PROBABILITY, STRAY_PROBABILITY,
    TASTE_KERNEL_WIDTH, jitter, positive_rates, taste_share,
};
use crate::data::features::FEATURE_RANGES;

/// The shares a liked genre can have in a user's in-taste listens, from the generator's own
/// [`taste_share`]: alone; first of two or three; second of two; second or third of three; a
/// primary genre liked twice (`[p, n, p]`, see [`liked_genre_lists`]).
const SHARES: [f64; 5] =
    [taste_share(1, 0), taste_share(2, 0), taste_share(2, 1), taste_share(3, 1), taste_share(3, 0) + taste_share(3, 2)];

/// Bayes' rule over a user's genres and taste points, from the tracks they played.
pub struct HistoryPosterior<'a> {
    truth: &'a GenerativeTruth,
    /// Taste points drawn per touched genre and user; `None` ignores taste.
    samples: Option<usize>,
    genre_of: Vec<u32>,
    /// A track's index inside its genre's list.
    slot: Vec<u32>,
    /// Per genre: the predictive of a listen in it for a user with no tracks in it.
    prior_predictive: Vec<Vec<f64>>,
    /// Every liked-genre list the generator can draw (see [`liked_genre_lists`]).
    hypotheses: Vec<(f64, Vec<(usize, usize)>)>,
    /// Probability that an interaction is a positive listen, in and out of the user's taste.
    in_positive: f64,
    out_positive: f64,
}

/// Taste points drawn from the prior per genre for the predictive of genres a user has no tracks in.
const PRIOR_SAMPLES: usize = 1024;
/// Width of the importance proposal for a taste point, in the standard deviations of the Gaussian
/// posterior it approximates: wider than that posterior, so the weights stay bounded.
const PROPOSAL_WIDTH: f32 = 1.5;

impl GenerativeTruth {
    /// [`HistoryPosterior`] drawing `samples` taste points per touched genre and user; with `None`,
    /// taste is ignored (inside a genre, tracks are ranked by popularity alone, which isolates what
    /// the genres are worth).
    pub fn history_posterior(
        &self,
        samples: Option<usize>,
        is_positive: impl Fn(&str) -> bool,
    ) -> HistoryPosterior<'_> {
        let (in_positive, out_positive) = positive_rates(is_positive);
        let mut genre_of = vec![0u32; self.features.len()];
        let mut slot = vec![0u32; self.features.len()];
        let mut rng = ChaCha8Rng::seed_from_u64(0x7A57_E000_0000_0001);
        let prior_predictive = self
            .genres
            .iter()
            .enumerate()
            .map(|(g, (tracks, proposal))| {
                for (i, &t) in tracks.iter().enumerate() {
                    genre_of[t as usize] = g as u32;
                    slot[t as usize] = i as u32;
                }
                if samples.is_none() {
                    return proposal.clone();
                }
                let mut mean = vec![0f64; tracks.len()];
                for _ in 0..PRIOR_SAMPLES {
                    let row = self.given_taste(g, &jitter(&self.centres[g], 1.0, &mut rng));
                    mean.iter_mut().zip(row).for_each(|(m, r)| *m += r / PRIOR_SAMPLES as f64);
                }
                mean
            })
            .collect();
        HistoryPosterior {
            truth: self,
            samples: samples.map(|s| s.max(1)),
            genre_of,
            slot,
            prior_predictive,
            hypotheses: liked_genre_lists(&self.genre_weights),
            in_positive,
            out_positive,
        }
    }
}

/// One touched genre's evidence: taste points drawn for this user, the log-likelihood of the
/// user's tracks in the genre under each (importance-weighted), for each share in [`SHARES`], and
/// as strays of a genre the user does not like.
struct Evidence {
    genre: usize,
    /// `samples × tracks`: the genre's listen probabilities under each drawn taste point.
    rows: Vec<f64>,
    per_sample: [Vec<f64>; SHARES.len()],
    log_marginal: [f64; SHARES.len()],
    as_strays: f64,
}

impl HistoryPosterior<'_> {
    /// Writes into `out` (one slot per catalogue track, overwritten) the posterior predictive
    /// probability that the user's next interaction is a positive listen of each track, given the
    /// user's `history` (catalogue indices of the tracks they played).
    pub fn probabilities(&self, history: &[u32], out: &mut [f32]) {
        let k = self.truth.genres.len();
        let stray = STRAY_PROBABILITY / k as f64;
        let evidence: Vec<Evidence> = self.evidence(history, stray);
        // Posterior over the genre hypotheses: accumulate, per genre, the probability it is liked
        // and the posterior weight of each share.
        let mut liked = vec![0f64; k];
        let mut share_weight = vec![[0f64; SHARES.len()]; k];
        let hypotheses = &self.hypotheses;
        let log_post: Vec<f64> = hypotheses
            .iter()
            .map(|(prior, shares)| {
                prior.ln()
                    + evidence
                        .iter()
                        .map(|e| match shares.iter().find(|(g, _)| *g == e.genre) {
                            Some((_, s)) => e.log_marginal[*s],
                            None => e.as_strays,
                        })
                        .sum::<f64>()
            })
            .collect();
        let top = log_post.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = log_post.iter().map(|l| (l - top).exp()).sum();
        for ((_, shares), l) in hypotheses.iter().zip(&log_post) {
            let w = (l - top).exp() / total;
            for &(g, s) in shares {
                liked[g] += w;
                share_weight[g][s] += w;
            }
        }
        let mut prob = vec![0f64; out.len()];
        for (g, (tracks, proposal)) in self.truth.genres.iter().enumerate() {
            let stray_rate = stray * (liked[g] * self.in_positive + (1.0 - liked[g]) * self.out_positive);
            for (&t, p) in tracks.iter().zip(proposal) {
                prob[t as usize] += stray_rate * p;
            }
            // In-taste listens: Σ over shares of P(share) · (1 − σ) · share · in-positive, times the
            // genre's predictive under the posterior over taste points for that share.
            let coefficient = |s: usize| share_weight[g][s] * (1.0 - STRAY_PROBABILITY) * SHARES[s] * self.in_positive;
            let n = tracks.len();
            match evidence.iter().find(|e| e.genre == g) {
                None => {
                    let c: f64 = (0..SHARES.len()).map(coefficient).sum();
                    for (&t, p) in tracks.iter().zip(&self.prior_predictive[g]) {
                        prob[t as usize] += c * p;
                    }
                }
                Some(e) => {
                    let samples = e.per_sample[0].len();
                    let mut per_sample = vec![0f64; samples];
                    for s in 0..SHARES.len() {
                        let c = coefficient(s);
                        if c == 0.0 {
                            continue;
                        }
                        for (v, l) in per_sample.iter_mut().zip(&e.per_sample[s]) {
                            *v += c * (l - e.log_marginal[s]).exp() / samples as f64;
                        }
                    }
                    let largest = per_sample.iter().copied().fold(0.0, f64::max);
                    for (v, row) in per_sample.iter().zip(e.rows.chunks(n)) {
                        if *v > largest * 1e-9 {
                            for (&t, r) in tracks.iter().zip(row) {
                                prob[t as usize] += v * r;
                            }
                        }
                    }
                }
            }
        }
        for (o, p) in out.iter_mut().zip(prob) {
            *o = p as f32;
        }
    }

    fn evidence(&self, history: &[u32], stray: f64) -> Vec<Evidence> {
        let mut by_genre: Vec<(usize, Vec<usize>)> = Vec::new();
        for &t in history {
            let (g, i) = (self.genre_of[t as usize] as usize, self.slot[t as usize] as usize);
            match by_genre.iter_mut().find(|(h, _)| *h == g) {
                Some((_, slots)) => slots.push(i),
                None => by_genre.push((g, vec![i])),
            }
        }
        by_genre
            .into_iter()
            .map(|(g, slots)| {
                let proposal = &self.truth.genres[g].1;
                let n = proposal.len();
                let as_strays = slots.iter().map(|&i| (stray * self.out_positive * proposal[i]).ln()).sum();
                let (rows, correction) = match self.samples {
                    None => (proposal.clone(), vec![0.0]),
                    Some(m) => self.draw_tastes(g, &slots, m),
                };
                let per_sample: [Vec<f64>; SHARES.len()] = std::array::from_fn(|s| {
                    let in_taste = (1.0 - STRAY_PROBABILITY) * SHARES[s] * self.in_positive;
                    rows.chunks(n)
                        .zip(&correction)
                        .map(|(row, c)| {
                            c + slots
                                .iter()
                                .map(|&i| (in_taste * row[i] + stray * self.in_positive * proposal[i]).ln())
                                .sum::<f64>()
                        })
                        .collect()
                });
                let log_marginal = std::array::from_fn(|s| log_mean_exp(&per_sample[s]));
                Evidence { genre: g, rows, per_sample, log_marginal, as_strays }
            })
            .collect()
    }

    /// Draws `m` taste points for a user who played the tracks at `slots` of genre `g`, by
    /// importance sampling: the proposal is the Gaussian posterior the taste kernel would give if
    /// every track were equally likely to be proposed (prior: the genre's centre, one spread wide;
    /// each played track: a kernel-wide Gaussian observation of the point), widened by
    /// [`PROPOSAL_WIDTH`]. Returns the genre's listen probabilities under each point and each
    /// point's log prior-over-proposal weight. As in the generator, a point is drawn unclamped and
    /// clamped to the features' physical ranges, so the weight is that of the unclamped draw.
    fn draw_tastes(&self, g: usize, slots: &[usize], m: usize) -> (Vec<f64>, Vec<f64>) {
        let truth = self.truth;
        let (tracks, _) = &truth.genres[g];
        let centre = &truth.centres[g];
        let played = slots.len() as f32;
        let kernel = TASTE_KERNEL_WIDTH * TASTE_KERNEL_WIDTH;
        // A track of the genre sits one spread around the centre and is kept by a kernel around the
        // point, so a played track is a Gaussian draw around `c + (τ − c) / (w² + 1)` with variance
        // `w² / (w² + 1)` (spread units): each says little about the point, and pulls toward the centre.
        let precision = 1.0 + played / (kernel * (kernel + 1.0));
        let key = slots.iter().fold(g as u64, |h, &i| h.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64));
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        let proposal: [(f32, f32); INFORMATIVE.len()] = std::array::from_fn(|d| {
            let (f, spread) = INFORMATIVE[d];
            let sum: f32 = slots.iter().map(|&i| truth.features[tracks[i] as usize][f]).sum();
            (centre[f] + (sum - played * centre[f]) / kernel / precision, PROPOSAL_WIDTH * spread / precision.sqrt())
        });
        let mut rows = Vec::with_capacity(m * tracks.len());
        let mut correction = Vec::with_capacity(m);
        for _ in 0..m {
            let mut point = *centre;
            let mut log_weight = 0f64;
            for ((f, spread), (mean, width)) in INFORMATIVE.into_iter().zip(proposal) {
                let z = mean + width * rng.sample::<f32, _>(StandardNormal);
                let (prior, proposal) = (((z - centre[f]) / spread) as f64, ((z - mean) / width) as f64);
                log_weight += -0.5 * prior * prior + 0.5 * proposal * proposal + ((width / spread) as f64).ln();
                let (lo, hi) = FEATURE_RANGES[f];
                point[f] = z.clamp(lo, hi);
            }
            rows.extend(truth.given_taste(g, &point));
            correction.push(log_weight);
        }
        (rows, correction)
    }
}

/// Every liked-genre list the generator can draw (`generate_history`), with its prior probability,
/// as (genre, index into [`SHARES`]) pairs: a primary genre by `genre_weights`; with
/// [`NEIGHBOUR_PROBABILITY`] a ring neighbour, either side alike; with [`EXTRA_GENRE_PROBABILITY`]
/// one more genre, uniform; consecutive repeats dropped, as the generator does. A genre listed
/// twice (`[p, n, p]`) gets both of its shares.
fn liked_genre_lists(genre_weights: &[f64]) -> Vec<(f64, Vec<(usize, usize)>)> {
    let k = genre_weights.len();
    let neighbours: Vec<(f64, Option<isize>)> = if k > 1 {
        let side = NEIGHBOUR_PROBABILITY / 2.0;
        vec![(1.0 - NEIGHBOUR_PROBABILITY, None), (side, Some(1)), (side, Some(-1))]
    } else {
        vec![(1.0, None)]
    };
    let extras: Vec<(f64, Option<usize>)> = if k > 2 {
        std::iter::once((1.0 - EXTRA_GENRE_PROBABILITY, None))
            .chain((0..k).map(|e| (EXTRA_GENRE_PROBABILITY / k as f64, Some(e))))
            .collect()
    } else {
        vec![(1.0, None)]
    };
    let mut out = Vec::new();
    for (primary, weight) in genre_weights.iter().enumerate() {
        for &(pn, side) in &neighbours {
            for &(pe, extra) in &extras {
                let mut liked = vec![primary];
                if let Some(side) = side {
                    liked.push((primary as isize + side).rem_euclid(k as isize) as usize);
                }
                liked.extend(extra);
                liked.dedup();
                let mut shares: Vec<(usize, f64)> = Vec::with_capacity(liked.len());
                for (i, &g) in liked.iter().enumerate() {
                    match shares.iter_mut().find(|(h, _)| *h == g) {
                        Some((_, share)) => *share += taste_share(liked.len(), i),
                        None => shares.push((g, taste_share(liked.len(), i))),
                    }
                }
                let shares = shares
                    .into_iter()
                    .map(|(g, share)| {
                        let s = SHARES.iter().position(|&x| (x - share).abs() < 1e-9);
                        (g, s.expect("every share the generator gives is listed in SHARES"))
                    })
                    .collect();
                out.push((weight * pn * pe, shares));
            }
        }
    }
    out
}

fn log_mean_exp(values: &[f64]) -> f64 {
    let top = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if top == f64::NEG_INFINITY {
        return top;
    }
    top + (values.iter().map(|v| (v - top).exp()).sum::<f64>() / values.len() as f64).ln()
}

#[cfg(test)]
mod tests {
    use super::super::generate_with_truth;
    use crate::data::source::SyntheticSpec;

    fn positive(kind: &str) -> bool {
        !matches!(kind, "skip" | "dislike")
    }

    /// Total variation between two score vectors read as distributions.
    fn distance(a: &[f32], b: &[f32]) -> f64 {
        let (sa, sb) = (a.iter().map(|&x| x as f64).sum::<f64>(), b.iter().map(|&x| x as f64).sum::<f64>());
        a.iter().zip(b).map(|(&x, &y)| (x as f64 / sa - y as f64 / sb).abs()).sum::<f64>() / 2.0
    }

    #[test]
    fn a_history_moves_the_posterior_towards_the_users_own_probabilities() {
        let spec = SyntheticSpec { tracks: 2_000, users: 40, interactions: 8_000, genres: 8, seed: 5 };
        let (dataset, truth) = generate_with_truth(&spec);
        let with_taste = truth.history_posterior(Some(256), positive);
        let genres_only = truth.history_posterior(None, positive);
        let i = &dataset.interactions;
        let (mut prior_gap, mut genre_gap, mut taste_gap) = (0f64, 0f64, 0f64);
        for (generated, id) in truth.user_ids().iter().enumerate() {
            let row = i.user_ids.iter().position(|u| u == id).expect("every user is in the history") as u32;
            let mut history: Vec<u32> = (0..i.track.len())
                .filter(|&j| i.user[j] == row && positive(i.kinds.name(i.kind[j])))
                .map(|j| i.track[j])
                .collect();
            history.sort_unstable();
            history.dedup();
            let mut own = vec![0f32; spec.tracks];
            truth.positive_listen_probabilities(generated, positive, &mut own);
            let mut estimate = vec![0f32; spec.tracks];
            with_taste.probabilities(&[], &mut estimate);
            prior_gap += distance(&estimate, &own);
            genres_only.probabilities(&history, &mut estimate);
            genre_gap += distance(&estimate, &own);
            with_taste.probabilities(&history, &mut estimate);
            taste_gap += distance(&estimate, &own);
            // Probabilities of one interaction: they sum to at most one.
            let total: f64 = estimate.iter().map(|&p| p as f64).sum();
            assert!(total > 0.0 && total <= 1.0 + 1e-4, "predictive mass {total}");
        }
        // Deterministic (seeded) figures: 0.71 for the prior, 0.22 with genres, 0.15 with taste. Flipping
        // the sign of the importance weights' prior-over-proposal term gives 0.18 with taste.
        let n = truth.user_ids().len() as f64;
        let (prior_gap, genre_gap, taste_gap) = (prior_gap / n, genre_gap / n, taste_gap / n);
        assert!(genre_gap < 0.6 * prior_gap, "genres: {genre_gap:.3} against the prior's {prior_gap:.3}");
        assert!(taste_gap < 0.75 * genre_gap, "taste: {taste_gap:.3} against genres alone {genre_gap:.3}");
    }

    #[test]
    fn the_genre_hypotheses_are_a_distribution_over_up_to_three_liked_genres() {
        let spec = SyntheticSpec { tracks: 300, users: 5, interactions: 100, genres: 7, seed: 3 };
        let (_, truth) = generate_with_truth(&spec);
        let posterior = truth.history_posterior(None, positive);
        let total: f64 = posterior.hypotheses.iter().map(|(p, _)| p).sum();
        assert!((total - 1.0).abs() < 1e-9, "priors sum to {total}");
        for (_, shares) in &posterior.hypotheses {
            let share: f64 = shares.iter().map(|&(_, s)| super::SHARES[s]).sum();
            assert!((share - 1.0).abs() < 1e-9 && shares.len() <= 3, "{shares:?}");
        }
    }

    #[test]
    fn an_empty_history_is_the_same_prior_for_everyone_and_a_track_played_raises_its_genre() {
        let spec = SyntheticSpec { tracks: 600, users: 10, interactions: 1_000, genres: 6, seed: 9 };
        let (_, truth) = generate_with_truth(&spec);
        let posterior = truth.history_posterior(Some(64), positive);
        let mut prior = vec![0f32; spec.tracks];
        posterior.probabilities(&[], &mut prior);
        let genre_of = |t: u32| posterior.genre_of[t as usize] as usize;
        let mass = |p: &[f32], g: usize| -> f64 {
            p.iter().enumerate().filter(|(t, _)| genre_of(*t as u32) == g).map(|(_, &x)| x as f64).sum()
        };
        // Three tracks of one genre make that genre likelier than the prior says, and the others less.
        let g = genre_of(0);
        let played: Vec<u32> = (0..spec.tracks as u32).filter(|&t| genre_of(t) == g).take(3).collect();
        let mut after = vec![0f32; spec.tracks];
        posterior.probabilities(&played, &mut after);
        assert!(mass(&after, g) > 2.0 * mass(&prior, g), "{} vs {}", mass(&after, g), mass(&prior, g));
        let other = (g + 3) % spec.genres;
        assert!(mass(&after, other) < mass(&prior, other));
    }
}
