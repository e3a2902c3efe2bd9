//! `audotics-trainer seed`: create the platform's tables where absent and load demo data — the
//! synthetic generator's catalogue and history, or the real Spotify dataset (`--spotify-csv`).
//!
//! Idempotent: every row's id is derived from its content (UUID v5), rows go through COPY into
//! temporary staging tables and then `INSERT … ON CONFLICT DO NOTHING`, so seeding twice adds nothing.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::{Connection, PgConnection, PgPool};
use tracing::info;
use uuid::Uuid;

use crate::data::Dataset;
use crate::data::features::{FEATURE_NAMES, FeatureRow, idx};
use crate::db::platform::DDL;

/// UUID v5 namespace of every id `seed` derives.
const NAMESPACE: Uuid = Uuid::from_u128(0x6a0d_0a8e_4f5e_4f8b_9c1d_a0d1_c5ee_d000);

/// COPY text lines of one table, produced lazily so that seeding 10 M interactions never holds
/// 10 M strings.
pub type Lines<'a> = Box<dyn Iterator<Item = String> + Send + 'a>;

/// Rows of the platform's tables, as COPY text lines per table.
pub struct SeedRows<'a> {
    users: Lines<'a>,
    tracks: Lines<'a>,
    features: Lines<'a>,
    interactions: Lines<'a>,
    playlists: Lines<'a>,
    playlist_tracks: Lines<'a>,
}

/// Rows inserted per table (0 everywhere when seeding again).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SeedReport {
    pub users: u64,
    pub tracks: u64,
    pub track_features: u64,
    pub interactions: u64,
    pub playlists: u64,
    pub playlist_tracks: u64,
}

