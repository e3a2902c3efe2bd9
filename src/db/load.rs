//! Loading the platform's data with binary COPY, straight into the compact [`Dataset`] form.
//!
//! Rows are decoded as they stream in; TEXT ids are interned into dense indices on arrival (one
//! `String` per distinct track and user, never per row), so memory is O(tracks + interactions):
//! 17 bytes per interaction plus the id tables.
//!
//! Dirty data gets a defined outcome, counted in [`DataQuality`] and logged once per kind:
//! - a track with no `"TrackFeatures"` row, with a NULL or non-finite (NaN, ±∞) feature, or with a
//!   `key` outside the integers 0–11 or a `mode` other than 0/1 is **dropped** (it cannot be embedded);
//! - a continuous feature outside its physical range (e.g. loudness +1.3 dB, tempo 0 or 239 BPM in the
//!   Spotify data) is **clamped** into the range, and counted per feature;
//! - an interaction whose track is unknown or was dropped, or with a NULL column, is **dropped**;
//! - an interaction type outside the platform's seven (and the configured positive types) is kept but
//!   never positive, and **counted per type**;
//! - repeated positive interactions of one (user, track) and users with fewer than two positive tracks
//!   are counted by pair mining ([`crate::training::pairs::MiningStats`]).

use std::collections::HashMap;

use anyhow::{Context, bail};
use futures::TryStreamExt;

use sqlx::PgPool;
use sqlx::postgres::PgPoolCopyExt;
use tracing::info;

use super::copy_binary::{CopyBinaryDecoder, Row};
use super::platform::{KNOWN_INTERACTION_TYPES, PLAYLIST_TABLES, REQUIRED_TABLES};
use crate::data::features::{FEATURE_NAMES, FEATURE_RANGES, FeatureRow, NUM_FEATURES, idx};
use crate::data::source::{DataQuality, DataSource, LoadOptions};
use crate::data::{Catalogue, Dataset, Interactions, PLAYLIST_KIND, Watermark};

fn tracks_sql(created_until_ms: Option<i64>) -> String {
    let filter = match created_until_ms {
        Some(ms) => format!(r#" WHERE t."createdAt" <= {}"#, timestamp_of_ms(ms)),
        None => String::new(),
    };
    format!(
        r#"COPY (
    SELECT t."id", f."id",
           f."acousticness", f."danceability", f."energy", f."instrumentalness", f."key"::float8,
           f."liveness", f."loudness", f."mode"::float8, f."speechiness", f."tempo", f."valence",
           t."artists", t."album"
    FROM "Track" t LEFT JOIN "TrackFeatures" f ON f."trackId" = t."id"{filter}
    ORDER BY t."id" COLLATE "C"
) TO STDOUT (FORMAT binary)"#
    )
}

/// A SQL `TIMESTAMP` literal for `ms` since the Unix epoch. Integer arithmetic on a TIMESTAMP: exact to
/// the millisecond, no time-zone conversion.
fn timestamp_of_ms(ms: i64) -> String {
    format!("(TIMESTAMP '1970-01-01 00:00:00' + {ms} * INTERVAL '1 millisecond')")
}

