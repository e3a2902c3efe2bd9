//! The compressed user → tracks rows that every part of pair mining shares.

/// A compressed user → tracks index (CSR). Users are dense indices `0..num_users`; each user's
/// tracks are sorted and distinct.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserTracks {
    offsets: Vec<usize>,
    tracks: Vec<u32>,
}

impl UserTracks {
    pub(super) fn with_users(capacity: usize) -> Self {
        Self { offsets: vec![0], tracks: Vec::with_capacity(capacity) }
    }

    pub(super) fn push_user(&mut self, tracks: impl IntoIterator<Item = u32>) {
        self.tracks.extend(tracks);
        self.offsets.push(self.tracks.len());
    }

    /// Builds the index from explicit per-user track lists (each sorted and distinct).
    pub fn from_users<'a>(users: impl IntoIterator<Item = &'a [u32]>) -> Self {
        let mut t = Self::with_users(0);
        for tracks in users {
            debug_assert!(tracks.windows(2).all(|w| w[0] < w[1]), "tracks must be sorted and distinct");
            t.push_user(tracks.iter().copied());
        }
        t
    }

    pub fn num_users(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The tracks of user `u`, sorted.
    pub fn user(&self, u: usize) -> &[u32] {
        &self.tracks[self.offsets[u]..self.offsets[u + 1]]
    }

    /// Total number of (user, track) entries.
    pub fn len(&self) -> usize {
        self.tracks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracks.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u32]> {
        (0..self.num_users()).map(|u| self.user(u))
    }
}
