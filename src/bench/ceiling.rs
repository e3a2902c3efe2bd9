//! The ceiling of the synthetic history: how well anything can rank its held-out listens.
//!
//! The generator knows each user's genres and taste points; a model sees only their listens. So
//! ranking every user's candidates by the generator's own probability of a positive listen
//! ([`GenerativeTruth`]) is the Bayes-optimal ranker, and its Recall@10 bounds every model's and
//! every baseline's on the same split. Listens are drawn independently of time, so the bound holds
//! for the time hold-out as well as the random one. Scored on exactly the split `train` makes with
//! the same flags, beside the baselines `train` reports.
//!
//! No model knows the user either, only their training tracks; so beside the ceiling stands
//! [`HistoryPosterior`]: Bayes' rule over each user's genres and taste points given those tracks,
//! knowing every parameter of the generator. What it reaches is what a history allows (an estimate:
//! see its caveats), and so the yardstick for a model's figures; with taste left out, it says what
//! knowing every track's genre and popularity exactly is worth.

use std::collections::HashMap;

use anyhow::Context;

use crate::data::source::SyntheticSpec;
use crate::data::synthetic::posterior::HistoryPosterior;
use crate::data::synthetic::{self, GenerativeTruth};
use crate::training::eval::{EvalSet, RankingMetrics};
use crate::training::trainer::{PreparedData, TrainConfig, Trainer};

/// Taste points drawn per user and genre for the history posterior (see [`HistoryPosterior`]):
/// on the 20k-track tuning seed, 256 gave 0.1578 and 1,024 give 0.1585, beside 0.1587 from 4,096
/// points drawn from the prior alone: settled well inside the figure's standard error (0.0025).
const TASTE_SAMPLES: usize = 1024;

/// The generator's ranking and the baselines, warm and (with a cold hold-out) cold.
pub fn ceiling(spec: &SyntheticSpec, config: &TrainConfig) -> anyhow::Result<Vec<(&'static str, RankingMetrics)>> {
    let (dataset, truth) = synthetic::generate_with_truth(spec);
    let data = PreparedData::new(&dataset, config, &candle_core::Device::Cpu)?;
    let trainer = Trainer::new(config, &data)?;
    let b = trainer.baselines()?;
    let truth_user = truth_user_of_rows(&truth, &dataset.interactions.user_ids, &data.user_index)?;
    let n = data.num_tracks();
    // Positive as the evaluation counts it: the run's positive kinds.
    let positive = |kind: &str| config.positive_kinds.iter().any(|k| k == kind);
    let oracle = |eval: &EvalSet| {
        eval.evaluate_each_user(n, |row, _, scores| {
            truth.positive_listen_probabilities(truth_user[row], positive, scores)
        })
    };
    let genres_only = truth.history_posterior(None, positive);
    let with_taste = truth.history_posterior(Some(TASTE_SAMPLES), positive);
    let from_history = |posterior: &HistoryPosterior, eval: &EvalSet| {
        eval.evaluate_user_scores(n, |history, scores| posterior.probabilities(history, scores))
    };
    let mut rows = vec![
        ("generator's own probabilities (the ceiling)", oracle(trainer.eval_set())),
        ("posterior from the history: genres, popularity, taste", from_history(&with_taste, trainer.eval_set())),
        ("posterior from the history: genres, popularity", from_history(&genres_only, trainer.eval_set())),
        ("item-based collaborative filtering", b.item_cf),
        ("popularity", b.popularity),
        ("raw standardised features", b.raw_features),
        ("shared artist", b.shared_artist),
        ("shared album", b.shared_album),
        ("random", b.random),
    ];
    if let (Some(cold), Some(c)) = (trainer.cold_eval_set(), b.cold) {
        rows.extend([
            ("cold: generator's own probabilities (the ceiling)", oracle(cold)),
            ("cold: posterior from the history: genres, popularity, taste", from_history(&with_taste, cold)),
            ("cold: raw standardised features", c.raw_features),
            ("cold: shared artist", c.shared_artist),
            ("cold: shared album", c.shared_album),
            ("cold: random", c.random),
        ]);
    }
    Ok(rows)
}

/// For each training row, the generation index of its user (the dataset's users are sorted by id).
fn truth_user_of_rows(truth: &GenerativeTruth, user_ids: &[String], user_index: &[u32]) -> anyhow::Result<Vec<usize>> {
    let generated: HashMap<&str, usize> = truth.user_ids().iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    user_index
        .iter()
        .map(|&u| {
            let id = &user_ids[u as usize];
            generated.get(id.as_str()).copied().with_context(|| format!("user {id} was not generated"))
        })
        .collect()
}
