//! The parts of `MODEL_CARD.md` that differ by model kind: what the model is, its architecture,
//! its cold-track figures, how to embed a new track, and its limits.

use std::fmt::Write;

use crate::publish::artifacts::ModelMetadata;
use crate::training::model::ModelKind;

fn kind(m: &ModelMetadata) -> ModelKind {
    m.hyperparameters.model_kind
}

/// The card's opening sentence: what turns a track into an embedding.
pub(super) fn what_it_is(m: &ModelMetadata) -> String {
    let e = m.embedding_size;
    match kind(m) {
        ModelKind::ContentBased => format!(
            "Content-based track encoder of the Audotics platform: 11 audio features (standardised) → a {e}-dimensional \
             L2-normalised embedding; tracks listened to together are close by cosine."
        ),
        ModelKind::Collaborative => format!(
            "Collaborative model of the Audotics platform: a learned {e}-dimensional row per track with training listens \
             (item2vec-style, from co-listened pairs), L2-normalised; tracks listened to together are close by cosine. \
             {} of {} tracks have a learned row; the others' embeddings are zeros.",
            m.learned_tracks.unwrap_or(0),
            m.num_tracks
        ),
        ModelKind::Hybrid => format!(
            "Hybrid model of the Audotics platform: the content encoder's output over 11 standardised audio features, plus \
             the mean of the track's artist embeddings, its album embedding and its own identity embedding, L2-normalised \
             to {e} dimensions; tracks listened to together are close by cosine. A track nobody has played yet is placed \
             by its audio, artists and album alone."
        ),
    }
}

/// The architecture bullet.
pub(super) fn architecture(m: &ModelMetadata) -> String {
    let h = &m.hyperparameters;
    let (e, p) = (m.embedding_size, h.encoder.dropout);
    let content = format!(
        "Input(11) → BatchNorm → Dense({}, relu) → Dropout({p}) → Dense({e}, relu) → Dropout({p}) → Dense({e}, tanh)",
        2 * e
    );
    let t = h.table_config();
    match kind(m) {
        ModelKind::ContentBased => format!("- Architecture: {content} → L2 normalisation; siamese, shared weights."),
        ModelKind::Collaborative => format!(
            "- Architecture: Embedding(tracks, {e}) → L2 normalisation; siamese; table rows trained by lazy Adam at \
             learning rate {}.",
            t.learning_rate
        ),
        ModelKind::Hybrid => format!(
            "- Architecture: [{content}] + mean(artist Embedding) + album Embedding + track Embedding → L2 normalisation; \
             siamese. In training the identity term is dropped with probability {} and the album term with {} (whole \
             terms, no rescaling), so the model learns to place tracks without them. Artists and albums need {} catalogue \
             tracks for a row of their own; rarer ones share the out-of-vocabulary row 0. Table rows: lazy Adam at \
             learning rate {}.",
            t.identity_dropout, t.album_dropout, t.min_count, t.learning_rate
        ),
    }
}

/// The cold-track table, when the run held tracks out.
pub(super) fn cold_metrics(s: &mut String, m: &ModelMetadata) {
    let (Some(cold), Some(summary)) = (&m.baselines.cold, &m.data.cold_holdout) else { return };
    let _ = writeln!(
        s,
        "Cold tracks: a seeded {:.0} % of the catalogue ({} tracks) was held out with all its listens, so training never \
         saw anyone play them; for each training user who played one ({} pairs), only the cold tracks are ranked.\n",
        summary.fraction * 100.0,
        summary.tracks,
        summary.heldout_pairs
    );
    let _ = writeln!(s, "| cold ranking | Recall@10 | ± | NDCG@10 |\n|---|---|---|---|");
    match &m.final_cold_metrics {
        Some(f) => {
            let _ = writeln!(
                s,
                "| **this model** | **{:.4}** | {:.4} | **{:.4}** |",
                f.recall_at_10, f.recall_at_10_se, f.ndcg_at_10
            );
        }
        None => {
            let _ = writeln!(s, "| this model | n/a: no row for a track without listens | | |");
        }
    }
    for (name, r) in [
        ("shared artist", &cold.shared_artist),
        ("shared album", &cold.shared_album),
        ("raw standardised features", &cold.raw_features),
        ("random", &cold.random),
    ] {
        let _ = writeln!(s, "| {name} | {:.4} | {:.4} | {:.4} |", r.recall_at_10, r.recall_at_10_se, r.ndcg_at_10);
    }
    let _ = writeln!(s);
}

/// The intended-use paragraph, with how to embed a new track.
pub(super) fn intended_use(m: &ModelMetadata) -> &'static str {
    match kind(m) {
        ModelKind::ContentBased => {
            "Candidate generation and \"similar tracks\" for the Audotics platform: nearest neighbours by cosine in \
             `embeddings.safetensors`, and embeddings for new tracks from their audio features (the `.keras` and TF.js \
             models take features standardised with the metadata's `feature_means` / `feature_stds`).\n"
        }
        ModelKind::Collaborative => {
            "Candidate generation and \"similar tracks\" among tracks people have played: nearest neighbours by cosine in \
             `embeddings.safetensors` (rows listed in `vocabularies.json` → `learned_track_rows`). The `.keras` and TF.js \
             models take one named input, `track_index` (catalogue row + 1). A new track cannot be embedded without \
             retraining (index 0 gives zeros): use the hybrid model for it.\n"
        }
        ModelKind::Hybrid => {
            "Candidate generation and \"similar tracks\" for every catalogue track, played or not: nearest neighbours by \
             cosine in `embeddings.safetensors`. **Embedding a new track** with the `.keras` model (or TF.js, then \
             L2-normalise), whose named inputs are: `features`, its 11 features standardised with the metadata's \
             `feature_means` / `feature_stds`; `artist_indices`, for each credited artist its vocabulary row + 1 \
             (`vocabularies.json` → `artists.names[i]` is row `i + 1`, so index `i + 2`; an artist not listed is the \
             out-of-vocabulary row 0, index 1), then 0s up to `max_artists`; `album_index`, likewise for its album \
             (0 without one); `track_index` 0 — a new track has no identity row. A known track passes its catalogue \
             row + 1 and gets exactly its row of `embeddings.safetensors`.\n"
        }
    }
}

/// The first limit, about what the kind can see.
pub(super) fn sees(m: &ModelMetadata) -> &'static str {
    match kind(m) {
        ModelKind::ContentBased => {
            "- It sees audio features only: no artist, genre label, lyrics or language. On real playlists (the Spotify \
             dataset) such a model ranks about as well as raw standardised features; co-listening driven by artist or \
             scene identity is out of its reach."
        }
        ModelKind::Collaborative => {
            "- It sees co-listening only: a track with few listens has a row trained on little evidence, and a track with \
             none has no row at all."
        }
        ModelKind::Hybrid => {
            "- It sees audio features, artist and album names and co-listening; a new track's place rests on its audio \
             and credits, and an artist or album with fewer catalogue tracks than the minimum shares the \
             out-of-vocabulary row with every other rare one."
        }
    }
}
