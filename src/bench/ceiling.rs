//! The ceiling of the synthetic history: how well anything can rank its held-out listens.
//!
//! The generator knows each user's genres and taste points; a model sees only their listens. So
//! ranking every user's candidates by the generator's own probability of a positive listen
//! ([`GenerativeTruth`]) is the Bayes-optimal ranker, and its Recall@10 bounds every model's and
//! every baseline's on the same split. Listens are drawn independently of time, so the bound holds
//! for the time hold-out as well as the random one. Scored on exactly the split `train` makes with
//! the same flags, beside the baselines `train` reports.

use std::collections::HashMap;

use anyhow::Context;

use crate::data::source::SyntheticSpec;
use crate::data::synthetic::{self, GenerativeTruth};
use crate::training::eval::{EvalSet, RankingMetrics};
use crate::training::trainer::{PreparedData, TrainConfig, Trainer};

/// The generator's ranking and the baselines, warm and (with a cold hold-out) cold.
pub fn ceiling(spec: &SyntheticSpec, config: &TrainConfig) -> anyhow::Result<Vec<(&'static str, RankingMetrics)>> {
    let (dataset, truth) = synthetic::generate_with_truth(spec);
    let data = PreparedData::new(&dataset, config, &candle_core::Device::Cpu)?;
    let trainer = Trainer::new(config, &data)?;
    let b = trainer.baselines()?;
    let truth_user = truth_user_of_rows(&truth, &dataset.interactions.user_ids, &data.user_index)?;
    let n = data.num_tracks();
    let oracle = |eval: &EvalSet| {
        // Positive as the evaluation counts it: the run's positive kinds.
        let positive = |kind: &str| config.positive_kinds.iter().any(|k| k == kind);
        eval.evaluate_each_user(n, |row, _, scores| {
            truth.positive_listen_probabilities(truth_user[row], positive, scores)
        })
    };
    let mut rows = vec![
        ("generator's own probabilities (the ceiling)", oracle(trainer.eval_set())),
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
