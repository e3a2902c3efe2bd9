//! Full retrain or warm start: the decision a run makes once, from the version `latest.json` names,
//! the run's settings and its data.
//!
//! In order, a run retrains fully when:
//! 1. warm start is off (`--warm-start off`, the default);
//! 2. there is no version yet;
//! 3. a request asked for it (`params.full: true`);
//! 4. the latest version cannot be a parent: another kind or embedding size;
//! 5. the schedule says so: the lineage already has `full_retrain_every − 1` warm versions;
//! 6. the data drifted: more than `drift_threshold` of the run's timestamped interactions are newer
//!    than the lineage's base (its last full version's watermark).
//!
//! The drift measure is the share of new interactions rather than a feature-distribution distance:
//! a warm start keeps the base's standardisation and keeps fine-tuning weights first fitted on the
//! base's data, so what decides whether they still fit is how much of the training data the base
//! never saw. New tracks' features are standardised with the lineage's statistics either way.

use serde::Deserialize;

use crate::data::Interactions;
use crate::publish::lineage::{Lineage, LineagePlan, TrainingMode};
use crate::training::model::ModelKind;

/// Whether runs may start from the latest version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmStart {
    /// Every run trains from scratch.
    #[default]
    Off,
    /// Warm-start from the latest version unless a full retrain is due.
    Auto,
}

/// Where a warm run's Adam starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmOptimizer {
    /// Moments zero, step 0, as in a full run.
    #[default]
    Fresh,
    /// The moments and step counts of the epoch whose weights the parent published (read from
    /// that run's checkpoint); fresh, with a warning, when that checkpoint is gone.
    Carried,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineageSettings {
    pub warm_start: WarmStart,
    /// A full retrain every this many versions (0: never on schedule).
    pub full_retrain_every: usize,
    /// A full retrain when more than this share of the interactions is newer than the base.
    pub drift_threshold: f64,
    /// A warm run's epoch: a uniform sample of at most this many pairs (0: every pair). It starts
    /// near where it will end, so it needs fresh samples of the data more than whole passes.
    pub warm_pairs_per_epoch: usize,
    pub warm_optimizer: WarmOptimizer,
}

impl Default for LineageSettings {
    fn default() -> Self {
        Self {
            warm_start: WarmStart::Off,
            full_retrain_every: 10,
            drift_threshold: 0.25,
            warm_pairs_per_epoch: 300_000,
            warm_optimizer: WarmOptimizer::Fresh,
        }
    }
}

/// `config` as a run with `plan` trains it: a warm run's epochs are samples of at most
/// `settings.warm_pairs_per_epoch` pairs (a smaller sample asked for by the run's own settings wins).
pub fn config_for_plan(
    mut config: crate::training::trainer::TrainConfig,
    plan: &LineagePlan,
    settings: &LineageSettings,
) -> crate::training::trainer::TrainConfig {
    let cap = settings.warm_pairs_per_epoch;
    if plan.mode == TrainingMode::Warm && cap > 0 {
        let own = config.sampling.max_pairs_per_epoch;
        config.sampling.max_pairs_per_epoch = if own == 0 { cap } else { own.min(cap) };
    }
    config
}