/// Creates the platform's tables where absent (Prisma's DDL), then inserts `rows`.
///
/// Refuses a database whose platform tables already hold rows unless `force`: seeding adds demo
/// users, tracks and listens beside real ones, and training would then learn from both.
pub async fn seed(pool: &PgPool, rows: SeedRows<'_>, force: bool) -> anyhow::Result<SeedReport> {
    let mut conn = pool.acquire().await.context("cannot get a database connection")?;
    sqlx::raw_sql(DDL).execute(&mut *conn).await.context("creating the platform's tables")?;
    if !force {
        let held: Vec<(String, bool)> = sqlx::query_as(
            r#"SELECT 'User', EXISTS (SELECT 1 FROM "User") UNION ALL
               SELECT 'Track', EXISTS (SELECT 1 FROM "Track") UNION ALL
               SELECT 'TrackInteraction', EXISTS (SELECT 1 FROM "TrackInteraction") UNION ALL
               SELECT 'Playlist', EXISTS (SELECT 1 FROM "Playlist")"#,
        )
        .fetch_all(&mut *conn)
        .await
        .context("checking whether the platform's tables are empty")?;
        let non_empty: Vec<String> =
            held.into_iter().filter(|(_, any)| *any).map(|(t, _)| format!("\"{t}\"")).collect();
        anyhow::ensure!(
            non_empty.is_empty(),
            "refusing to seed: the platform's tables {} already hold rows (is this the platform's real database?); \
             demo rows would be mixed into them. Pass --force to add them anyway",
            non_empty.join(", ")
        );
    }
    let mut tx = conn.begin().await?;
    let report = SeedReport {
        users: insert(&mut tx, "User", r#""id","email","name","createdAt","updatedAt""#, rows.users).await?,
        tracks: insert(
            &mut tx,
            "Track",
            r#""id","spotifyId","name","artists","album","popularity","createdAt","updatedAt""#,
            rows.tracks,
        )
        .await?,
        track_features: insert(&mut tx, "TrackFeatures", &features_columns(), rows.features).await?,
        interactions: insert(
            &mut tx,
            "TrackInteraction",
            r#""id","userId","trackId","type","timestamp""#,
            rows.interactions,
        )
        .await?,
        playlists: insert(
            &mut tx,
            "Playlist",
            r#""id","spotifyId","name","description","createdAt","updatedAt","creatorId""#,
            rows.playlists,
        )
        .await?,
        playlist_tracks: insert(&mut tx, "_PlaylistToTrack", r#""A","B""#, rows.playlist_tracks).await?,
    };
    tx.commit().await?;
    info!(?report, "seeded");
    Ok(report)
}

fn features_columns() -> String {
    let mut cols = vec![r#""id""#.to_string(), r#""trackId""#.to_string()];
    cols.extend(FEATURE_NAMES.iter().map(|f| format!("\"{f}\"")));
    cols.push(r#""updatedAt""#.to_string());
    cols.join(",")
}

/// COPY `lines` into a staging copy of `table`, then insert what is not there yet.
async fn insert(conn: &mut PgConnection, table: &str, columns: &str, lines: Lines<'_>) -> anyhow::Result<u64> {
    let mut lines = lines.peekable();
    if lines.peek().is_none() {
        return Ok(0);
    }
    let stage = format!("stage_{}", table.trim_start_matches('_').to_lowercase());
    let create =
        format!(r#"CREATE TEMP TABLE "{stage}" ON COMMIT DROP AS SELECT {columns} FROM "{table}" WITH NO DATA"#);
    sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&mut *conn).await?;
    let mut copy = conn.copy_in_raw(&format!(r#"COPY "{stage}" ({columns}) FROM STDIN"#)).await?;
    let mut buf = Vec::with_capacity(1 << 20);
    for line in lines {
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        if buf.len() > 1 << 20 {
            copy.send(std::mem::take(&mut buf)).await?;
        }
    }
    copy.send(buf).await?;
    copy.finish().await.with_context(|| format!("COPY into {table}"))?;
    let insert = format!(r#"INSERT INTO "{table}" ({columns}) SELECT {columns} FROM "{stage}" ON CONFLICT DO NOTHING"#);
    let done = sqlx::raw_sql(sqlx::AssertSqlSafe(insert))
        .execute(&mut *conn)
        .await
        .with_context(|| format!("inserting into {table}"))?;
    Ok(done.rows_affected())
}

/// Escapes a value for COPY's text format.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// A one-element Postgres array literal, `{"…"}`, escaped for COPY text.
fn text_array(v: &str) -> String {
    text_array_of([v])
}

/// A `text[]` literal in COPY text format: each element double-quoted and escaped for the array
/// literal, then the whole escaped for COPY.
fn text_array_of<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> =
        values.into_iter().map(|v| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    esc(&format!("{{{}}}", quoted.join(",")))
}

fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

fn id(kind: &str, key: &str) -> String {
    Uuid::new_v5(&NAMESPACE, format!("{kind}:{key}").as_bytes()).to_string()
}

/// The `"Track".id` that `seed --spotify-csv` gives the Spotify track `spotify_id`.
pub fn spotify_track_id(spotify_id: &str) -> String {
    id("spotify-track", spotify_id)
}

fn features_line(track_id: &str, f: &FeatureRow, at: &str) -> String {
    let mut cols = vec![id("features", track_id), esc(track_id)];
    for (i, v) in f.iter().enumerate() {
        cols.push(if i == idx::KEY || i == idx::MODE { format!("{}", *v as i32) } else { format!("{}", *v as f64) });
    }
    cols.push(at.to_string());
    cols.join("\t")
}

fn interaction_line(user: &str, track: &str, kind: &str, at: &str) -> String {
    let key = format!("{user}|{track}|{kind}|{at}");
    [id("interaction", &key), esc(user), esc(track), esc(kind), at.to_string()].join("\t")
}

impl<'a> SeedRows<'a> {
    /// Rows for a synthetic dataset: its users, tracks, features and interactions, with its own ids.
    pub fn from_synthetic(dataset: &'a Dataset) -> Self {
        let created = ts(Utc.with_ymd_and_hms(2025, 10, 1, 0, 0, 0).single().expect("valid date"));
        let (c1, c2, c3) = (created.clone(), created.clone(), created);
        let catalogue = &dataset.catalogue;
        let it = &dataset.interactions;
        SeedRows {
            users: Box::new(it.user_ids.iter().enumerate().map(move |(i, uid)| {
                format!("{uid}\t{uid}@synthetic.audotics.invalid\tSynthetic user {i}\t{c1}\t{c1}")
            })),
            tracks: Box::new(catalogue.track_ids.iter().enumerate().map(move |(i, tid)| {
                let tags = &catalogue.tags;
                let artists = text_array_of(tags.artists_of(i).iter().map(|&a| tags.artists.name(a)));
                let album = esc(tags.album_of(i).map_or("", |a| tags.albums.name(a)));
                format!("{tid}\tsynthetic-{tid}\tSynthetic track {i}\t{artists}\t{album}\t0\t{c2}\t{c2}")
            })),
            features: Box::new(
                catalogue.track_ids.iter().zip(&catalogue.features).map(move |(tid, f)| features_line(tid, f, &c3)),
            ),
            interactions: Box::new((0..it.len()).map(move |r| {
                let at = ts(Utc.timestamp_millis_opt(it.timestamp_ms[r]).single().expect("valid timestamp"));
                let (user, track) = (&it.user_ids[it.user[r] as usize], &catalogue.track_ids[it.track[r] as usize]);
                interaction_line(user, track, it.kinds.name(it.kind[r]), &at)
            })),
            playlists: Box::new(std::iter::empty()),
            playlist_tracks: Box::new(std::iter::empty()),
        }
    }

    /// Rows for the Spotify songs CSV (`spotify_songs.csv` of `../shared/data/spotify_songs.zip`):
    /// each distinct track with its features, each playlist as a `"Playlist"` with its tracks in
    /// `"_PlaylistToTrack"`, and each playlist as a user who `play`ed its tracks.
    pub fn from_spotify_csv(path: &Path) -> anyhow::Result<SeedRows<'static>> {
        let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
        let headers = reader.headers()?.clone();
        let col = |name: &str| {
            headers.iter().position(|h| h == name).with_context(|| format!("{} has no column {name}", path.display()))
        };
        let (c_track, c_name, c_artist, c_pop, c_album) = (
            col("track_id")?,
            col("track_name")?,
            col("track_artist")?,
            col("track_popularity")?,
            col("track_album_name")?,
        );
        let (c_pl, c_pl_name, c_genre, c_subgenre) =
            (col("playlist_id")?, col("playlist_name")?, col("playlist_genre")?, col("playlist_subgenre")?);
        let feature_cols: Vec<usize> = FEATURE_NAMES.iter().map(|f| col(f)).collect::<anyhow::Result<_>>()?;

        // The dataset's date (TidyTuesday 2020-01-21) anchors every timestamp, so ids stay stable.
        let base = Utc.with_ymd_and_hms(2020, 1, 21, 0, 0, 0).single().expect("valid date");
        let created = ts(base);
        let mut rows = Collected::default();
        let mut tracks_seen = HashSet::new();
        let mut playlists_seen: HashMap<String, String> = HashMap::new();
        let mut memberships = HashSet::new();
        for (n, record) in reader.records().enumerate() {
            let r = record.with_context(|| format!("{} row {}", path.display(), n + 2))?;
            let spotify_track = &r[c_track];
            let track_id = spotify_track_id(spotify_track);
            if tracks_seen.insert(spotify_track.to_string()) {
                let mut f = [0f32; 11];
                for (i, &c) in feature_cols.iter().enumerate() {
                    f[i] =
                        r[c].parse().with_context(|| format!("row {}: {} is not a number", n + 2, FEATURE_NAMES[i]))?;
                }
                let name = if r[c_name].is_empty() { "(untitled)" } else { &r[c_name] };
                let popularity: i32 = r[c_pop].parse().unwrap_or(0);
                rows.tracks.push(format!(
                    "{track_id}\t{}\t{}\t{}\t{}\t{popularity}\t{created}\t{created}",
                    esc(spotify_track),
                    esc(name),
                    text_array(&r[c_artist]),
                    esc(&r[c_album])
                ));
                rows.features.push(features_line(&track_id, &f, &created));
            }
            let spotify_playlist = &r[c_pl];
            let user_id = id("spotify-playlist-user", spotify_playlist);
            let playlist_id = playlists_seen.entry(spotify_playlist.to_string()).or_insert_with(|| {
                let pid = id("spotify-playlist", spotify_playlist);
                rows.users.push(format!(
                    "{user_id}\t{}@playlists.spotify.invalid\t{}\t{created}\t{created}",
                    esc(spotify_playlist),
                    esc(&format!("Playlist: {}", &r[c_pl_name]))
                ));
                rows.playlists.push(format!(
                    "{pid}\t{}\t{}\t{}\t{created}\t{created}\t{user_id}",
                    esc(spotify_playlist),
                    esc(&r[c_pl_name]),
                    esc(&format!("{} / {}", &r[c_genre], &r[c_subgenre]))
                ));
                pid
            });
            if memberships.insert((playlist_id.clone(), track_id.clone())) {
                rows.playlist_tracks.push(format!("{playlist_id}\t{track_id}"));
                // One play per (playlist, track); a second apart, in file order.
                let at = ts(base + chrono::Duration::seconds(n as i64));
                rows.interactions.push(interaction_line(&user_id, &track_id, "play", &at));
            }
        }
        Ok(SeedRows {
            users: Box::new(rows.users.into_iter()),
            tracks: Box::new(rows.tracks.into_iter()),
            features: Box::new(rows.features.into_iter()),
            interactions: Box::new(rows.interactions.into_iter()),
            playlists: Box::new(rows.playlists.into_iter()),
            playlist_tracks: Box::new(rows.playlist_tracks.into_iter()),
        })
    }
}

/// Lines gathered in memory (the Spotify CSV is 33 k rows).
#[derive(Default)]
struct Collected {
    users: Vec<String>,
    tracks: Vec<String>,
    features: Vec<String>,
    interactions: Vec<String>,
    playlists: Vec<String>,
    playlist_tracks: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escaping() {
        assert_eq!(esc("a\tb\\c\nd"), "a\\tb\\\\c\\nd");
        assert_eq!(text_array(r#"Guns "N" Roses"#), r#"{"Guns \\"N\\" Roses"}"#);
    }

    #[test]
    fn ids_are_stable_and_distinct_per_kind() {
        assert_eq!(id("spotify-track", "x"), id("spotify-track", "x"));
        assert_ne!(id("spotify-track", "x"), id("spotify-playlist", "x"));
    }

    #[test]
    fn synthetic_rows_cover_every_entity() {
        let spec = crate::data::source::SyntheticSpec { tracks: 50, users: 5, interactions: 200, genres: 3, seed: 1 };
        let dataset = crate::data::synthetic::generate(&spec);
        let mut rows = SeedRows::from_synthetic(&dataset);
        let first_features = rows.features.next().unwrap();
        assert_eq!(first_features.split('\t').count(), 2 + 11 + 1);
        let counts = (rows.users.count(), rows.tracks.count(), rows.features.count() + 1, rows.interactions.count());
        assert_eq!(counts, (5, 50, 50, 200));
    }
}
