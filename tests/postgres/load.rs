use audotics_trainer::data::Dataset;
use audotics_trainer::data::features::idx;
use audotics_trainer::data::source::{DataQuality, LoadOptions, SyntheticSpec};
use audotics_trainer::db::load::load;
use audotics_trainer::training::pairs::{CoListenIndex, DEFAULT_POSITIVE_KINDS};

use crate::helpers::{TestDb, interaction_sql, track_sql};

fn options() -> LoadOptions {
    LoadOptions {
        playlists: false,
        positive_kinds: DEFAULT_POSITIVE_KINDS.map(String::from).to_vec(),
        interactions_until_ms: None,
        tracks_until_ms: None,
    }
}

async fn load_db(db: &TestDb, options: &LoadOptions) -> (Dataset, DataQuality) {
    let dataset = load(&db.pool, options, "test").await.unwrap();
    let quality = dataset.source.quality().unwrap().clone();
    (dataset, quality)
}

/// A track with features; `feature` = a column to override with `value` (SQL literal).
async fn add_track(db: &TestDb, id: &str, feature: Option<(&str, &str)>) {
    db.exec(&track_sql(id, feature)).await;
}

async fn add_interaction(db: &TestDb, user: &str, track: &str, kind: &str, seconds: i64) {
    let at = format!("TIMESTAMP '2026-01-02' + {seconds} * INTERVAL '1 second'");
    db.exec(&interaction_sql(user, track, kind, &at)).await;
}