/// The newest `"Track"."createdAt"` in milliseconds since the Unix epoch; `None` without tracks.
pub async fn newest_track_created_ms(pool: &PgPool) -> anyhow::Result<Option<i64>> {
    sqlx::query_scalar(r#"SELECT floor(extract(epoch FROM max("createdAt")) * 1000)::int8 FROM "Track""#)
        .fetch_one(pool)
        .await
        .context("cannot read the newest track's creation time")
}

/// `ORDER BY … COLLATE "C"` sorts by bytes, as Rust sorts `String`s: the catalogue order (and so the
/// model) does not depend on the database's collation, and matches the in-memory path's.
fn interactions_sql(until_ms: Option<i64>) -> String {
    let filter = match until_ms {
        Some(ms) => format!(r#" WHERE "timestamp" <= {}"#, timestamp_of_ms(ms)),
        None => String::new(),
    };
    format!(
        r#"COPY (SELECT "userId", "trackId", "type", "timestamp" FROM "TrackInteraction"{filter}) TO STDOUT (FORMAT binary)"#
    )
}

const PLAYLISTS_SQL: &str = r#"COPY (SELECT "A", "B" FROM "_PlaylistToTrack") TO STDOUT (FORMAT binary)"#;

/// Loads the platform's tracks, features and co-occurrences. `database` names the source (its label,
/// never its URL) in the dataset's [`DataSource`], which also carries the dirty-data counts.
pub async fn load(pool: &PgPool, options: &LoadOptions, database: &str) -> anyhow::Result<Dataset> {
    check_tables(pool, options.playlists).await?;
    let mut quality = DataQuality::default();
    // Pinned before reading, so a track created while the catalogue streams is left for the next run.
    let tracks_until_ms = match options.tracks_until_ms {
        Some(ms) => Some(ms),
        None => newest_track_created_ms(pool).await?,
    };
    let catalogue = load_tracks(pool, tracks_until_ms, &mut quality).await?;
    let track_index: HashMap<&str, u32> =
        catalogue.track_ids.iter().enumerate().map(|(i, id)| (id.as_str(), i as u32)).collect();
    let mut users = UserInterner::default();
    let mut interactions = Interactions::default();
    load_interactions(pool, options, &track_index, &mut users, &mut interactions, &mut quality).await?;
    let watermark = Watermark { newest_track_created_ms: tracks_until_ms, ..Watermark::of(&interactions) };
    if options.playlists {
        load_playlists(pool, &track_index, &mut users, &mut interactions, &mut quality).await?;
    }
    drop(track_index);
    interactions.user_ids = users.into_ids();
    interactions.canonicalize_users();
    info!(
        tracks = catalogue.len(),
        interactions = interactions.len(),
        users = interactions.user_ids.len(),
        newest_interaction = ?watermark.newest_interaction_at,
        "platform data loaded"
    );
    quality.log();
    let source = DataSource::Postgres { database: database.to_string(), options: options.clone(), quality };
    Ok(Dataset { catalogue, interactions, watermark, source })
}

/// Fails with one message naming every missing table.
async fn check_tables(pool: &PgPool, playlists: bool) -> anyhow::Result<()> {
    let mut wanted: Vec<&str> = REQUIRED_TABLES.to_vec();
    if playlists {
        wanted.extend(PLAYLIST_TABLES);
    }
    let mut missing = Vec::new();
    for table in wanted {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(format!("\"{table}\""))
            .fetch_one(pool)
            .await
            .context("cannot query the database catalogue")?;
        if found.is_none() {
            missing.push(format!("\"{table}\""));
        }
    }
    if !missing.is_empty() {
        bail!(
            "the database lacks the platform's tables {} (is DATABASE_URL pointing at the Audotics database?)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Streams a COPY statement through `on_row`.
async fn copy_rows(
    pool: &PgPool,
    sql: &str,
    columns: usize,
    mut on_row: impl FnMut(Row<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut stream = pool.copy_out_raw(sql).await.context("COPY failed to start")?;
    let mut decoder = CopyBinaryDecoder::new(columns);
    while let Some(chunk) = stream.try_next().await.context("COPY stream failed")? {
        decoder.feed(&chunk, &mut on_row)?;
    }
    decoder.finish()?;
    Ok(decoder.rows())
}

async fn load_tracks(
    pool: &PgPool,
    created_until_ms: Option<i64>,
    quality: &mut DataQuality,
) -> anyhow::Result<Catalogue> {
    let mut catalogue = Catalogue::default();
    let mut clamped = [0u64; NUM_FEATURES];
    let rows = copy_rows(pool, &tracks_sql(created_until_ms), 2 + NUM_FEATURES + 2, |row| {
        let id = row.text(0)?.context("Track.id is NULL")?;
        if row.raw(1).is_none() {
            quality.tracks_without_features += 1;
            return Ok(());
        }
        let mut values = [None; NUM_FEATURES];
        for (f, value) in values.iter_mut().enumerate() {
            *value = row.f64(2 + f)?;
        }
        match validate_features(&values, &mut clamped) {
            Ok(features) => {
                let artists = row.text_array(2 + NUM_FEATURES).context("Track.artists")?.unwrap_or_default();
                catalogue.track_ids.push(id.to_string());
                catalogue.features.push(features);
                catalogue.tags.push(artists, row.text(3 + NUM_FEATURES).context("Track.album")?);
            }
            Err(Invalid::Null) => quality.tracks_with_null_features += 1,
            Err(Invalid::NonFinite) => quality.tracks_with_non_finite_features += 1,
            Err(Invalid::Categorical) => quality.tracks_with_invalid_key_or_mode += 1,
        }
        Ok(())
    })
    .await
    .context("reading \"Track\" and \"TrackFeatures\"")?;
    quality.tracks_read = rows;
    for (f, &count) in clamped.iter().enumerate() {
        if count > 0 {
            quality.clamped_feature_values.insert(FEATURE_NAMES[f].to_string(), count);
        }
    }
    Ok(catalogue)
}

/// Why a track's features are unusable.
#[derive(Debug, PartialEq)]
enum Invalid {
    Null,
    NonFinite,
    Categorical,
}

/// Checks one track's features: NULL or non-finite values and invalid `key`/`mode` reject the track;
/// continuous values outside their physical range are clamped (and counted in `clamped`).
fn validate_features(
    values: &[Option<f64>; NUM_FEATURES],
    clamped: &mut [u64; NUM_FEATURES],
) -> Result<FeatureRow, Invalid> {
    let mut row = [0f32; NUM_FEATURES];
    for (f, value) in values.iter().enumerate() {
        let v = value.ok_or(Invalid::Null)?;
        if !v.is_finite() {
            return Err(Invalid::NonFinite);
        }
        let (lo, hi) = FEATURE_RANGES[f];
        row[f] = match f {
            idx::KEY if v.fract() != 0.0 || !(0.0..=11.0).contains(&v) => return Err(Invalid::Categorical),
            idx::MODE if v != 0.0 && v != 1.0 => return Err(Invalid::Categorical),
            _ if v < lo as f64 || v > hi as f64 => {
                clamped[f] += 1;
                v.clamp(lo as f64, hi as f64) as f32
            }
            _ => v as f32,
        };
    }
    Ok(row)
}

/// Interns user (and playlist) ids as they arrive: one `String` per distinct id.
#[derive(Default)]
struct UserInterner {
    index: HashMap<Box<str>, u32>,
    ids: Vec<String>,
}

impl UserInterner {
    fn intern(&mut self, id: &str) -> u32 {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let i = self.ids.len() as u32;
        self.index.insert(id.into(), i);
        self.ids.push(id.to_string());
        i
    }

    fn into_ids(self) -> Vec<String> {
        self.ids
    }
}

async fn load_interactions(
    pool: &PgPool,
    options: &LoadOptions,
    tracks: &HashMap<&str, u32>,
    users: &mut UserInterner,
    out: &mut Interactions,
    quality: &mut DataQuality,
) -> anyhow::Result<()> {
    // Reserve from the planner's row estimate: growing four arrays by doubling would hold up to twice
    // the final memory at the peak. An estimate that is off only costs a regrowth.
    let estimate: f32 =
        sqlx::query_scalar(r#"SELECT reltuples FROM pg_class WHERE oid = '"TrackInteraction"'::regclass"#)
            .fetch_one(pool)
            .await
            .unwrap_or(0.0);
    out.reserve((estimate.max(0.0) * 1.02) as usize);
    let mut per_kind: Vec<u64> = Vec::new();
    let rows = copy_rows(pool, &interactions_sql(options.interactions_until_ms), 4, |row| {
        let (Some(user), Some(track), Some(kind), Some(ts)) =
            (row.text(0)?, row.text(1)?, row.text(2)?, row.timestamp_ms(3)?)
        else {
            quality.interactions_with_nulls += 1;
            return Ok(());
        };
        let Some(&track) = tracks.get(track) else {
            quality.interactions_without_track_features += 1;
            return Ok(());
        };
        let kind = out.kinds.intern(kind).context("more than 256 distinct interaction types")?;
        if per_kind.len() <= kind as usize {
            per_kind.resize(kind as usize + 1, 0);
        }
        per_kind[kind as usize] += 1;
        let user = users.intern(user);
        out.push(user, track, kind, ts);
        Ok(())
    })
    .await
    .context("reading \"TrackInteraction\"")?;
    quality.interactions_read = rows;
    for (code, &count) in per_kind.iter().enumerate() {
        let name = out.kinds.name(code as u8);
        let known = KNOWN_INTERACTION_TYPES.contains(&name) || options.positive_kinds.iter().any(|k| k == name);
        if !known && count > 0 {
            quality.unknown_interaction_types.insert(name.to_string(), count);
        }
    }
    Ok(())
}

async fn load_playlists(
    pool: &PgPool,
    tracks: &HashMap<&str, u32>,
    users: &mut UserInterner,
    out: &mut Interactions,
    quality: &mut DataQuality,
) -> anyhow::Result<()> {
    let kind = out.kinds.intern(PLAYLIST_KIND).context("more than 256 distinct interaction types")?;
    let mut key = String::new();
    let rows = copy_rows(pool, PLAYLISTS_SQL, 2, |row| {
        let (Some(playlist), Some(track)) = (row.text(0)?, row.text(1)?) else { return Ok(()) };
        let Some(&track) = tracks.get(track) else {
            quality.playlist_memberships_without_track_features += 1;
            return Ok(());
        };
        // Namespaced so that a playlist id can never merge with a user id.
        key.clear();
        key.push_str("playlist:");
        key.push_str(playlist);
        let group = users.intern(&key);
        // Playlist memberships have no time (Prisma's implicit join table); they never move the
        // data watermark, which is taken from interactions only.
        out.push(group, track, kind, i64::MIN);
        Ok(())
    })
    .await
    .context("reading \"_PlaylistToTrack\"")?;
    quality.playlist_memberships_read = rows;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> [Option<f64>; NUM_FEATURES] {
        [
            Some(0.5),
            Some(0.5),
            Some(0.5),
            Some(0.0),
            Some(5.0),
            Some(0.1),
            Some(-7.0),
            Some(1.0),
            Some(0.05),
            Some(120.0),
            Some(0.4),
        ]
    }

    #[test]
    fn valid_rows_pass_unchanged() {
        let mut clamped = [0; NUM_FEATURES];
        let row = validate_features(&valid(), &mut clamped).unwrap();
        assert_eq!(row[idx::TEMPO], 120.0);
        assert_eq!(clamped, [0; NUM_FEATURES]);
    }

    #[test]
    fn out_of_range_continuous_values_are_clamped_and_counted() {
        let mut v = valid();
        v[idx::LOUDNESS] = Some(1.275);
        v[idx::TEMPO] = Some(0.0);
        v[idx::ENERGY] = Some(1.5);
        let mut clamped = [0; NUM_FEATURES];
        let row = validate_features(&v, &mut clamped).unwrap();
        assert_eq!((row[idx::LOUDNESS], row[idx::TEMPO], row[idx::ENERGY]), (0.0, 50.0, 1.0));
        assert_eq!((clamped[idx::LOUDNESS], clamped[idx::TEMPO], clamped[idx::ENERGY]), (1, 1, 1));
    }

    #[test]
    fn null_non_finite_and_bad_categoricals_reject_the_track() {
        let mut clamped = [0; NUM_FEATURES];
        for (f, value, why) in [
            (idx::ENERGY, None, Invalid::Null),
            (idx::VALENCE, Some(f64::NAN), Invalid::NonFinite),
            (idx::TEMPO, Some(f64::INFINITY), Invalid::NonFinite),
            (idx::KEY, Some(12.0), Invalid::Categorical),
            (idx::KEY, Some(2.5), Invalid::Categorical),
            (idx::MODE, Some(2.0), Invalid::Categorical),
        ] {
            let mut v = valid();
            v[f] = value;
            assert_eq!(validate_features(&v, &mut clamped), Err(why), "feature {f} = {value:?}");
        }
    }

    #[test]
    fn interaction_cutoff_is_a_literal_instant() {
        assert!(!interactions_sql(None).contains("WHERE"));
        let sql = interactions_sql(Some(1_767_225_600_123));
        assert!(sql.contains("TIMESTAMP '1970-01-01 00:00:00' + 1767225600123 * INTERVAL '1 millisecond'"), "{sql}");
    }
}
