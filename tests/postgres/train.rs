use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::helpers::{FAST, TestDb, command, metadata, only_version, run};

const SIZES: &[&str] = &["--synthetic-tracks", "600", "--synthetic-users", "60", "--synthetic-interactions", "6000"];

fn train(db_url: Option<&str>, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--output", out.to_str().unwrap()];
    if let Some(url) = db_url {
        args.extend(["--database-url", url]);
    }
    args.extend_from_slice(FAST);
    if !extra.contains(&"--epochs") {
        args.extend(["--epochs", "2"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

/// Panics naming the first tensor that differs (printing whole tensors would drown the log).
fn assert_same_weights(a: &Path, b: &Path) {
    for ((name, va), (_, vb)) in weights(a).iter().zip(weights(b)) {
        assert!(*va == vb, "tensor {name} differs");
    }
}

fn weights(version: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> =
        candle_core::safetensors::load(version.join("weights.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[tokio::test]
async fn the_postgres_path_and_the_in_memory_path_agree_bit_for_bit() {
    let db = TestDb::new().await;
    let mut seed_args = SIZES.to_vec();
    seed_args.extend(["--seed", "7"]);
    db.seed_synthetic(&seed_args);
    let (pg, mem) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The database's default hold-out is by time; the in-memory one is told to use it too, so that
    // both paths split, mine and train the same.
    let out = train(Some(&db.url), pg.path(), &["--seed", "7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut mem_args = SIZES.to_vec();
    mem_args.extend(["--seed", "7", "--holdout", "time"]);
    let out = train(None, mem.path(), &mem_args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (vp, vm) = (only_version(pg.path()), only_version(mem.path()));
    let (mp, mm) = (metadata(&vp), metadata(&vm));
    for curve in ["loss", "val_loss", "recall_at_10", "ndcg_at_10"] {
        assert_eq!(mp["training_history"][curve], mm["training_history"][curve], "{curve}");
    }
    assert_eq!(mp["final_metrics"], mm["final_metrics"]);
    assert_eq!(mp["baselines"], mm["baselines"]);
    assert_eq!(mp["track_ids"], mm["track_ids"]);
    assert_same_weights(&vp, &vm);
    assert_eq!(mp["data"]["synthetic"], false);
    assert_eq!(mp["data"]["holdout"], mm["data"]["holdout"]);
    assert_eq!(mp["data"]["holdout"]["kind"], "time");
    assert_eq!(mp["data"]["source"]["kind"], "postgres");
    // The same interaction watermark; only the database's catalogue has creation times to pin.
    let mut pg_watermark = mp["data"]["watermark"].clone();
    assert!(pg_watermark.as_object_mut().unwrap().remove("newest_track_created_ms").unwrap().is_i64());
    assert_eq!(pg_watermark, mm["data"]["watermark"]);

    // Every CLI run is in the ledger.
    let (status, watermark, count): (String, Option<chrono::DateTime<chrono::Utc>>, Option<i64>) =
        sqlx::query_as("SELECT status, data_watermark, interaction_count FROM audotics_trainer.training_runs")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "succeeded");
    assert_eq!(count, Some(6000));
    let expected = mp["data"]["watermark"]["newest_interaction_at"].as_str().unwrap();
    assert_eq!(watermark.unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true), expected);
}

#[tokio::test]
async fn too_little_data_ends_as_insufficient_data() {
    let db = TestDb::new().await;
    db.seed_synthetic(&["--synthetic-tracks", "100", "--synthetic-users", "5", "--synthetic-interactions", "300"]);
    let out_dir = tempfile::tempdir().unwrap();
    let out = train(Some(&db.url), out_dir.path(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("insufficient data") && stdout.contains("100 tracks with usable features (minimum 500)"),
        "{stdout}"
    );
    assert!(!out_dir.path().join("content-based/versions").exists());
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM audotics_trainer.training_runs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(status, "insufficient_data");
    assert!(error.unwrap().contains("minimum 500"));
    // The thresholds are configurable.
    let out =
        train(Some(&db.url), out_dir.path(), &["--min-tracks", "50", "--min-users", "2", "--min-interactions", "100"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unreachable_database_is_one_clear_error_without_the_password() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = train(Some("postgres://postgres:hunter2@127.0.0.1:1/audotics"), out_dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("cannot connect to the database at postgres://postgres:***@127.0.0.1:1/audotics"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"));
}

#[tokio::test]
async fn dirty_data_reaches_metadata_and_ledger_and_no_artifact_names_the_database_or_its_password() {
    let db = TestDb::new().await;
    db.seed_synthetic(SIZES);
    let user: String = sqlx::query_scalar(r#"SELECT id FROM "User" LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    let track: String = sqlx::query_scalar(r#"SELECT id FROM "Track" LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    db.exec(&format!(
        r#"INSERT INTO "TrackInteraction" (id, "userId", "trackId", type, timestamp)
           SELECT gen_random_uuid()::text, '{user}', '{track}', 'share', TIMESTAMP '2026-01-02' + g * INTERVAL '1 second' FROM generate_series(1, 40) g"#
    ))
    .await;
    // A password the trust-authenticated server ignores: it must never be written anywhere.
    let url = db.url.replacen("postgres@", "postgres:hunter2@", 1);
    let out_dir = tempfile::tempdir().unwrap();
    let out = train(Some(&url), out_dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("dirty data: unknown interaction type").count(), 1, "logged once, not per row");
    let meta = metadata(&only_version(out_dir.path()));
    assert_eq!(meta["data"]["source"]["quality"]["unknown_interaction_types"]["share"], 40);
    let counts: serde_json::Value =
        sqlx::query_scalar("SELECT counts FROM audotics_trainer.training_runs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(counts["source"]["quality"]["unknown_interaction_types"]["share"], 40);
    for file in walk(out_dir.path()) {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).to_string();
        assert!(!text.contains("hunter2"), "password written to {}", file.display());
    }
    assert!(!stderr.contains("hunter2"));
    // Nor where the database is: the published metadata and run.json name only its label.
    assert_eq!(meta["data"]["source"]["database"], "postgres");
    for file in walk(out_dir.path()) {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).to_string();
        assert!(!text.contains(&db.name) && !text.contains("127.0.0.1"), "database named in {}", file.display());
    }
    let labelled = tempfile::tempdir().unwrap();
    let out = train(Some(&url), labelled.path(), &["--data-source-label", "platform-eu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(metadata(&only_version(labelled.path()))["data"]["source"]["database"], "platform-eu");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() { files.extend(walk(&p)) } else { files.push(p) }
    }
    files
}

/// kill -9 mid-run, new tracks and interactions arrive, `--resume`: the run still trains on the
/// catalogue and history it started with and ends with the weights of an uninterrupted run.
#[tokio::test]
async fn a_resumed_postgres_run_ignores_tracks_and_interactions_that_arrived_after_it_started() {
    let db = TestDb::new().await;
    db.seed_synthetic(&["--synthetic-tracks", "800", "--synthetic-users", "120", "--synthetic-interactions", "20000"]);
    let epochs = ["--epochs", "6"];
    let reference = tempfile::tempdir().unwrap();
    let out = train(Some(&db.url), reference.path(), &epochs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["train", "--output", dir.path().to_str().unwrap(), "--database-url", &db.url];
    args.extend_from_slice(FAST);
    args.extend_from_slice(&epochs);
    let mut child = command(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let run_dir = loop {
        let found = std::fs::read_dir(dir.path().join("content-based/runs"))
            .ok()
            .and_then(|mut runs| runs.next())
            .and_then(|r| r.ok())
            .map(|r| r.path())
            .filter(|p| {
                // Any checkpoint of epoch 2 or later: older ones are pruned as newer ones land.
                std::fs::read_dir(p.join("checkpoints")).into_iter().flatten().flatten().any(|f| {
                    f.file_name()
                        .to_str()
                        .and_then(audotics_trainer::training::checkpoint::position_of)
                        .is_some_and(|(epoch, _)| epoch >= 2)
                })
            });
        if let Some(p) = found {
            break p;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run exited before its second checkpoint");
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
    child.kill().unwrap();
    child.wait().unwrap();

    db.exec(
        r#"INSERT INTO "TrackInteraction" (id, "userId", "trackId", type, timestamp)
           SELECT gen_random_uuid()::text, u.id, t.id, 'play', TIMESTAMP '2026-06-01'
           FROM (SELECT id FROM "User" LIMIT 10) u CROSS JOIN (SELECT id FROM "Track" LIMIT 10) t"#,
    )
    .await;
    // New tracks with features: a catalogue that grew would change the model's shapes and weights.
    for i in 0..20 {
        db.exec(&crate::helpers::track_sql(&format!("zz-new-{i:02}"), None)).await;
    }
    let run_id = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    let out = run(&[
        "train",
        "--output",
        dir.path().to_str().unwrap(),
        "--database-url",
        &db.url,
        "--resume",
        &run_id,
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_weights(&only_version(reference.path()), &only_version(dir.path()));
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM audotics_trainer.training_runs WHERE id = $1::uuid")
        .bind(&run_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 2);
}
