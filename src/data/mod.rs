//! Training data in compact form: a catalogue of tracks with features, and a listening history of
//! interactions whose string ids are interned into dense integer indices.
//!
//! Memory stays O(tracks + interactions): one `String` per track and per user (their platform ids,
//! needed for the outputs), and per interaction a user index, a track index, a kind code and a
//! timestamp (17 bytes). Nothing here holds a per-row copy of a database row.

pub mod synthetic;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::features::FeatureRow;

/// The platform's tracks, in a fixed order (row `i` of every output corresponds to `track_ids[i]`).
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    /// The platform's `"Track".id` of each row.
    pub track_ids: Vec<String>,
    /// Raw features in [`crate::features::FEATURE_NAMES`] order.
    pub features: Vec<FeatureRow>,
}

impl Catalogue {
    pub fn len(&self) -> usize {
        self.track_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.track_ids.is_empty()
    }
}

/// Interaction `type` strings, interned to small codes so that each interaction stores one byte.
/// The platform's `type` column is free text, so the table grows with whatever appears in the data.
#[derive(Debug, Clone, Default)]
pub struct KindTable {
    names: Vec<String>,
    codes: HashMap<String, u8>,
}

impl KindTable {
    /// Code for `name`, adding it if new. More than 256 distinct kinds is a data error the caller
    /// reports (the platform knows seven).
    pub fn intern(&mut self, name: &str) -> Option<u8> {
        if let Some(&code) = self.codes.get(name) {
            return Some(code);
        }
        let code = u8::try_from(self.names.len()).ok()?;
        self.names.push(name.to_owned());
        self.codes.insert(name.to_owned(), code);
        Some(code)
    }

    pub fn name(&self, code: u8) -> &str {
        &self.names[code as usize]
    }

    pub fn code(&self, name: &str) -> Option<u8> {
        self.codes.get(name).copied()
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// The listening history, one entry per interaction row, as parallel arrays.
#[derive(Debug, Clone, Default)]
pub struct Interactions {
    /// The platform's `"User".id` for each user index.
    pub user_ids: Vec<String>,
    pub user: Vec<u32>,
    /// Index into [`Catalogue::track_ids`].
    pub track: Vec<u32>,
    pub kind: Vec<u8>,
    /// Milliseconds since the Unix epoch (the platform stores `TIMESTAMP(3)`, UTC by convention).
    pub timestamp_ms: Vec<i64>,
    pub kinds: KindTable,
}

impl Interactions {
    pub fn len(&self) -> usize {
        self.user.len()
    }

    pub fn is_empty(&self) -> bool {
        self.user.is_empty()
    }

    pub fn push(&mut self, user: u32, track: u32, kind: u8, timestamp_ms: i64) {
        self.user.push(user);
        self.track.push(track);
        self.kind.push(kind);
        self.timestamp_ms.push(timestamp_ms);
    }

    /// The newest interaction timestamp: the data watermark a model trained on this history covers.
    pub fn newest_timestamp_ms(&self) -> Option<i64> {
        self.timestamp_ms.iter().copied().max()
    }
}

/// Where a dataset came from; recorded in logs and in the model metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// Generated in-process (the embedded default when no database is configured).
    Synthetic(synthetic::SyntheticSpec),
}

impl DataSource {
    pub fn is_synthetic(&self) -> bool {
        matches!(self, DataSource::Synthetic(_))
    }
}

/// Everything a training run reads.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub catalogue: Catalogue,
    pub interactions: Interactions,
    pub source: DataSource,
}
