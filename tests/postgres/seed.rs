use crate::helpers::{TestDb, command, run};

const SMALL: &[&str] = &["--synthetic-tracks", "300", "--synthetic-users", "30", "--synthetic-interactions", "3000"];

#[tokio::test]
async fn seed_creates_the_platforms_tables_and_is_idempotent() {
    let db = TestDb::new().await;
    let first = db.seed_synthetic(SMALL);
    assert_eq!(first["tracks"], 300);
    assert_eq!(first["track_features"], 300);
    assert_eq!(first["users"], 30);
    assert!(first["interactions"].as_u64().unwrap() > 2_900, "{first}");

    // Prisma's shapes: quoted names, TEXT ids, TIMESTAMP(3), the unique indexes.
    for table in ["User", "Track", "TrackFeatures", "TrackInteraction", "Playlist", "_PlaylistToTrack"] {
        let n = db.count(&format!("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name = '{table}'")).await;
        assert_eq!(n, 1, "table {table}");
    }
    let ts_type: String = sqlx::query_scalar(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '\"TrackInteraction\"'::regclass AND attname = 'timestamp'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(ts_type, "timestamp(3) without time zone");
    let id_type: String = sqlx::query_scalar(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '\"Track\"'::regclass AND attname = 'id'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(id_type, "text");
    for index in [
        "Track_spotifyId_key",
        "TrackFeatures_trackId_key",
        "TrackInteraction_userId_trackId_type_timestamp_key",
        "_PlaylistToTrack_AB_unique",
        "User_email_key",
    ] {
        assert_eq!(
            db.count(&format!("SELECT count(*) FROM pg_indexes WHERE indexname = '{index}'")).await,
            1,
            "{index}"
        );
    }

    let before = db.count(r#"SELECT count(*) FROM "TrackInteraction""#).await;
    // Tables with rows may be the platform's real ones: refused, and nothing changes.
    let mut args = vec!["seed", "--database-url", &db.url];
    args.extend_from_slice(SMALL);
    let refused = run(&args);
    assert_eq!(refused.status.code(), Some(1), "seeding a database with rows must be refused");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(r#"refusing to seed: the platform's tables "User", "Track", "TrackInteraction""#)
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(db.count(r#"SELECT count(*) FROM "TrackInteraction""#).await, before);
    args.push("--force");
    let forced = run(&args);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    let second: serde_json::Value = serde_json::from_slice(forced.stdout.trim_ascii()).unwrap();
    for table in ["users", "tracks", "track_features", "interactions", "playlists", "playlist_tracks"] {
        assert_eq!(second[table], 0, "second seed inserted {table}: {second}");
    }
    assert_eq!(db.count(r#"SELECT count(*) FROM "TrackInteraction""#).await, before);
    assert_eq!(db.count(r#"SELECT count(*) FROM "Track""#).await, 300);
}

#[tokio::test]
async fn migrations_racing_from_four_processes_all_succeed_once() {
    let db = TestDb::new().await;
    let children: Vec<_> = (0..4)
        .map(|_| {
            command(&["migrate", "--database-url", &db.url])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a racing migration failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count() as i64;
    assert_eq!(db.count("SELECT count(*) FROM audotics_trainer._sqlx_migrations WHERE success").await, migrations);
    assert_eq!(db.count("SELECT count(*) FROM audotics_trainer.training_runs").await, 0);
    // Nothing of the trainer's lands in the platform's schema.
    assert_eq!(db.count("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'").await, 0);
    let again = run(&["migrate", "--database-url", &db.url]);
    assert!(again.status.success());
}

#[tokio::test]
async fn spotify_csv_loads_tracks_playlists_and_plays_idempotently() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("spotify_songs.csv");
    // The real file's header; three rows, one track in two playlists, one duplicate row, one name with a comma and quotes.
    std::fs::write(
        &csv,
        "track_id,track_name,track_artist,track_popularity,track_album_id,track_album_name,track_album_release_date,playlist_name,playlist_id,playlist_genre,playlist_subgenre,danceability,energy,key,loudness,mode,speechiness,acousticness,instrumentalness,liveness,valence,tempo,duration_ms\n\
t1,\"Song, \"\"One\"\"\",Artist A,66,a1,Album,2019-06-14,Pop Remix,p1,pop,dance pop,0.748,0.916,6,-2.634,1,0.0583,0.102,0,0.0653,0.518,122.036,194754\n\
t2,Song Two,Artist B,10,a2,Album 2,2019-01-01,Pop Remix,p1,pop,dance pop,0.5,0.5,1,1.275,0,0.05,0.1,0.2,0.1,0.3,0,200000\n\
t1,\"Song, \"\"One\"\"\",Artist A,66,a1,Album,2019-06-14,Rock,p2,rock,hard rock,0.748,0.916,6,-2.634,1,0.0583,0.102,0,0.0653,0.518,122.036,194754\n\
t1,\"Song, \"\"One\"\"\",Artist A,66,a1,Album,2019-06-14,Rock,p2,rock,hard rock,0.748,0.916,6,-2.634,1,0.0583,0.102,0,0.0653,0.518,122.036,194754\n",
    )
    .unwrap();
    let args = ["seed", "--database-url", &db.url, "--spotify-csv", csv.to_str().unwrap()];
    let out = run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(
        report,
        serde_json::json!({"users": 2, "tracks": 2, "track_features": 2, "interactions": 3, "playlists": 2, "playlist_tracks": 3})
    );
    let name: String =
        sqlx::query_scalar(r#"SELECT name FROM "Track" WHERE "spotifyId" = 't1'"#).fetch_one(&db.pool).await.unwrap();
    assert_eq!(name, r#"Song, "One""#);
    assert_eq!(db.count(r#"SELECT count(*) FROM "TrackInteraction" WHERE type = 'play'"#).await, 3);
    let again = run(&[&args[..], &["--force"]].concat());
    let report: serde_json::Value = serde_json::from_slice(again.stdout.trim_ascii()).unwrap();
    assert_eq!(report["interactions"], 0);
    assert_eq!(report["tracks"], 0);
}
