//! One suite, two stores: every check runs against the local filesystem and against S3.

use bytes::Bytes;

use audotics_trainer::data::Watermark;
use audotics_trainer::publish::versions::{
    VersionInfo, apply_retention, publish_version, read_latest, read_manifest, trained_version, verify,
};
use audotics_trainer::publish::{
    layout,
    store::{ModelStore, StoreError},
};

use crate::s3::{S3Server, fast_retry};

fn local() -> (tempfile::TempDir, ModelStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open_with(dir.path().to_str().unwrap(), fast_retry()).unwrap();
    (dir, store)
}

/// Deterministic pseudo-random bytes.
fn blob(len: usize, seed: u8) -> Bytes {
    let mut x = seed as u32 | 1;
    Bytes::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

fn files(seed: u8) -> Vec<(String, Bytes)> {
    [
        "weights.safetensors",
        "embeddings.safetensors",
        "content-based-model.keras",
        "tfjs/model.json",
        "MODEL_CARD.md",
        "content-based-model-metadata.json",
    ]
    .iter()
    .enumerate()
    .map(|(i, n)| (n.to_string(), blob(1000 + 97 * i, seed.wrapping_add(i as u8))))
    .collect()
}

async fn publish(
    store: &ModelStore,
    version: &str,
    files: Vec<(String, Bytes)>,
) -> anyhow::Result<audotics_trainer::publish::versions::PublishedVersion> {
    publish_as(store, "run", version, files).await
}

async fn publish_as(
    store: &ModelStore,
    run_id: &str,
    version: &str,
    files: Vec<(String, Bytes)>,
) -> anyhow::Result<audotics_trainer::publish::versions::PublishedVersion> {
    let watermark = Watermark {
        newest_interaction_at: Some("2026-01-01T00:00:00.000Z".into()),
        newest_interaction_ms: Some(1_767_225_600_000),
        interactions: 5,
        newest_track_created_ms: None,
    };
    let info = VersionInfo {
        model: "m",
        version,
        run_id,
        created_at: "2026-01-01T00:00:00",
        watermark: &watermark,
        metrics: serde_json::json!({"recall_at_10": 0.1}),
    };
    publish_version(store, &info, files).await
}

async fn round_trip(store: &ModelStore) {
    let files = files(1);
    let published = publish(store, "20260101T000000Z-aaaaaa", files.clone()).await.unwrap();
    for (name, bytes) in &files {
        let got = store.get(&layout::version_object("m", "20260101T000000Z-aaaaaa", name)).await.unwrap();
        assert_eq!(&got, bytes, "{name}");
        assert!(published.urls[name].ends_with(&format!("m/versions/20260101T000000Z-aaaaaa/{name}")));
    }
    let latest = read_latest(store, "m").await.unwrap().unwrap();
    assert_eq!(latest.version, "20260101T000000Z-aaaaaa");
    let manifest = read_manifest(store, &latest.manifest, Some(&latest.manifest_sha256)).await.unwrap();
    assert_eq!(manifest.artifacts.len(), files.len());
    assert_eq!(manifest.watermark.interactions, 5);
    verify(store, &manifest).await.unwrap();
}

async fn multipart(store: &ModelStore) {
    let big = blob(20 << 20, 7); // three parts of 8 MiB
    store.put_immutable("m/big.bin", big.clone()).await.unwrap();
    assert_eq!(store.get("m/big.bin").await.unwrap(), big);
    // Immutable too: the same bytes again are fine, other bytes are refused.
    store.put_immutable("m/big.bin", big.clone()).await.unwrap();
    let other = blob(20 << 20, 8);
    assert!(matches!(store.put_immutable("m/big.bin", other).await, Err(StoreError::Conflict { .. })));
}

async fn immutability(store: &ModelStore) {
    store.put_immutable("m/versions/v/a", Bytes::from_static(b"one")).await.unwrap();
    store.put_immutable("m/versions/v/a", Bytes::from_static(b"one")).await.expect("an identical retry counts as done");
    let err = store.put_immutable("m/versions/v/a", Bytes::from_static(b"two")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("immutable"), "{err}");
    assert_eq!(store.get("m/versions/v/a").await.unwrap().as_ref(), b"one");
    // A whole version published twice (a retried publish) is fine.
    assert!(!publish(store, "20260101T000000Z-bbbbbb", files(3)).await.unwrap().adopted);
    assert!(publish(store, "20260101T000000Z-bbbbbb", files(3)).await.unwrap().adopted);
    // Another execution of the same run (a worker that lost its lease while paused) with other
    // bytes adopts the whole version and changes nothing in it…
    assert!(publish(store, "20260101T000000Z-bbbbbb", files(4)).await.unwrap().adopted);
    let key = layout::version_object("m", "20260101T000000Z-bbbbbb", "weights.safetensors");
    assert_eq!(store.get(&key).await.unwrap(), files(3)[0].1);
    // …but another run cannot claim it, and other bytes under a version without a manifest (a
    // half-written one) are refused object by object.
    let err = publish_as(store, "other-run", "20260101T000000Z-bbbbbb", files(3)).await.unwrap_err();
    assert!(err.to_string().contains("published by run run"), "{err}");
    store
        .put_immutable(
            &layout::version_object("m", "20260101T000000Z-cccccc", "weights.safetensors"),
            files(5)[0].1.clone(),
        )
        .await
        .unwrap();
    assert!(
        publish(store, "20260101T000000Z-cccccc", files(6)).await.is_err(),
        "different content under a half-written version"
    );
}

/// A reader polling `latest.json` while versions are published never finds one without its manifest.
async fn latest_is_written_last(store: &ModelStore) {
    publish(store, "20260101T000000Z-000000", files(9)).await.unwrap();
    let reader_store = store.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_reader = stop.clone();
    let reader = tokio::spawn(async move {
        let mut checks = 0u32;
        while !stop_reader.load(std::sync::atomic::Ordering::SeqCst) {
            let latest =
                read_latest(&reader_store, "m").await.unwrap().expect("latest.json exists from the first publish on");
            let manifest = read_manifest(&reader_store, &latest.manifest, Some(&latest.manifest_sha256))
                .await
                .expect("latest.json named a version without its manifest");
            verify(&reader_store, &manifest).await.expect("a version named by latest.json is whole");
            checks += 1;
        }
        checks
    });
    for i in 1..=5u8 {
        let mut f = files(10 + i);
        f.push(("large.bin".into(), blob(3 << 20, i)));
        publish(store, &format!("20260101T00000{i}Z-000000"), f).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let checks = reader.await.unwrap();
    assert!(checks > 0, "the reader ran");
    assert_eq!(read_latest(store, "m").await.unwrap().unwrap().version, "20260101T000005Z-000000");
}

async fn retention(store: &ModelStore) {
    for i in 1..=4u8 {
        publish(store, &format!("2026010{i}T000000Z-cccccc"), files(20 + i)).await.unwrap();
        let run = format!("0190000{i}-0000-7000-8000-000000000000");
        store
            .put(
                &layout::run_record("m", &run),
                serde_json::to_vec(&serde_json::json!({"version": format!("2026010{i}T000000Z-cccccc")})).unwrap(),
            )
            .await
            .unwrap();
        store.put(&layout::checkpoint("m", &run, 1), Bytes::from_static(b"ckpt")).await.unwrap();
    }
    // An unfinished run (its version has no manifest) keeps its checkpoints.
    let unfinished = "01900000-0000-7000-8000-000000000000";
    store
        .put(
            &layout::run_record("m", unfinished),
            serde_json::to_vec(&serde_json::json!({"version": "20251231T000000Z-dddddd"})).unwrap(),
        )
        .await
        .unwrap();
    store.put(&layout::checkpoint("m", unfinished, 3), Bytes::from_static(b"ckpt")).await.unwrap();

    let report = apply_retention(store, "m", 2).await.unwrap();
    assert_eq!(report.versions_deleted, ["20260101T000000Z-cccccc", "20260102T000000Z-cccccc"]);
    let remaining: Vec<String> = store.list("m/versions").await.unwrap();
    assert!(remaining.iter().all(|k| k.contains("20260103") || k.contains("20260104")), "{remaining:?}");
    assert_eq!(read_latest(store, "m").await.unwrap().unwrap().version, "20260104T000000Z-cccccc");
    // Checkpoints: finished runs lose theirs, except the newest run; the unfinished run keeps its.
    assert_eq!(report.checkpoint_runs_cleaned.len(), 3);
    assert!(store.exists(&layout::checkpoint("m", "01900004-0000-7000-8000-000000000000", 1)).await.unwrap());
    assert!(!store.exists(&layout::checkpoint("m", "01900001-0000-7000-8000-000000000000", 1)).await.unwrap());
    assert!(store.exists(&layout::checkpoint("m", unfinished, 3)).await.unwrap());
    // Never the version latest.json names, even with keep 0 (treated as 1).
    apply_retention(store, "m", 0).await.unwrap();
    let latest = read_latest(store, "m").await.unwrap().unwrap();
    verify(store, &read_manifest(store, &latest.manifest, Some(&latest.manifest_sha256)).await.unwrap()).await.unwrap();
}

/// A version's files whose metadata names the run that published it and, for a refresh, its parent.
fn files_of_run(seed: u8, run_id: &str, refresh_of: Option<&str>) -> Vec<(String, Bytes)> {
    let lineage = refresh_of.map(|parent| serde_json::json!({"mode": "refresh", "parent_version": parent}));
    let metadata = serde_json::json!({"run_id": run_id, "best_epoch": 1, "lineage": lineage});
    let mut f: Vec<_> = files(seed).into_iter().filter(|(n, _)| n != "content-based-model-metadata.json").collect();
    f.push(("content-based-model-metadata.json".into(), Bytes::from(serde_json::to_vec(&metadata).unwrap())));
    f
}

async fn retention_keeps_the_run_behind_a_refreshed_latest(store: &ModelStore) {
    // v1 and v2 trained by runs 1 and 2; v3 a refresh of v2 (run 3, no checkpoints); v4 a refresh of
    // v3. The latest's weights are run 2's: its checkpoints stay, run 1's go.
    let run = |i: u8| format!("0190000{i}-0000-7000-8000-000000000000");
    let version = |i: u8| format!("2026010{i}T000000Z-ffffff");
    for i in 1..=4u8 {
        let refresh_of = (i >= 3).then(|| version(i - 1));
        publish(store, &version(i), files_of_run(40 + i, &run(i), refresh_of.as_deref())).await.unwrap();
        let record = serde_json::json!({"version": version(i)});
        store.put(&layout::run_record("m", &run(i)), serde_json::to_vec(&record).unwrap()).await.unwrap();
        if i <= 2 {
            store.put(&layout::checkpoint("m", &run(i), 1), Bytes::from_static(b"ckpt")).await.unwrap();
        }
    }
    let (trained, _) = trained_version(store, "m", &version(4)).await.unwrap();
    assert_eq!(trained, version(2));
    let report = apply_retention(store, "m", 10).await.unwrap();
    assert_eq!(report.checkpoint_runs_cleaned, [run(1)]);
    assert!(store.exists(&layout::checkpoint("m", &run(2), 1)).await.unwrap());
    assert!(!store.exists(&layout::checkpoint("m", &run(1), 1)).await.unwrap());
}

async fn corruption_is_caught(store: &ModelStore) {
    publish(store, "20260101T000000Z-eeeeee", files(30)).await.unwrap();
    let key = layout::version_object("m", "20260101T000000Z-eeeeee", "content-based-model.keras");
    let mut bytes = store.get(&key).await.unwrap().to_vec();
    bytes[10] ^= 0xFF;
    store.put(&key, bytes).await.unwrap(); // tampering behind the manifest's back
    let latest = read_latest(store, "m").await.unwrap().unwrap();
    let err = verify(store, &read_manifest(store, &latest.manifest, None).await.unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("content-based-model.keras does not match its sha256"), "{err}");
}

macro_rules! both_stores {
    ($($name:ident),*) => {
        mod local_store { $( #[tokio::test] async fn $name() { let (_dir, store) = super::local(); super::$name(&store).await; } )* }
        mod s3_store { $( #[tokio::test] async fn $name() { let server = super::S3Server::start(); super::$name(&server.store("conformance")).await; } )* }
    };
}

both_stores!(
    round_trip,
    multipart,
    immutability,
    latest_is_written_last,
    retention,
    retention_keeps_the_run_behind_a_refreshed_latest,
    corruption_is_caught
);
