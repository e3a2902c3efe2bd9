//! The artists and album of each track (the platform's `"Track".artists TEXT[]` and `album TEXT`),
//! interned like ids: one allocation per distinct name, and per track a few `u32`s.
//!
//! A NULL or empty artist array and a NULL or empty album are fine: the track simply has none. The
//! names are kept as the platform spells them (trimmed); a repeated artist of one track counts once.

use std::collections::HashMap;
use std::sync::Arc;

/// Distinct names, each with a dense id in order of first appearance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Names {
    /// The table and its lookup index share each name's one allocation.
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u32>,
}

impl Names {
    /// The id of `name`, adding it if new.
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.index.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).expect("fewer than 2^32 distinct names");
        let name: Arc<str> = Arc::from(name);
        self.names.push(Arc::clone(&name));
        self.index.insert(name, id);
        id
    }

    pub fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }

    pub fn id(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Per track (in catalogue order): its artists and its album.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackTags {
    pub artists: Names,
    pub albums: Names,
    /// CSR: the artists of track `t` are `artist_ids[artist_offsets[t]..artist_offsets[t + 1]]`.
    artist_offsets: Vec<u32>,
    artist_ids: Vec<u32>,
    /// The album of each track; [`NO_ALBUM`] when it has none.
    album_ids: Vec<u32>,
}

/// The album id of a track without an album.
pub const NO_ALBUM: u32 = u32::MAX;

impl Default for TrackTags {
    fn default() -> Self {
        Self {
            artists: Names::default(),
            albums: Names::default(),
            artist_offsets: vec![0],
            artist_ids: Vec::new(),
            album_ids: Vec::new(),
        }
    }
}

impl TrackTags {
    /// Appends the next track's tags. Blank names are skipped; an artist named twice counts once.
    pub fn push<'a>(&mut self, artists: impl IntoIterator<Item = &'a str>, album: Option<&str>) {
        let start = self.artist_ids.len();
        for name in artists.into_iter().map(str::trim).filter(|n| !n.is_empty()) {
            let id = self.artists.intern(name);
            if !self.artist_ids[start..].contains(&id) {
                self.artist_ids.push(id);
            }
        }
        self.artist_offsets.push(u32::try_from(self.artist_ids.len()).expect("fewer than 2^32 artist credits"));
        let album = album.map(str::trim).filter(|a| !a.is_empty());
        self.album_ids.push(album.map_or(NO_ALBUM, |a| self.albums.intern(a)));
    }

    /// Number of tracks recorded.
    pub fn len(&self) -> usize {
        self.album_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.album_ids.is_empty()
    }

    /// The artist ids of track `t`, in the order first credited.
    pub fn artists_of(&self, t: usize) -> &[u32] {
        &self.artist_ids[self.artist_offsets[t] as usize..self.artist_offsets[t + 1] as usize]
    }

    /// The album id of track `t`, if it has one.
    pub fn album_of(&self, t: usize) -> Option<u32> {
        Some(self.album_ids[t]).filter(|&a| a != NO_ALBUM)
    }

    /// The album of track `t` as a label list: empty without an album, else its one id (what
    /// label-sharing rankings read, like [`Self::artists_of`]).
    pub fn albums_of(&self, t: usize) -> &[u32] {
        match self.album_ids[t] {
            NO_ALBUM => &[],
            _ => std::slice::from_ref(&self.album_ids[t]),
        }
    }

    /// Tracks on each album (an album's size).
    pub fn tracks_per_album(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.albums.len()];
        for &a in self.album_ids.iter().filter(|&&a| a != NO_ALBUM) {
            counts[a as usize] += 1;
        }
        counts
    }

    /// Tracks credited to each artist (an artist's catalogue size).
    pub fn tracks_per_artist(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.artists.len()];
        for &a in &self.artist_ids {
            counts[a as usize] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_interned_once_and_blank_or_missing_tags_are_none() {
        let mut tags = TrackTags::default();
        tags.push(["Daft Punk", " Pharrell Williams "], Some("Random Access Memories"));
        tags.push([], None);
        tags.push(["", "  "], Some("  "));
        tags.push(["Pharrell Williams", "Daft Punk", "Daft Punk"], Some("Random Access Memories"));
        assert_eq!(tags.len(), 4);
        assert_eq!(tags.artists.len(), 2);
        assert_eq!(tags.albums.len(), 1);
        assert_eq!(tags.artists_of(0), [0, 1]);
        assert_eq!(tags.artists.name(1), "Pharrell Williams");
        assert_eq!(tags.artists_of(1), [] as [u32; 0]);
        assert_eq!(tags.album_of(1), None);
        assert_eq!(tags.artists_of(2), [] as [u32; 0]);
        assert_eq!(tags.album_of(2), None);
        assert_eq!(tags.artists_of(3), [1, 0], "a repeated credit counts once, in credit order");
        assert_eq!(tags.album_of(3), tags.album_of(0));
        assert_eq!(tags.tracks_per_artist(), [2, 2]);
        assert_eq!(tags.tracks_per_album(), [2]);
        assert_eq!(tags.albums_of(0), [0]);
        assert_eq!(tags.albums_of(1), [] as [u32; 0]);
        assert_eq!(tags.artists.id("Daft Punk"), Some(0));
        assert_eq!(tags.artists.id("Justice"), None);
    }
}
