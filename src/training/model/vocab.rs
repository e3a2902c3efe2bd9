//! Vocabularies of the collaborative and hybrid kinds: which artist, album and track each
//! embedding-table row stands for.
//!
//! An artist (album) gets a row of its own when at least `min_count` catalogue tracks credit it;
//! rarer ones share row 0, the out-of-vocabulary bucket, which learns what "a little-known artist"
//! looks like instead of one row per name that a single track could never train. A track with no
//! artists (a NULL or empty array) or no album simply has no such input: it adds nothing, rather
//! than the OOV row, because "unknown" and "rare" are different facts. Track identity has one row
//! per catalogue track (row = catalogue index), no bucket.
//!
//! Counting over the catalogue, not the training listens, is deliberate: a new track's artist is
//! known before anyone plays it, and giving the artist its row now lets the artist's other tracks
//! train it.

use serde::{Deserialize, Serialize};

use crate::data::tags::TrackTags;

/// Row 0 of the artist and album tables: every name below the minimum count.
pub const OOV_ROW: u32 = 0;

/// One table's names, `names[row - 1]` for rows ≥ 1 (row 0 is the OOV bucket).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Vocabulary {
    pub min_count: usize,
    /// Names with a row of their own, in row order from row 1.
    pub names: Vec<String>,
    /// Distinct names that fell into the OOV bucket.
    pub oov_names: usize,
}

impl Vocabulary {
    /// Rows of the table: the OOV bucket plus one per name.
    pub fn rows(&self) -> usize {
        self.names.len() + 1
    }
}

/// The vocabularies and, per track, the table rows it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackInputs {
    pub artists: Vocabulary,
    pub albums: Vocabulary,
    /// CSR: the artist rows of track `t` are `artist_rows[artist_offsets[t]..artist_offsets[t + 1]]`.
    artist_offsets: Vec<u32>,
    artist_rows: Vec<u32>,
    /// The album row of each track, `None` without an album.
    album_rows: Vec<Option<u32>>,
}

impl TrackInputs {
    /// Builds the vocabularies from the catalogue's tags and maps every track through them.
    pub fn build(tags: &TrackTags, min_count: usize) -> Self {
        let artist_counts = tags.tracks_per_artist();
        let (artists, artist_row) = vocabulary(&artist_counts, min_count, |id| tags.artists.name(id));
        let (albums, album_row) = vocabulary(&tags.tracks_per_album(), min_count, |id| tags.albums.name(id));
        let mut artist_offsets = Vec::with_capacity(tags.len() + 1);
        let mut artist_rows = Vec::new();
        artist_offsets.push(0);
        for t in 0..tags.len() {
            let rows = tags.artists_of(t).iter().map(|&a| artist_row[a as usize]);
            for row in rows {
                // Two rare artists of one track share the OOV row: it counts once, like any artist.
                if !artist_rows[*artist_offsets.last().unwrap() as usize..].contains(&row) {
                    artist_rows.push(row);
                }
            }
            artist_offsets.push(u32::try_from(artist_rows.len()).expect("fewer than 2^32 artist credits"));
        }
        let album_rows = (0..tags.len()).map(|t| tags.album_of(t).map(|a| album_row[a as usize])).collect();
        Self { artists, albums, artist_offsets, artist_rows, album_rows }
    }

    pub fn num_tracks(&self) -> usize {
        self.album_rows.len()
    }

    /// The artist-table rows of track `t`.
    pub fn artist_rows(&self, t: usize) -> &[u32] {
        &self.artist_rows[self.artist_offsets[t] as usize..self.artist_offsets[t + 1] as usize]
    }

    /// The album-table row of track `t`.
    pub fn album_row(&self, t: usize) -> Option<u32> {
        self.album_rows[t]
    }

    /// The most artists any track has (the padded width of the exported artist input).
    pub fn max_artists(&self) -> usize {
        self.artist_offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }
}

/// The vocabulary of names with `counts[id] ≥ min_count` (in id order, which is first appearance in
/// the catalogue: deterministic for a given catalogue), and each id's row.
fn vocabulary<'a>(counts: &[u32], min_count: usize, name: impl Fn(u32) -> &'a str) -> (Vocabulary, Vec<u32>) {
    let mut vocab = Vocabulary { min_count, ..Vocabulary::default() };
    let rows = counts
        .iter()
        .enumerate()
        .map(|(id, &count)| {
            if (count as usize) >= min_count.max(1) {
                vocab.names.push(name(id as u32).to_string());
                vocab.names.len() as u32
            } else {
                vocab.oov_names += 1;
                OOV_ROW
            }
        })
        .collect();
    (vocab, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> TrackTags {
        let mut tags = TrackTags::default();
        tags.push(["Daft Punk", "Pharrell Williams"], Some("RAM"));
        tags.push(["Daft Punk"], Some("RAM"));
        tags.push(["Justice", "Busy P"], Some("Cross"));
        tags.push([], None); // a NULL or empty artist array, no album
        tags.push(["Daft Punk", "Justice"], Some("Alive"));
        tags
    }

    #[test]
    fn names_below_the_minimum_count_share_the_oov_row_and_missing_tags_add_nothing() {
        let inputs = TrackInputs::build(&tags(), 2);
        assert_eq!(inputs.artists.names, ["Daft Punk", "Justice"]);
        assert_eq!(inputs.artists.oov_names, 2, "Pharrell Williams and Busy P are credited once");
        assert_eq!(inputs.artists.rows(), 3);
        assert_eq!(inputs.artist_rows(0), [1, OOV_ROW]);
        assert_eq!(inputs.artist_rows(2), [2, OOV_ROW]);
        assert_eq!(inputs.artist_rows(3), [] as [u32; 0], "no artists: no row, not the OOV row");
        assert_eq!(inputs.artist_rows(4), [1, 2]);
        assert_eq!(inputs.albums.names, ["RAM"]);
        assert_eq!(inputs.album_row(0), Some(1));
        assert_eq!(inputs.album_row(2), Some(OOV_ROW), "Cross has one track");
        assert_eq!(inputs.album_row(3), None);
        assert_eq!(inputs.max_artists(), 2);
    }

    #[test]
    fn two_rare_artists_of_one_track_count_the_oov_row_once() {
        let mut tags = TrackTags::default();
        tags.push(["A", "B"], None);
        let inputs = TrackInputs::build(&tags, 2);
        assert_eq!(inputs.artist_rows(0), [OOV_ROW]);
        assert!(inputs.artists.names.is_empty());
    }

    #[test]
    fn min_count_one_gives_every_name_a_row_and_zero_means_one() {
        for min_count in [0, 1] {
            let inputs = TrackInputs::build(&tags(), min_count);
            assert_eq!(inputs.artists.names.len(), 4);
            assert_eq!(inputs.artists.oov_names, 0);
            assert_eq!(inputs.album_row(2), Some(2));
        }
    }
}
