//! The platform's tables as Prisma creates them (PLATFORM.md): quoted PascalCase names, TEXT ids,
//! `TIMESTAMP(3)`, Prisma's constraint and index names. Used only by `seed` to create them where
//! they are absent (a demo or test database); the trainer never alters them.

/// `CREATE … IF NOT EXISTS` for every platform table the trainer reads, in dependency order.
pub const DDL: &str = r#"
CREATE TABLE IF NOT EXISTS "User" (
    "id" TEXT NOT NULL,
    "email" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "password" TEXT,
    "avatar" TEXT,
    "spotifyId" TEXT,
    "spotifyAccessToken" TEXT,
    "spotifyRefreshToken" TEXT,
    "spotifyTokenExpiry" TIMESTAMP(3),
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "User_pkey" PRIMARY KEY ("id")
);
CREATE UNIQUE INDEX IF NOT EXISTS "User_email_key" ON "User"("email");

CREATE TABLE IF NOT EXISTS "Track" (
    "id" TEXT NOT NULL,
    "spotifyId" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "artists" TEXT[],
    "album" TEXT NOT NULL,
    "popularity" INTEGER NOT NULL DEFAULT 0,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "Track_pkey" PRIMARY KEY ("id")
);
CREATE UNIQUE INDEX IF NOT EXISTS "Track_spotifyId_key" ON "Track"("spotifyId");

CREATE TABLE IF NOT EXISTS "TrackFeatures" (
    "id" TEXT NOT NULL,
    "trackId" TEXT NOT NULL,
    "danceability" DOUBLE PRECISION NOT NULL,
    "energy" DOUBLE PRECISION NOT NULL,
    "key" INTEGER NOT NULL,
    "loudness" DOUBLE PRECISION NOT NULL,
    "mode" INTEGER NOT NULL,
    "speechiness" DOUBLE PRECISION NOT NULL,
    "acousticness" DOUBLE PRECISION NOT NULL,
    "instrumentalness" DOUBLE PRECISION NOT NULL,
    "liveness" DOUBLE PRECISION NOT NULL,
    "valence" DOUBLE PRECISION NOT NULL,
    "tempo" DOUBLE PRECISION NOT NULL,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "TrackFeatures_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "TrackFeatures_trackId_fkey" FOREIGN KEY ("trackId") REFERENCES "Track"("id") ON DELETE RESTRICT ON UPDATE CASCADE
);
CREATE UNIQUE INDEX IF NOT EXISTS "TrackFeatures_trackId_key" ON "TrackFeatures"("trackId");

CREATE TABLE IF NOT EXISTS "TrackInteraction" (
    "id" TEXT NOT NULL,
    "userId" TEXT NOT NULL,
    "trackId" TEXT NOT NULL,
    "type" TEXT NOT NULL,
    "timestamp" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "TrackInteraction_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "TrackInteraction_userId_fkey" FOREIGN KEY ("userId") REFERENCES "User"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    CONSTRAINT "TrackInteraction_trackId_fkey" FOREIGN KEY ("trackId") REFERENCES "Track"("id") ON DELETE RESTRICT ON UPDATE CASCADE
);
CREATE UNIQUE INDEX IF NOT EXISTS "TrackInteraction_userId_trackId_type_timestamp_key"
    ON "TrackInteraction"("userId", "trackId", "type", "timestamp");

CREATE TABLE IF NOT EXISTS "Playlist" (
    "id" TEXT NOT NULL,
    "spotifyId" TEXT,
    "name" TEXT NOT NULL,
    "description" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    "creatorId" TEXT NOT NULL,
    "sessionId" TEXT,
    CONSTRAINT "Playlist_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "Playlist_creatorId_fkey" FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON DELETE RESTRICT ON UPDATE CASCADE
);
CREATE UNIQUE INDEX IF NOT EXISTS "Playlist_spotifyId_key" ON "Playlist"("spotifyId");

CREATE TABLE IF NOT EXISTS "_PlaylistToTrack" (
    "A" TEXT NOT NULL,
    "B" TEXT NOT NULL,
    CONSTRAINT "_PlaylistToTrack_A_fkey" FOREIGN KEY ("A") REFERENCES "Playlist"("id") ON DELETE CASCADE ON UPDATE CASCADE,
    CONSTRAINT "_PlaylistToTrack_B_fkey" FOREIGN KEY ("B") REFERENCES "Track"("id") ON DELETE CASCADE ON UPDATE CASCADE
);
CREATE UNIQUE INDEX IF NOT EXISTS "_PlaylistToTrack_AB_unique" ON "_PlaylistToTrack"("A", "B");
CREATE INDEX IF NOT EXISTS "_PlaylistToTrack_B_index" ON "_PlaylistToTrack"("B");
"#;

/// The tables the loader reads, for the "database lacks the platform's tables" check.
pub const REQUIRED_TABLES: [&str; 3] = ["Track", "TrackFeatures", "TrackInteraction"];
/// Read only when playlists are a co-occurrence source.
pub const PLAYLIST_TABLES: [&str; 2] = ["Playlist", "_PlaylistToTrack"];

/// Interaction types the platform emits (PLATFORM.md). Any other type is counted as unknown.
pub const KNOWN_INTERACTION_TYPES: [&str; 7] =
    ["play", "like", "skip", "listen", "addToPlaylist", "add_to_playlist", "dislike"];
