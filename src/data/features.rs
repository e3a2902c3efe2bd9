//! The 11 audio features of the platform's `"TrackFeatures"` table, their order, their physical
//! ranges, and the z-score standardisation the old trainer applied (and the exported models expect).

use serde::{Deserialize, Serialize};

/// Number of input features per track.
pub const NUM_FEATURES: usize = 11;

/// The platform's feature order (the committed `content-based-model-metadata.json` uses it). Every
/// feature matrix in this crate is row-major `[track][feature]` in this order.
pub const FEATURE_NAMES: [&str; NUM_FEATURES] = [
    "acousticness",
    "danceability",
    "energy",
    "instrumentalness",
    "key",
    "liveness",
    "loudness",
    "mode",
    "speechiness",
    "tempo",
    "valence",
];

/// Index of each feature in [`FEATURE_NAMES`], for code that builds or checks rows by name.
pub mod idx {
    pub const ACOUSTICNESS: usize = 0;
    pub const DANCEABILITY: usize = 1;
    pub const ENERGY: usize = 2;
    pub const INSTRUMENTALNESS: usize = 3;
    pub const KEY: usize = 4;
    pub const LIVENESS: usize = 5;
    pub const LOUDNESS: usize = 6;
    pub const MODE: usize = 7;
    pub const SPEECHINESS: usize = 8;
    pub const TEMPO: usize = 9;
    pub const VALENCE: usize = 10;
}

/// Physical range `[min, max]` of each feature (Spotify's audio-features definitions). `key` is an
/// integer pitch class 0–11 and `mode` is 0 (minor) or 1 (major). Tempo 50–220 BPM covers real music;
/// Spotify reports 0 for tracks it could not analyse, which the data loader treats as out of range.
pub const FEATURE_RANGES: [(f32, f32); NUM_FEATURES] = [
    (0.0, 1.0),    // acousticness
    (0.0, 1.0),    // danceability
    (0.0, 1.0),    // energy
    (0.0, 1.0),    // instrumentalness
    (0.0, 11.0),   // key
    (0.0, 1.0),    // liveness
    (-60.0, 0.0),  // loudness (dB)
    (0.0, 1.0),    // mode
    (0.0, 1.0),    // speechiness
    (50.0, 220.0), // tempo (BPM)
    (0.0, 1.0),    // valence
];

/// One track's raw (unstandardised) features, in [`FEATURE_NAMES`] order.
pub type FeatureRow = [f32; NUM_FEATURES];

/// Per-feature mean and population standard deviation over the whole catalogue.
///
/// Exactly the old trainer's scaler: z-score with `ddof = 0`, and a standard deviation of 0 (a
/// constant feature) replaced by 1 so that the feature becomes 0 instead of NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    pub means: [f32; NUM_FEATURES],
    pub stds: [f32; NUM_FEATURES],
}

impl Standardizer {
    /// Fits means and standard deviations on `rows`. Sums run in f64 so that a large catalogue
    /// (10^5–10^6 tracks with loudness around −10 and tempo around 120) does not lose precision.
    pub fn fit(rows: &[FeatureRow]) -> Self {
        let mut means = [0f32; NUM_FEATURES];
        let mut stds = [1f32; NUM_FEATURES];
        if rows.is_empty() {
            return Self { means, stds };
        }
        let n = rows.len() as f64;
        for f in 0..NUM_FEATURES {
            let mean = rows.iter().map(|r| r[f] as f64).sum::<f64>() / n;
            let var = rows.iter().map(|r| (r[f] as f64 - mean).powi(2)).sum::<f64>() / n;
            let std = var.sqrt();
            means[f] = mean as f32;
            // The old trainer tested `std == 0`; a tolerance also catches a constant column whose
            // variance came out as a rounding residue.
            stds[f] = if std <= 1e-12 { 1.0 } else { std as f32 };
        }
        Self { means, stds }
    }

    /// Standardises one row: `(x - mean) / std`.
    pub fn apply(&self, row: &FeatureRow) -> FeatureRow {
        let mut out = [0f32; NUM_FEATURES];
        for f in 0..NUM_FEATURES {
            out[f] = (row[f] - self.means[f]) / self.stds[f];
        }
        out
    }

    /// Standardises every row into one flat row-major buffer `[rows.len() * NUM_FEATURES]`, the
    /// layout the model's input tensor takes.
    pub fn apply_all(&self, rows: &[FeatureRow]) -> Vec<f32> {
        rows.iter().flat_map(|r| self.apply(r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: f32) -> FeatureRow {
        [v; NUM_FEATURES]
    }

    #[test]
    fn uses_population_std_and_zero_mean() {
        // Values 1, 2, 3, 4: mean 2.5, population variance 1.25 (sample variance would be 1.667).
        let rows: Vec<FeatureRow> = (1..=4).map(|v| row(v as f32)).collect();
        let s = Standardizer::fit(&rows);
        assert!((s.means[0] - 2.5).abs() < 1e-6);
        assert!((s.stds[0] - 1.25f32.sqrt()).abs() < 1e-6, "std {}", s.stds[0]);
        let z = s.apply_all(&rows);
        let mean: f32 = (0..4).map(|i| z[i * NUM_FEATURES]).sum::<f32>() / 4.0;
        let var: f32 = (0..4).map(|i| z[i * NUM_FEATURES].powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6);
        assert!((var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn constant_feature_gets_std_one_and_becomes_zero() {
        let mut rows: Vec<FeatureRow> = (0..5).map(|v| row(v as f32)).collect();
        for r in &mut rows {
            r[idx::MODE] = 1.0;
        }
        let s = Standardizer::fit(&rows);
        assert_eq!(s.stds[idx::MODE], 1.0);
        assert_eq!(s.means[idx::MODE], 1.0);
        assert!(s.apply_all(&rows).iter().all(|v| v.is_finite()));
        assert_eq!(s.apply(&rows[3])[idx::MODE], 0.0);
    }

    #[test]
    fn keeps_precision_for_large_offsets() {
        // Tempo-like values around 120 with a tiny spread; f32 accumulation would drift.
        let rows: Vec<FeatureRow> = (0..200_000).map(|i| row(120.0 + if i % 2 == 0 { 0.5 } else { -0.5 })).collect();
        let s = Standardizer::fit(&rows);
        assert!((s.means[0] - 120.0).abs() < 1e-4);
        assert!((s.stds[0] - 0.5).abs() < 1e-5);
    }

    #[test]
    fn feature_order_is_the_platforms() {
        assert_eq!(FEATURE_NAMES[idx::KEY], "key");
        assert_eq!(FEATURE_NAMES[idx::TEMPO], "tempo");
        assert_eq!(FEATURE_NAMES[idx::VALENCE], "valence");
        let mut sorted = FEATURE_NAMES;
        sorted.sort();
        assert_eq!(sorted, FEATURE_NAMES, "the platform's order is alphabetical");
    }
}