#[tokio::test]
async fn every_kind_of_dirty_data_is_counted_and_handled() {
    let db = TestDb::new().await;
    db.seed_synthetic(&["--synthetic-tracks", "300", "--synthetic-users", "30", "--synthetic-interactions", "3000"]);
    let (clean, clean_quality) = load_db(&db, &options()).await;
    assert_eq!(
        clean_quality,
        DataQuality { tracks_read: 300, interactions_read: clean.interactions.len() as u64, ..Default::default() }
    );
    let clean_mining = CoListenIndex::build(&clean.interactions, &options().positive_kinds).stats;

    // NULL features need a column that allows them (older schemas did); this is the test's own database.
    db.exec(r#"ALTER TABLE "TrackFeatures" ALTER COLUMN "energy" DROP NOT NULL"#).await;
    db.exec(r#"INSERT INTO "Track" (id, "spotifyId", name, album, "updatedAt") VALUES ('zz-nofeatures', 'sp-nf', 'n', 'a', now())"#).await;
    add_track(&db, "zz-null", Some(("energy", "NULL"))).await;
    add_track(&db, "zz-nan", Some(("valence", "'NaN'"))).await;
    add_track(&db, "zz-inf", Some(("tempo", "'Infinity'"))).await;
    add_track(&db, "zz-key", Some(("key", "14"))).await;
    add_track(&db, "zz-mode", Some(("mode", "3"))).await;
    add_track(&db, "zz-loud", Some(("loudness", "3.5"))).await;
    add_track(&db, "zz-tempo", Some(("tempo", "0"))).await;

    let user: String =
        sqlx::query_scalar(r#"SELECT id FROM "User" ORDER BY id LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    let track: String =
        sqlx::query_scalar(r#"SELECT id FROM "Track" ORDER BY id LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    for s in 0..3 {
        add_interaction(&db, &user, &track, "share", s).await; // unknown type
    }
    add_interaction(&db, &user, "zz-nan", "play", 10).await; // track dropped
    add_interaction(&db, &user, "zz-nofeatures", "play", 11).await; // track without features
    add_interaction(&db, &user, "zz-loud", "play", 12).await; // clamped track: kept
    add_interaction(&db, &user, "zz-loud", "play", 13).await; // a repeated positive of the same (user, track)
    // A new user with one positive track: below two.
    db.exec(r#"INSERT INTO "User" (id, email, name, "updatedAt") VALUES ('zz-lonely', 'l@x.invalid', 'l', now())"#)
        .await;
    add_interaction(&db, "zz-lonely", &track, "play", 14).await;

    let (dirty, q) = load_db(&db, &options()).await;
    assert_eq!(q.tracks_read, 308);
    assert_eq!(q.tracks_without_features, 1);
    assert_eq!(q.tracks_with_null_features, 1);
    assert_eq!(q.tracks_with_non_finite_features, 2);
    assert_eq!(q.tracks_with_invalid_key_or_mode, 2);
    assert_eq!(q.clamped_feature_values, [("loudness".to_string(), 1), ("tempo".to_string(), 1)].into());
    assert_eq!(q.interactions_read, clean.interactions.len() as u64 + 8);
    assert_eq!(q.interactions_without_track_features, 2);
    assert_eq!(q.interactions_with_nulls, 0);
    assert_eq!(q.unknown_interaction_types, [("share".to_string(), 3)].into());

    assert_eq!(dirty.catalogue.len(), 302, "clamped tracks are kept, the rest dropped");
    let loud = dirty.catalogue.track_ids.iter().position(|id| id == "zz-loud").unwrap();
    let tempo = dirty.catalogue.track_ids.iter().position(|id| id == "zz-tempo").unwrap();
    assert_eq!(dirty.catalogue.features[loud][idx::LOUDNESS], 0.0);
    assert_eq!(dirty.catalogue.features[tempo][idx::TEMPO], 50.0);
    assert!(dirty.catalogue.track_ids.windows(2).all(|w| w[0] < w[1]), "tracks in byte order of their ids");

    let mining = CoListenIndex::build(&dirty.interactions, &options().positive_kinds).stats;
    assert_eq!(mining.users_below_two_tracks, clean_mining.users_below_two_tracks + 1);
    assert_eq!(mining.duplicate_positive_interactions, clean_mining.duplicate_positive_interactions + 1);
    assert_eq!(dirty.watermark.newest_interaction_at.as_deref(), Some("2026-01-02T00:00:14.000Z"));
}

#[tokio::test]
async fn a_cutoff_reads_only_the_history_up_to_it() {
    let db = TestDb::new().await;
    db.seed_synthetic(&["--synthetic-tracks", "200", "--synthetic-users", "20", "--synthetic-interactions", "1000"]);
    let (before, _) = load_db(&db, &options()).await;
    let user: String = sqlx::query_scalar(r#"SELECT id FROM "User" LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    let track: String = sqlx::query_scalar(r#"SELECT id FROM "Track" LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    add_interaction(&db, &user, &track, "play", 0).await;
    let cutoff = LoadOptions { interactions_until_ms: before.watermark.newest_interaction_ms, ..options() };
    let (after, _) = load_db(&db, &cutoff).await;
    assert_eq!(after.interactions.len(), before.interactions.len());
    assert_eq!(after.watermark, before.watermark);
    let (all, _) = load_db(&db, &options()).await;
    assert_eq!(all.interactions.len(), before.interactions.len() + 1);
}

#[tokio::test]
async fn playlists_are_a_second_co_occurrence_source() {
    let db = TestDb::new().await;
    db.seed_synthetic(&["--synthetic-tracks", "200", "--synthetic-users", "20", "--synthetic-interactions", "1000"]);
    let user: String = sqlx::query_scalar(r#"SELECT id FROM "User" LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    db.exec(&format!(
        r#"INSERT INTO "Playlist" (id, name, "updatedAt", "creatorId") VALUES ('pl-1', 'mix', now(), '{user}')"#
    ))
    .await;
    db.exec(r#"INSERT INTO "_PlaylistToTrack" ("A", "B") SELECT 'pl-1', id FROM "Track" ORDER BY id LIMIT 5"#).await;
    let (without, _) = load_db(&db, &options()).await;
    let (with, q) = load_db(&db, &LoadOptions { playlists: true, ..options() }).await;
    assert_eq!(q.playlist_memberships_read, 5);
    assert_eq!(with.interactions.len(), without.interactions.len() + 5);
    assert!(with.interactions.user_ids.iter().any(|u| u == "playlist:pl-1"));
    assert_eq!(with.watermark, without.watermark, "memberships carry no time");
    let index = CoListenIndex::build(&with.interactions, &options().positive_kinds);
    let plain = CoListenIndex::build(&without.interactions, &options().positive_kinds);
    assert_eq!(index.stats.users, plain.stats.users + 1, "the playlist is a co-occurrence group");
}

#[tokio::test]
async fn a_database_without_the_platforms_tables_is_one_clear_error() {
    let db = TestDb::new().await;
    let err = load(&db.pool, &options(), "test").await.unwrap_err().to_string();
    assert!(err.contains(r#"lacks the platform's tables "Track", "TrackFeatures", "TrackInteraction""#), "{err}");
}

#[tokio::test]
async fn artists_and_albums_load_interned_and_null_or_empty_ones_are_none() {
    let db = TestDb::new().await;
    db.seed_synthetic(&["--synthetic-tracks", "200", "--synthetic-users", "20", "--synthetic-interactions", "1000"]);
    let spec = SyntheticSpec { tracks: 200, users: 20, interactions: 1000, ..SyntheticSpec::default() };
    let generated = audotics_trainer::data::synthetic::generate(&spec);
    let (seeded, _) = load_db(&db, &options()).await;
    assert_eq!(seeded.catalogue.track_ids, generated.catalogue.track_ids);
    assert_eq!(seeded.catalogue.tags, generated.catalogue.tags, "the Postgres path reads the tags it was seeded with");
    assert!(seeded.catalogue.tags.artists.len() > 10);

    // Tracks sort by id after the seeded ones ('~' > any hex digit); NULL and empty arrays, NULL
    // elements, a repeated credit, quotes and commas in names, and a blank album.
    for (id, artists, album) in [
        ("~1", "NULL", "''"),
        ("~2", "ARRAY[]::text[]", "'  '"),
        ("~3", r#"ARRAY[NULL, 'Daft Punk', 'Daft Punk', 'Earth, Wind & Fire']"#, "'Discovery'"),
        ("~4", r#"ARRAY['The "Band"']"#, "'Discovery'"),
    ] {
        db.exec(&track_sql(id, None)).await;
        db.exec(&format!(r#"UPDATE "Track" SET artists = {artists}, album = {album} WHERE id = '{id}'"#)).await;
    }
    let (loaded, _) = load_db(&db, &options()).await;
    let tags = &loaded.catalogue.tags;
    let row = |id: &str| loaded.catalogue.track_ids.iter().position(|t| t == id).unwrap();
    let names = |t: usize| -> Vec<&str> { tags.artists_of(t).iter().map(|&a| tags.artists.name(a)).collect() };
    assert!(names(row("~1")).is_empty());
    assert_eq!(tags.album_of(row("~1")), None);
    assert!(names(row("~2")).is_empty());
    assert_eq!(tags.album_of(row("~2")), None, "a blank album is no album");
    assert_eq!(names(row("~3")), ["Daft Punk", "Earth, Wind & Fire"]);
    assert_eq!(names(row("~4")), [r#"The "Band""#]);
    assert_eq!(tags.album_of(row("~3")), tags.album_of(row("~4")));
    assert_eq!(tags.albums.name(tags.album_of(row("~3")).unwrap()), "Discovery");
    assert_eq!(tags.len(), loaded.catalogue.len());
}
