//! What goes wrong only with a remote store: credentials, and the server going away mid-upload.

use std::time::{Duration, Instant};

use bytes::Bytes;

use audotics_trainer::data::Watermark;
use audotics_trainer::publish::store::{RetryPolicy, StoreError};
use audotics_trainer::publish::versions::{VersionInfo, publish_version, read_latest, read_manifest, verify};

use crate::s3::S3Server;

#[tokio::test]
async fn wrong_credentials_fail_at_once_with_a_clear_error() {
    let server = S3Server::start();
    let store = server.store_with(
        "creds",
        "not-the-secret",
        RetryPolicy { attempts: 5, min_delay: Duration::from_secs(2), max_delay: Duration::from_secs(2) },
    );
    let started = Instant::now();
    let err = store.put("m/x", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, StoreError::Denied { .. }), "{err:?}");
    assert!(err.to_string().contains("check the credentials"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a permanent error is not retried (took {:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_missing_bucket_is_not_retried() {
    let server = S3Server::start();
    let options = [
        ("aws_endpoint", server.endpoint()),
        ("aws_allow_http", "true".to_string()),
        ("aws_region", "us-east-1".to_string()),
        ("aws_access_key_id", crate::s3::ACCESS_KEY.to_string()),
        ("aws_secret_access_key", crate::s3::SECRET_KEY.to_string()),
    ];
    let slow = RetryPolicy { attempts: 5, min_delay: Duration::from_secs(2), max_delay: Duration::from_secs(2) };
    let store =
        audotics_trainer::publish::store::ModelStore::open_s3_with("s3://no-such-bucket/x", &options, slow).unwrap();
    // (s3s-fs accepts a PUT into a missing bucket by creating the folder; a GET shows the outcome.)
    let started = Instant::now();
    let err = store.get("m/latest.json").await.unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "not retried");
}

/// The server dies while a version uploads: the upload is retried, then fails cleanly, and
/// `latest.json` still names the previous, whole version.
#[tokio::test]
async fn server_stopped_mid_upload_retries_then_fails_without_a_partial_version() {
    let mut server = S3Server::start();
    let store = server.store("outage");
    let watermark = Watermark::default();
    let info = |version| VersionInfo {
        model: "m",
        version,
        run_id: "r",
        created_at: "t",
        watermark: &watermark,
        metrics: serde_json::json!({}),
    };
    publish_version(&store, &info("20260101T000000Z-111111"), vec![("a".into(), Bytes::from_static(b"first"))])
        .await
        .unwrap();

    let big: Vec<(String, Bytes)> =
        (0..6).map(|i| (format!("part-{i}.bin"), Bytes::from(vec![i as u8; 6 << 20]))).collect();
    let upload = {
        let store = store.clone();
        let watermark = watermark.clone();
        tokio::spawn(async move {
            let info = VersionInfo {
                model: "m",
                version: "20260102T000000Z-222222",
                run_id: "r",
                created_at: "t",
                watermark: &watermark,
                metrics: serde_json::json!({}),
            };
            publish_version(&store, &info, big).await
        })
    };
    // Stop the server once the new version's first object has landed.
    let first = server.data.path().join("models/outage/m/versions/20260102T000000Z-222222/part-0.bin");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !first.exists() {
        assert!(Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.stop();
    let started = Instant::now();
    let err = upload.await.unwrap().unwrap_err();
    let chain = format!("{err:#}");
    assert!(chain.contains("uploading m/versions/20260102T000000Z-222222/"), "{chain}");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded retries");

    server.restart();
    let latest = read_latest(&store, "m").await.unwrap().unwrap();
    assert_eq!(latest.version, "20260101T000000Z-111111", "latest.json still names the whole version");
    verify(&store, &read_manifest(&store, &latest.manifest, Some(&latest.manifest_sha256)).await.unwrap())
        .await
        .unwrap();
    assert!(
        !store.exists("m/versions/20260102T000000Z-222222/manifest.json").await.unwrap(),
        "no manifest for the partial version"
    );
}

/// The real binary trains straight into S3 (settings from the standard `AWS_*` variables) and what
/// it publishes verifies against its manifest.
#[tokio::test]
async fn train_publishes_a_whole_version_to_s3() {
    let server = S3Server::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_audotics-trainer"))
        .args(["train", "--no-progress", "--epochs", "2", "--batch-size", "32", "--embedding-size", "8"])
        .args(["--synthetic-tracks", "600", "--synthetic-users", "60", "--synthetic-interactions", "6000"])
        // A model trained for seconds: its quality floors are recorded, not enforced.
        .args(["--quality-floors", "false"])
        .args(["--output", "s3://models/e2e"])
        .envs([
            ("AWS_ENDPOINT", server.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", crate::s3::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", crate::s3::SECRET_KEY.into()),
            ("AUDOTICS_LOG_FORMAT", "json".into()),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("s3://models/e2e/content-based/versions/"), "{stdout}");
    let store = server.store("e2e");
    let latest = read_latest(&store, "content-based").await.unwrap().expect("latest.json");
    let manifest = read_manifest(&store, &latest.manifest, Some(&latest.manifest_sha256)).await.unwrap();
    let names: Vec<&str> = manifest.artifacts.iter().map(|a| a.name.as_str()).collect();
    for expected in [
        "weights.safetensors",
        "embeddings.safetensors",
        "content-based-model.keras",
        "tfjs/model.json",
        "tfjs/group1-shard1of1.bin",
        "MODEL_CARD.md",
        "training_curves.svg",
        "content-based-model-metadata.json",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    assert_eq!(
        manifest.artifacts.last().unwrap().name,
        "content-based-model-metadata.json",
        "metadata is the last artifact"
    );
    verify(&store, &manifest).await.unwrap();
    assert!(manifest.metrics["final"]["recall_at_10"].as_f64().is_some());
    assert_eq!(manifest.watermark.interactions, 6000);
}

/// The write that advances `latest.json` is conditional: a writer that read it, then stalled while
/// another wrote it (the fault suite caught a paused worker moving it back), is refused by the server.
#[tokio::test]
async fn a_write_conditioned_on_a_stale_read_is_refused() {
    let server = S3Server::start();
    let store = server.store("cas");
    let key = "m/latest.json";
    assert!(store.put_if_unchanged(key, Bytes::from_static(b"v1"), None).await.unwrap(), "created when absent");
    assert!(!store.put_if_unchanged(key, Bytes::from_static(b"v1'"), None).await.unwrap(), "not created twice");
    let (bytes, stale) = store.get_versioned(key).await.unwrap();
    assert_eq!(&bytes[..], b"v1");
    assert!(stale.is_some(), "S3 returns an entity tag");
    assert!(store.put_if_unchanged(key, Bytes::from_static(b"v2"), Some(stale.clone())).await.unwrap());
    assert!(
        !store.put_if_unchanged(key, Bytes::from_static(b"v3"), Some(stale)).await.unwrap(),
        "a write conditioned on the old entity tag must fail after v2"
    );
    assert_eq!(&store.get(key).await.unwrap()[..], b"v2");
}

/// `run.json` is written only as its writer read it: a worker that lost its run (paused past its
/// lease while another took the run over and pinned the data) cannot overwrite the new owner's
/// manifest on waking, and learns that it lost the run.
#[tokio::test]
async fn a_worker_that_lost_its_run_cannot_overwrite_the_new_owners_run_record() {
    use audotics_trainer::job::run_record::{DataSpec, MinimumSizes, PostgresSpec, RunRecord};
    use audotics_trainer::job::{load_run_record, save_run_record};
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        train: audotics_trainer::cli::train_args::TrainArgs,
    }
    let server = S3Server::start();
    let store = server.store("fence");
    let config = Flags::parse_from(["test"]).train.train_config();
    let spec = PostgresSpec {
        database: "postgres".into(),
        playlists: false,
        interactions_until_ms: None,
        tracks_until_ms: None,
    };
    let created = RunRecord::started_at(
        uuid::Uuid::now_v7(),
        chrono::Utc::now(),
        "content-based",
        config,
        DataSpec::Postgres(spec),
        MinimumSizes::default(),
        audotics_trainer::system::device::DeviceChoice::Cpu,
    );
    let run_id = created.run_id.clone();
    assert!(save_run_record(&store, &created, None).await.unwrap().is_some(), "created when absent");
    assert!(save_run_record(&store, &created, None).await.unwrap().is_none(), "never created twice");

    let pin = |m: &mut RunRecord, ms: i64| {
        let DataSpec::Postgres(spec) = &mut m.data else { unreachable!() };
        spec.interactions_until_ms = Some(ms);
        spec.tracks_until_ms = Some(ms);
    };
    let (mut stale_owner, stale_tag) = load_run_record(&store, "content-based", &run_id).await.unwrap();
    let (mut new_owner, new_tag) = load_run_record(&store, "content-based", &run_id).await.unwrap();
    pin(&mut new_owner, 2_000);
    assert!(save_run_record(&store, &new_owner, Some(new_tag)).await.unwrap().is_some());
    pin(&mut stale_owner, 1_000);
    assert!(
        save_run_record(&store, &stale_owner, Some(stale_tag)).await.unwrap().is_none(),
        "the stale owner's write must be refused"
    );
    let (stored, _) = load_run_record(&store, "content-based", &run_id).await.unwrap();
    assert_eq!(stored, new_owner, "the new owner's pin stands");
}
