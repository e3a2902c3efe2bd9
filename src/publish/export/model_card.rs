//! `MODEL_CARD.md` and `training_curves.svg` for a version: what the model is, what it was trained
//! on, how it compares with the baselines, how it was trained, and where it should not be used.

use std::fmt::Write;

use super::card_kinds;
use crate::publish::artifacts::ModelMetadata;

/// The curves' file name, beside the card.
pub const CURVES_SVG: &str = "training_curves.svg";

/// The card's Markdown.
pub fn markdown(m: &ModelMetadata) -> String {
    let h = &m.hyperparameters;
    let d = &m.data;
    let source = if d.synthetic {
        "**synthetic** (generated in-process; not platform data)".to_string()
    } else {
        "the platform's Postgres".to_string()
    };
    let mut s = String::new();
    let _ = writeln!(s, "# Model card: {} {}\n", m.model_name, m.model_version);
    let _ = writeln!(
        s,
        "{} Trained by audotics-trainer {} on {} (run `{}`, device {}, seed {}).\n",
        card_kinds::what_it_is(m),
        m.trainer_version,
        m.training_date,
        m.run_id,
        m.device,
        m.seed
    );
    let _ = writeln!(s, "## Data\n");
    let _ = writeln!(s, "- Source: {source}.");
    let _ = writeln!(s, "- {} tracks, {} users, {} interactions read.", d.num_tracks, d.num_users, d.num_interactions);
    let _ = writeln!(
        s,
        "- Pair mining kept {} users with two or more positive tracks ({} distinct user-tracks; {} repeated positives collapsed, \
         {} non-positive interactions ignored, {} users below two tracks).",
        d.mining.users,
        d.mining.user_tracks,
        d.mining.duplicate_positive_interactions,
        d.mining.non_positive_interactions,
        d.mining.users_below_two_tracks
    );
    let _ = writeln!(s, "- Training / held-out user-tracks: {} / {}.", d.training_user_tracks, d.heldout_user_tracks);
    let _ = writeln!(
        s,
        "- Data watermark: newest interaction {}, {} interactions.\n",
        d.watermark.newest_interaction_at.as_deref().unwrap_or("(none)"),
        d.watermark.interactions
    );
    if let Some(q) = d.source.quality() {
        let _ = writeln!(
            s,
            "Dirty data (dropped or clamped, see the README): `{}`\n",
            serde_json::to_string(q).unwrap_or_default()
        );
    }
    let _ = writeln!(s, "## Metrics\n");
    let ho = &d.holdout;
    let holdout = match (ho.kind, &ho.cutoff) {
        (crate::training::trainer::Holdout::Time, Some(cutoff)) => format!(
            "**time-ordered**: the newest {:.0} % of the positive listens (from {cutoff}) are held out; a held-out pair is a \
             track new to a user with at least two earlier tracks ({} pairs; {} re-listens of known tracks and {} tracks \
             of users with too little history dropped)",
            ho.fraction * 100.0,
            ho.heldout_pairs,
            ho.dropped_known_tracks.unwrap_or(0),
            ho.dropped_cold_users.unwrap_or(0),
        ),
        (crate::training::trainer::Holdout::Time, None) => "**time-ordered**, but nothing was held out".to_string(),
        (crate::training::trainer::Holdout::Random, _) => format!(
            "**random**: a seeded {:.0} % of each user's tracks are held out ({} pairs; for data without meaningful timestamps)",
            ho.fraction * 100.0,
            ho.heldout_pairs
        ),
    };
    let _ = writeln!(s, "Hold-out: {holdout}. The model never trained on them.\n");
    let _ = writeln!(
        s,
        "For each held-out (user, track) the query is the mean embedding of the user's training tracks; all tracks are \
         ranked by cosine, the user's other tracks excluded. Every row is scored on the same held-out pairs. ± is the \
         standard error of Recall@10, sqrt(p(1−p)/n) over the n held-out pairs as Bernoulli trials.\n"
    );
    let _ = writeln!(s, "| ranking | Recall@10 | ± | NDCG@10 |\n|---|---|---|---|");
    let f = &m.final_metrics;
    let _ = writeln!(
        s,
        "| **this model** (epoch {} of {}) | **{:.4}** | {:.4} | **{:.4}** |",
        m.best_epoch, m.epochs_completed, f.recall_at_10, f.recall_at_10_se, f.ndcg_at_10
    );
    let b = &m.baselines;
    for (name, r) in [
        ("item-based collaborative filtering (not gated)", &b.item_cf),
        ("shared artist (not gated)", &b.shared_artist),
        ("shared album (not gated)", &b.shared_album),
        ("popularity", &b.popularity),
        ("raw standardised features", &b.raw_features),
        ("random", &b.random),
    ] {
        let _ = writeln!(s, "| {name} | {:.4} | {:.4} | {:.4} |", r.recall_at_10, r.recall_at_10_se, r.ndcg_at_10);
    }
    if let Some(current) = m.quality_gate.as_ref().and_then(|g| g.current.as_ref()) {
        let c = &current.metrics;
        let _ = writeln!(
            s,
            "| the previous version {} on these pairs | {:.4} | {:.4} | {:.4} |",
            current.version, c.recall_at_10, c.recall_at_10_se, c.ndcg_at_10
        );
    }
    let _ = writeln!(s);
    card_kinds::cold_metrics(&mut s, m);
    if let Some(gate) = &m.quality_gate {
        let _ = writeln!(s, "Quality gate ({}):\n", if gate.passed { "passed" } else { "failed" });
        for c in &gate.checks {
            let enforced = if c.enforced { "" } else { " (recorded, not enforced: AUDOTICS_QUALITY_FLOORS=false)" };
            let _ = writeln!(s, "- {} {}{enforced}.", if c.passed { "✓" } else { "✗" }, c.detail);
        }
        let _ = writeln!(s);
    }
    similar_tracks(&mut s, m);
    let _ = writeln!(s, "![Training curves: loss and Recall@10 per epoch]({CURVES_SVG})\n");
    let _ = writeln!(s, "## Training\n");
    lineage(&mut s, m);
    let _ = writeln!(s, "{}", card_kinds::architecture(m));
    let _ = writeln!(
        s,
        "- Objective: {} (temperature {}, logQ correction {}, centering weight {}); Adam, learning rate {}; {} epochs of \
         batch {} ({}; the published weights are epoch {}'s, the best Recall@10); {} pairs per track per epoch, at most {} \
         per user.",
        h.loss.kind,
        h.loss.temperature,
        h.loss.logq_correction,
        h.loss.centering_weight,
        h.learning_rate,
        m.epochs_completed,
        h.batch_size,
        match m.stop_reason {
            crate::training::trainer::StopReason::EarlyStopping =>
                format!("stopped early: {} epochs without a gain above {}", h.patience, h.min_delta),
            crate::training::trainer::StopReason::MaxEpochs => "every epoch asked for".to_string(),
            crate::training::trainer::StopReason::NotTrained => "none: a refresh of the parent's weights".to_string(),
        },
        m.best_epoch,
        h.sampling.pairs_per_track,
        h.sampling.max_pairs_per_user
    );
    let _ = writeln!(s, "- Positive interaction types: {}.\n", h.positive_kinds.join(", "));
    let _ = writeln!(s, "## Intended use\n");
    let _ = writeln!(s, "{}", card_kinds::intended_use(m));
    let _ = writeln!(s, "## Limits\n");
    let _ = writeln!(
        s,
        "{}\n\
         - Metrics are offline, on held-out interactions of the same period; they say nothing of how users react.\n\
         - Popularity enters through logQ correction and the data; rarely played tracks are ranked with less evidence.\n\
         - A model trained on synthetic data is a demonstration, not a recommender.",
        card_kinds::sees(m)
    );
    s
}