/// What the decision reads of the latest version's metadata.
#[derive(Debug, Clone, Deserialize)]
pub struct ParentSummary {
    pub model_version: String,
    pub model_type: String,
    pub embedding_size: usize,
    #[serde(default)]
    pub lineage: Option<Lineage>,
    #[serde(default)]
    pub epochs_completed: usize,
    pub data: ParentData,
    /// The parent's settings: a refresh embeds with exactly them.
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ParentData {
    pub watermark: crate::data::Watermark,
}

/// The run's plan (see the module documentation for the order of the rules).
pub fn decide(
    settings: &LineageSettings,
    parent: Option<&ParentSummary>,
    requested_full: bool,
    kind: ModelKind,
    embedding_size: usize,
    interactions: &Interactions,
) -> LineagePlan {
    let full = |reason: String, parent: Option<&ParentSummary>| LineagePlan {
        mode: TrainingMode::Full,
        reason,
        parent_version: parent.map(|p| p.model_version.clone()),
        base_version: None,
        base_watermark_ms: None,
        versions_since_full: 0,
        epochs_before: 0,
        new_interaction_share: None,
        carry_optimizer: false,
    };
    if settings.warm_start == WarmStart::Off {
        return full("warm start is off".into(), parent);
    }
    let Some(p) = parent else { return full("the first version of this model".into(), None) };
    if requested_full {
        return full("requested (params.full, train --full)".into(), parent);
    }
    if p.model_type != kind.as_str() || p.embedding_size != embedding_size {
        return full(
            format!(
                "the latest version {} is a {} model of embedding size {}; this run trains a {} model of {}",
                p.model_version,
                p.model_type,
                p.embedding_size,
                kind.as_str(),
                embedding_size
            ),
            parent,
        );
    }
    let Base {
        version: base_version,
        watermark_ms: base_watermark_ms,
        versions_since_full: versions_before,
        epochs_since_full: epochs_before,
    } = Base::of(p);
    let versions_since_full = versions_before + 1;
    if settings.full_retrain_every > 0 && versions_since_full >= settings.full_retrain_every {
        return full(
            format!(
                "schedule: {versions_before} warm versions since the last full retrain, and one in every {} versions is full",
                settings.full_retrain_every
            ),
            parent,
        );
    }
    let share = base_watermark_ms.map(|base| new_interaction_share(interactions, base));
    if let Some(share) = share.filter(|s| *s > settings.drift_threshold) {
        let mut plan = full(
            format!(
                "drift: {:.1} % of the interactions are newer than the lineage's base, above {:.1} %",
                share * 100.0,
                settings.drift_threshold * 100.0
            ),
            parent,
        );
        plan.new_interaction_share = Some(share);
        return plan;
    }
    LineagePlan {
        mode: TrainingMode::Warm,
        reason: format!(
            "warm start from {}: {} of {} versions before the next full retrain",
            p.model_version, versions_since_full, settings.full_retrain_every
        ),
        parent_version: Some(p.model_version.clone()),
        base_version,
        base_watermark_ms,
        versions_since_full,
        epochs_before,
        new_interaction_share: share,
        carry_optimizer: settings.warm_optimizer == WarmOptimizer::Carried,
    }
}

/// Where a parent's lineage started and how far it has come.
struct Base {
    version: Option<String>,
    watermark_ms: Option<i64>,
    versions_since_full: usize,
    epochs_since_full: usize,
}

impl Base {
    /// A warm or refreshed parent continues its lineage; a full parent (or one from before lineages
    /// were recorded, which was trained from scratch) is its own base.
    fn of(p: &ParentSummary) -> Self {
        match &p.lineage {
            Some(l) if l.plan.mode != TrainingMode::Full => Self {
                version: l.plan.base_version.clone(),
                watermark_ms: l.plan.base_watermark_ms,
                versions_since_full: l.plan.versions_since_full,
                epochs_since_full: l.epochs_since_full,
            },
            _ => Self {
                version: Some(p.model_version.clone()),
                watermark_ms: p.data.watermark.newest_interaction_ms,
                versions_since_full: 0,
                epochs_since_full: p.epochs_completed,
            },
        }
    }
}

/// The plan of a refresh of `parent`: no training, so the lineage's counts stay the parent's. Only
/// the content and hybrid kinds can embed a track without training it.
pub fn refresh_plan(parent: &ParentSummary) -> anyhow::Result<LineagePlan> {
    anyhow::ensure!(
        parent.model_type != ModelKind::Collaborative.as_str(),
        "version {} is a collaborative model, which cannot embed a track it has not trained on: retrain instead \
         of refreshing",
        parent.model_version
    );
    let base = Base::of(parent);
    Ok(LineagePlan {
        mode: TrainingMode::Refresh,
        reason: format!("refresh of {}: tracks added since it are embedded by its weights", parent.model_version),
        parent_version: Some(parent.model_version.clone()),
        base_version: base.version,
        base_watermark_ms: base.watermark_ms,
        versions_since_full: base.versions_since_full,
        epochs_before: base.epochs_since_full,
        new_interaction_share: None,
        carry_optimizer: false,
    })
}

/// Share of the timestamped interactions newer than `base_ms` (0 when none has a timestamp).
/// Playlist memberships carry no time and are not counted.
pub fn new_interaction_share(interactions: &Interactions, base_ms: i64) -> f64 {
    let playlist = interactions.kinds.code(crate::data::PLAYLIST_KIND);
    let (mut newer, mut timed) = (0usize, 0usize);
    for (&ts, &kind) in interactions.timestamp_ms.iter().zip(&interactions.kind) {
        if Some(kind) == playlist {
            continue;
        }
        timed += 1;
        newer += usize::from(ts > base_ms);
    }
    if timed == 0 { 0.0 } else { newer as f64 / timed as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(timestamps: &[i64]) -> Interactions {
        let mut i = Interactions::default();
        let play = i.kinds.intern("play").unwrap();
        i.user_ids.push("u".into());
        for &ts in timestamps {
            i.push(0, 0, play, ts);
        }
        i
    }

    fn parent(lineage: Option<Lineage>) -> ParentSummary {
        ParentSummary {
            model_version: "v3".into(),
            model_type: "hybrid".into(),
            embedding_size: 64,
            lineage,
            epochs_completed: 7,
            data: ParentData {
                watermark: crate::data::Watermark { newest_interaction_ms: Some(100), ..Default::default() },
            },
            hyperparameters: serde_json::Value::Null,
        }
    }

    fn warm_lineage(versions_since_full: usize) -> Lineage {
        Lineage {
            plan: LineagePlan {
                mode: TrainingMode::Warm,
                reason: String::new(),
                parent_version: Some("v2".into()),
                base_version: Some("v1".into()),
                base_watermark_ms: Some(50),
                versions_since_full,
                epochs_before: 20,
                new_interaction_share: None,
                carry_optimizer: false,
            },
            epochs_since_full: 25,
            carried_over: Vec::new(),
            new_tracks: None,
            optimizer_from: None,
        }
    }

    const AUTO: LineageSettings = LineageSettings {
        warm_start: WarmStart::Auto,
        full_retrain_every: 4,
        drift_threshold: 0.25,
        warm_pairs_per_epoch: 100,
        warm_optimizer: WarmOptimizer::Fresh,
    };

    #[test]
    fn only_warm_plans_carry_the_optimizer_and_only_when_asked() {
        let carried = LineageSettings { warm_optimizer: WarmOptimizer::Carried, ..AUTO };
        let plan = |settings: &LineageSettings, full: bool| {
            decide(settings, Some(&parent(None)), full, ModelKind::Hybrid, 64, &history(&[10]))
        };
        assert!(plan(&carried, false).carry_optimizer);
        assert!(!plan(&AUTO, false).carry_optimizer);
        assert!(!plan(&carried, true).carry_optimizer, "a full retrain starts Adam afresh");
        assert!(!refresh_plan(&parent(None)).unwrap().carry_optimizer);
    }

    #[test]
    fn only_warm_runs_sample_their_epochs_and_a_smaller_own_sample_wins() {
        let config = crate::training::checkpoint::tests::config();
        let warm = decide(&AUTO, Some(&parent(None)), false, ModelKind::Hybrid, 64, &history(&[10]));
        assert_eq!(warm.mode, TrainingMode::Warm);
        assert_eq!(config_for_plan(config.clone(), &warm, &AUTO).sampling.max_pairs_per_epoch, 100);
        let mut own = config.clone();
        own.sampling.max_pairs_per_epoch = 40;
        assert_eq!(config_for_plan(own, &warm, &AUTO).sampling.max_pairs_per_epoch, 40);
        let full = decide(&AUTO, None, false, ModelKind::Hybrid, 64, &history(&[10]));
        assert_eq!(config_for_plan(config, &full, &AUTO).sampling.max_pairs_per_epoch, 0);
    }

    #[test]
    fn off_first_requested_and_incompatible_parents_retrain_fully() {
        let h = history(&[10, 20]);
        let p = parent(None);
        let off = decide(&LineageSettings::default(), Some(&p), false, ModelKind::Hybrid, 64, &h);
        assert_eq!((off.mode, off.reason.as_str()), (TrainingMode::Full, "warm start is off"));
        assert_eq!(decide(&AUTO, None, false, ModelKind::Hybrid, 64, &h).mode, TrainingMode::Full);
        let asked = decide(&AUTO, Some(&p), true, ModelKind::Hybrid, 64, &h);
        assert_eq!((asked.mode, asked.reason.as_str()), (TrainingMode::Full, "requested (params.full, train --full)"));
        assert_eq!(decide(&AUTO, Some(&p), false, ModelKind::ContentBased, 64, &h).mode, TrainingMode::Full);
        assert_eq!(decide(&AUTO, Some(&p), false, ModelKind::Hybrid, 32, &h).mode, TrainingMode::Full);
    }

    #[test]
    fn a_full_parent_is_the_base_of_its_first_warm_child() {
        let plan = decide(&AUTO, Some(&parent(None)), false, ModelKind::Hybrid, 64, &history(&[10, 20, 100, 101]));
        assert_eq!(plan.mode, TrainingMode::Warm);
        assert_eq!(plan.base_version.as_deref(), Some("v3"));
        assert_eq!((plan.versions_since_full, plan.epochs_before), (1, 7));
        // One of four interactions is newer than the base's watermark (100): 0.25, not above it.
        assert_eq!(plan.new_interaction_share, Some(0.25));
    }

    #[test]
    fn the_schedule_fires_at_its_threshold_and_not_before() {
        let h = history(&[10, 20]);
        // Two warm versions so far: this would be the third, and one in four is full → still warm.
        let plan = decide(&AUTO, Some(&parent(Some(warm_lineage(2)))), false, ModelKind::Hybrid, 64, &h);
        assert_eq!((plan.mode, plan.versions_since_full), (TrainingMode::Warm, 3));
        assert_eq!((plan.base_version.as_deref(), plan.epochs_before), (Some("v1"), 25));
        // Three so far: the fourth version is the full one.
        let plan = decide(&AUTO, Some(&parent(Some(warm_lineage(3)))), false, ModelKind::Hybrid, 64, &h);
        assert_eq!(plan.mode, TrainingMode::Full);
        assert!(plan.reason.starts_with("schedule: 3 warm versions"), "{}", plan.reason);
    }

    #[test]
    fn drift_fires_above_its_threshold_measured_against_the_base_not_the_parent() {
        let p = parent(Some(warm_lineage(1)));
        // The base's watermark is 50: 1 of 4 newer (0.25) stays warm, 2 of 4 (0.5) retrains fully,
        // although all of them are older than the parent's own watermark (100).
        let warm = decide(&AUTO, Some(&p), false, ModelKind::Hybrid, 64, &history(&[10, 20, 30, 60]));
        assert_eq!((warm.mode, warm.new_interaction_share), (TrainingMode::Warm, Some(0.25)));
        let drifted = decide(&AUTO, Some(&p), false, ModelKind::Hybrid, 64, &history(&[10, 20, 60, 70]));
        assert_eq!((drifted.mode, drifted.new_interaction_share), (TrainingMode::Full, Some(0.5)));
        assert!(drifted.reason.starts_with("drift: 50.0 %"), "{}", drifted.reason);
    }
}
