//! Reference baselines on the Spotify songs dataset (`../shared/data/spotify_songs.zip`), seeded with
//! `seed --spotify-csv`: each playlist is a user, so a held-out (user, track) is a held-out playlist
//! member. Playlists carry one subgenre each, so part of any score is genre clustering; two label
//! baselines measure how much — a track scores by how many of the playlist's training tracks share
//! its subgenre (same-subgenre) or its artist (same-artist). Labels come from the CSV, keyed by the
//! Track ids `seed` derived, and include the held-out membership itself: they are an upper
//! reference for "knows the genre", not a fair competitor.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use crate::training::eval::{EvalSet, RankingMetrics};

/// Per-track label ids (index = catalogue row).
pub struct TrackLabels {
    pub subgenres: Vec<Vec<u32>>,
    pub artists: Vec<Vec<u32>>,
}

impl TrackLabels {
    /// Reads subgenre and artist labels for the catalogue's `track_ids` (as seeded from the CSV).
    pub fn from_csv(path: &Path, track_ids: &[String]) -> anyhow::Result<Self> {
        let row_of: HashMap<&str, usize> = track_ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
        let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
        let headers = reader.headers()?.clone();
        let col = |name: &str| headers.iter().position(|h| h == name).with_context(|| format!("no column {name}"));
        let (c_track, c_sub, c_artist) = (col("track_id")?, col("playlist_subgenre")?, col("track_artist")?);
        let mut subgenre_ids: HashMap<String, u32> = HashMap::new();
        let mut artist_ids: HashMap<String, u32> = HashMap::new();
        let mut labels =
            Self { subgenres: vec![Vec::new(); track_ids.len()], artists: vec![Vec::new(); track_ids.len()] };
        for record in reader.records() {
            let r = record?;
            let Some(&row) = row_of.get(crate::db::seed::spotify_track_id(&r[c_track]).as_str()) else { continue };
            let n = subgenre_ids.len() as u32;
            let s = *subgenre_ids.entry(r[c_sub].to_string()).or_insert(n);
            let n = artist_ids.len() as u32;
            let a = *artist_ids.entry(r[c_artist].to_string()).or_insert(n);
            for (list, label) in [(&mut labels.subgenres[row], s), (&mut labels.artists[row], a)] {
                if !list.contains(&label) {
                    list.push(label);
                }
            }
        }
        Ok(labels)
    }
}

/// Same-label baseline: a track scores the number of the user's training tracks sharing a label.
pub fn label_baseline(eval: &EvalSet, labels: &[Vec<u32>]) -> RankingMetrics {
    let num_labels = labels.iter().flatten().max().map_or(0, |m| *m as usize + 1);
    eval.evaluate_shared_labels(labels.len(), num_labels, |t| &labels[t])
}

/// The reference baselines, scored on exactly the held-out split `train` makes with `config`.
pub fn baselines(
    dataset: &crate::data::Dataset,
    config: &crate::training::trainer::TrainConfig,
    csv: &Path,
) -> anyhow::Result<Vec<(&'static str, RankingMetrics)>> {
    use crate::training::trainer::{PreparedData, Trainer};
    let labels = TrackLabels::from_csv(csv, &dataset.catalogue.track_ids)?;
    let data = PreparedData::new(dataset, config, &candle_core::Device::Cpu)?;
    let trainer = Trainer::new(config, &data)?;
    let b = trainer.baselines()?;
    Ok(vec![
        ("random", b.random),
        ("raw standardised features", b.raw_features),
        ("popularity", b.popularity),
        ("item-based collaborative filtering", b.item_cf),
        ("same subgenre", label_baseline(trainer.eval_set(), &labels.subgenres)),
        ("same artist", label_baseline(trainer.eval_set(), &labels.artists)),
    ])
}