/// Two small line charts side by side: losses per epoch, and Recall@10 per epoch against the
/// baselines.
pub fn curves_svg(m: &ModelMetadata) -> String {
    let h = &m.training_history;
    let mut s = String::from(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="840" height="300" viewBox="0 0 840 300" font-family="sans-serif" font-size="11">"#,
    );
    s.push_str(r##"<rect width="840" height="300" fill="#fff"/>"##);
    chart(
        &mut s,
        10.0,
        "loss per epoch",
        &[("train loss", "#1f77b4", &h.loss), ("validation loss", "#ff7f0e", &h.val_loss)],
        &[],
    );
    let baselines = [
        ("raw features", "#7f7f7f", m.baselines.raw_features.recall_at_10),
        ("popularity", "#bcbd22", m.baselines.popularity.recall_at_10),
        ("item-CF", "#9467bd", m.baselines.item_cf.recall_at_10),
    ];
    chart(&mut s, 430.0, "Recall@10 per epoch", &[("model", "#2ca02c", &h.recall_at_10)], &baselines);
    s.push_str("</svg>\n");
    s
}

type Series<'a> = (&'a str, &'a str, &'a Vec<f64>);

fn chart(s: &mut String, x0: f64, title: &str, series: &[Series], lines: &[(&str, &str, f64)]) {
    let (w, h, left, top) = (400.0, 230.0, 45.0, 30.0);
    let values: Vec<f64> = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .chain(lines.iter().map(|l| l.2))
        .filter(|v| v.is_finite())
        .collect();
    let (mut lo, mut hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let epochs = series.iter().map(|(_, _, v)| v.len()).max().unwrap_or(1).max(2);
    let px = |i: usize| x0 + left + (i as f64) / ((epochs - 1) as f64) * (w - left - 10.0);
    let py = |v: f64| top + (1.0 - (v - lo) / (hi - lo)) * (h - top);
    let _ = write!(s, r#"<text x="{}" y="18" font-size="13">{title}</text>"#, x0 + left);
    let _ = write!(
        s,
        r##"<rect x="{}" y="{top}" width="{}" height="{}" fill="none" stroke="#ccc"/>"##,
        x0 + left,
        w - left - 10.0,
        h - top
    );
    for (v, y) in [(hi, py(hi)), (lo, py(lo))] {
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, x0 + left - 4.0, y + 4.0, fmt_tick(v));
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}">epoch 1</text><text x="{}" y="{}" text-anchor="end">epoch {epochs}</text>"#,
        px(0),
        h + 15.0,
        px(epochs - 1),
        h + 15.0
    );
    let legend_y = h + 32.0;
    let mut legend_x = x0 + left;
    for (name, colour, v) in series {
        let points: Vec<String> = v
            .iter()
            .enumerate()
            .filter(|(_, y)| y.is_finite())
            .map(|(i, &y)| format!("{:.1},{:.1}", px(i), py(y)))
            .collect();
        let _ =
            write!(s, r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#, points.join(" "));
        legend(s, &mut legend_x, legend_y, name, colour, false);
    }
    for (name, colour, v) in lines {
        let _ = write!(
            s,
            r#"<line x1="{}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="{colour}" stroke-dasharray="5,4"/>"#,
            px(0),
            px(epochs - 1),
            y = py(*v)
        );
        legend(s, &mut legend_x, legend_y, name, colour, true);
    }
}

fn legend(s: &mut String, x: &mut f64, y: f64, name: &str, colour: &str, dashed: bool) {
    let dash = if dashed { r#" stroke-dasharray="5,4""# } else { "" };
    let _ = write!(
        s,
        r#"<line x1="{}" x2="{}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{name}</text>"#,
        *x,
        *x + 18.0,
        *x + 22.0,
        y + 4.0
    );
    *x += 30.0 + 6.5 * name.len() as f64;
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 10.0 { format!("{v:.1}") } else { format!("{v:.3}") }
}

/// Full retrain or warm start, and why.
fn lineage(s: &mut String, m: &ModelMetadata) {
    let Some(l) = &m.lineage else { return };
    let p = &l.plan;
    let _ = match p.mode {
        crate::publish::lineage::TrainingMode::Full => writeln!(s, "- **Full retrain** ({}).", p.reason),
        crate::publish::lineage::TrainingMode::Refresh => {
            writeln!(s, "- **Refresh** ({}): no training; the parent's weights and standardisation.", p.reason)
        }
        crate::publish::lineage::TrainingMode::Warm => writeln!(
            s,
            "- **Warm start** from {} ({}); {} version(s) and {} epochs since the last full retrain {}; \
             standardisation from the lineage.",
            p.parent_version.as_deref().unwrap_or("?"),
            p.reason,
            p.versions_since_full,
            l.epochs_since_full,
            p.base_version.as_deref().unwrap_or("?"),
        ),
    };
    if p.mode == crate::publish::lineage::TrainingMode::Refresh {
        let _ = writeln!(
            s,
            "  - {} tracks embedded for the first time; every other row is the parent's.",
            l.new_tracks.unwrap_or(0)
        );
    }
    for c in &l.carried_over {
        let _ = writeln!(s, "  - `{}`: {} rows from the parent, {} new.", c.table, c.copied_rows, c.new_rows);
    }
    if p.mode == crate::publish::lineage::TrainingMode::Warm {
        let _ = match &l.optimizer_from {
            Some(from) => writeln!(s, "  - Adam's moments and step counts carried over from {from}."),
            None => writeln!(s, "  - Adam started fresh (moments zero)."),
        };
    }
}

/// The neighbour table: what it holds and how far it moved since the parent version.
fn similar_tracks(s: &mut String, m: &ModelMetadata) {
    let Some(n) = &m.neighbours else { return };
    let _ = writeln!(s, "## Similar tracks\n");
    let how = match n.hnsw {
        None => "exact (every pair scored)".to_string(),
        Some(h) => format!(
            "approximate: the candidates an HNSW graph (M {}, ef_construction {}, ef {}) finds, most but not all \
             of the exact neighbours (recall in BENCHMARKS.md), ranked by their exact cosine",
            h.connections, h.ef_construction, h.ef_search
        ),
    };
    let _ = writeln!(
        s,
        "`{}` lists each track's {} most similar tracks by cosine, {how}, best first, ties by lower row; {} tracks \
         have neighbours. Built in {:.1} s.",
        crate::publish::layout::NEIGHBOURS,
        n.k,
        n.tracks_listed,
        n.seconds
    );
    match (&n.parent_version, n.jaccard_at_10_vs_parent) {
        (Some(parent), Some(j)) => {
            let _ = writeln!(
                s,
                "Against the previous version {parent}: mean Jaccard@10 {j:.3} over the {} tracks both list (1 means \
                 every track's first 10 neighbours are unchanged).",
                n.tracks_compared.unwrap_or(0)
            );
        }
        (Some(parent), None) => {
            let _ = writeln!(s, "The previous version {parent} lists no track this one does.");
        }
        (None, _) => {
            let _ = writeln!(s, "No previous version with a neighbour table to compare with.");
        }
    }
    let _ = writeln!(s);
}
