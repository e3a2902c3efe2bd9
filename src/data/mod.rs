//! Training data in compact form: a catalogue of tracks with features, and a listening history of
//! interactions whose string ids are interned into dense integer indices.
//!
//! Memory stays O(tracks + interactions): one `String` per track and per user (their platform ids,
//! needed for the outputs), and per interaction a user index, a track index, a kind code and a
//! timestamp (17 bytes). Nothing here holds a per-row copy of a database row.

pub mod features;
pub mod source;
pub mod synthetic;
pub mod tags;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::data::features::FeatureRow;

/// The platform's tracks, in a fixed order (row `i` of every output corresponds to `track_ids[i]`).
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    /// The platform's `"Track".id` of each row.
    pub track_ids: Vec<String>,
    /// Raw features in [`crate::data::features::FEATURE_NAMES`] order.
    pub features: Vec<FeatureRow>,
    /// Artists and album of each track, interned.
    pub tags: tags::TrackTags,
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

    /// Room for `additional` more interactions in every array.
    pub fn reserve(&mut self, additional: usize) {
        self.user.reserve_exact(additional);
        self.track.reserve_exact(additional);
        self.kind.reserve_exact(additional);
        self.timestamp_ms.reserve_exact(additional);
    }

    pub fn push(&mut self, user: u32, track: u32, kind: u8, timestamp_ms: i64) {
        self.user.push(user);
        self.track.push(track);
        self.kind.push(kind);
        self.timestamp_ms.push(timestamp_ms);
    }

    /// Renumbers users in the byte order of their ids, so that user indices (and everything derived
    /// from them: the held-out split, pair order) do not depend on the order rows arrived in. Both
    /// the in-memory and the database path call it, so the same rows give the same model.
    pub fn canonicalize_users(&mut self) {
        let mut order: Vec<u32> = (0..self.user_ids.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| self.user_ids[a as usize].cmp(&self.user_ids[b as usize]));
        let mut new_index = vec![0u32; order.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old as usize] = new as u32;
        }
        for u in &mut self.user {
            *u = new_index[*u as usize];
        }
        let mut ids = std::mem::take(&mut self.user_ids);
        self.user_ids = order.iter().map(|&old| std::mem::take(&mut ids[old as usize])).collect();
    }
}

/// The reserved interaction kind of playlist co-membership rows (never a platform `type`).
pub const PLAYLIST_KIND: &str = "_playlist";

/// The newest interaction a model has seen, and how many interactions it read. Playlist
/// memberships carry no time and do not count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Watermark {
    /// RFC 3339, UTC, millisecond precision; absent when there were no interactions.
    pub newest_interaction_at: Option<String>,
    /// The same instant in milliseconds since the Unix epoch.
    pub newest_interaction_ms: Option<i64>,
    pub interactions: usize,
    /// The newest `"Track"."createdAt"` read (ms since the Unix epoch): the catalogue's pin. Absent
    /// for synthetic data and for a database without tracks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_track_created_ms: Option<i64>,
}

impl Watermark {
    /// The watermark of every interaction in `interactions`.
    pub fn of(interactions: &Interactions) -> Self {
        let newest = interactions.timestamp_ms.iter().copied().max();
        Self {
            newest_interaction_at: newest.and_then(format_ms),
            newest_interaction_ms: newest,
            interactions: interactions.len(),
            newest_track_created_ms: None,
        }
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC.
pub fn format_ms(ms: i64) -> Option<String> {
    use chrono::TimeZone;
    chrono::Utc.timestamp_millis_opt(ms).single().map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Everything a training run reads.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub catalogue: Catalogue,
    pub interactions: Interactions,
    pub watermark: Watermark,
    pub source: source::DataSource,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_user_order_is_by_id_and_keeps_every_row() {
        let mut it = Interactions { user_ids: vec!["c".into(), "a".into(), "b".into()], ..Interactions::default() };
        let play = it.kinds.intern("play").unwrap();
        for (u, t) in [(0, 10), (1, 11), (2, 12), (0, 13)] {
            it.push(u, t, play, 0);
        }
        it.canonicalize_users();
        assert_eq!(it.user_ids, ["a", "b", "c"]);
        let rows: Vec<(&str, u32)> =
            it.user.iter().zip(&it.track).map(|(&u, &t)| (it.user_ids[u as usize].as_str(), t)).collect();
        assert_eq!(rows, [("c", 10), ("a", 11), ("b", 12), ("c", 13)]);
    }

    #[test]
    fn watermark_is_the_newest_interaction() {
        let mut it = Interactions::default();
        assert_eq!(Watermark::of(&it), Watermark::default());
        it.push(0, 0, 0, 1_767_225_600_123);
        it.push(0, 1, 0, 5);
        let w = Watermark::of(&it);
        assert_eq!(w.newest_interaction_at.as_deref(), Some("2026-01-01T00:00:00.123Z"));
        assert_eq!((w.newest_interaction_ms, w.interactions), (Some(1_767_225_600_123), 2));
    }
}
