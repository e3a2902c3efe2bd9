//! Publishing a version so that no reader ever sees it half-written:
//!
//! 1. every artifact is created immutably under `<model>/versions/<version>/`;
//! 2. then `manifest.json`, listing each artifact's key, size and sha256 (plus the version, the
//!    data watermark and the headline metrics) — its presence means the version is whole;
//! 3. then `<model>/latest.json` (version, manifest key, manifest sha256) is replaced.
//!
//! A reader that follows `latest.json` therefore always finds a manifest, and can check every file
//! against it ([`verify`]). Retention ([`apply_retention`]) deletes old versions manifest-first, so a
//! version is either whole or invisible.

use std::collections::BTreeMap;

use anyhow::Context;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::layout;
use super::store::{ModelStore, StoreError};
use crate::data::Watermark;

/// One artifact of a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub name: String,
    pub key: String,
    pub size: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub model: String,
    pub version: String,
    pub run_id: String,
    pub created_at: String,
    pub artifacts: Vec<ManifestEntry>,
    pub watermark: Watermark,
    pub metrics: serde_json::Value,
}

/// `latest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    pub model: String,
    pub version: String,
    pub manifest: String,
    pub manifest_sha256: String,
    pub updated_at: String,
}

/// What [`publish_version`] wrote.
#[derive(Debug, Clone)]
pub struct PublishedVersion {
    pub manifest_key: String,
    pub manifest_sha256: String,
    /// Artifact name → full URL (`manifest` included).
    pub urls: BTreeMap<String, String>,
    /// Whether `latest.json` now names this version (false when a newer one was already there).
    pub is_latest: bool,
    /// The version was already whole (another execution of the same run published it, e.g. a
    /// worker that lost its lease while paused): its objects were kept, not rewritten.
    pub adopted: bool,
}

/// Hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The identity and headline facts the manifest carries besides the files.
pub struct VersionInfo<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub run_id: &'a str,
    pub created_at: &'a str,
    pub watermark: &'a Watermark,
    pub metrics: serde_json::Value,
}

/// Writes `files` (name → bytes, in order), the manifest, then `latest.json`. Safe to repeat after a
/// failure part-way: identical objects already there count as written.
pub async fn publish_version(
    store: &ModelStore,
    info: &VersionInfo<'_>,
    files: Vec<(String, Bytes)>,
) -> anyhow::Result<PublishedVersion> {
    let manifest_key = layout::version_object(info.model, info.version, layout::MANIFEST);
    if store.exists(&manifest_key).await? {
        return adopt(store, info, &manifest_key).await;
    }
    let mut entries = Vec::with_capacity(files.len());
    let mut urls = BTreeMap::new();
    for (name, bytes) in files {
        let key = layout::version_object(info.model, info.version, &name);
        store.put_immutable(&key, bytes.clone()).await.with_context(|| format!("uploading {key}"))?;
        urls.insert(name.clone(), store.url_of(&key));
        entries.push(ManifestEntry { name, key, size: bytes.len() as u64, sha256: sha256_hex(&bytes) });
    }
    let manifest = Manifest {
        model: info.model.to_string(),
        version: info.version.to_string(),
        run_id: info.run_id.to_string(),
        created_at: info.created_at.to_string(),
        artifacts: entries,
        watermark: info.watermark.clone(),
        metrics: info.metrics.clone(),
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)?;
    let manifest_sha256 = sha256_hex(&manifest_bytes);
    store.put_immutable(&manifest_key, manifest_bytes).await.with_context(|| format!("uploading {manifest_key}"))?;
    urls.insert("manifest".to_string(), store.url_of(&manifest_key));

    let is_latest = advance_latest(store, info, &manifest_key, &manifest_sha256).await?;
    info!(manifest = %store.url_of(&manifest_key), is_latest, "version published");
    Ok(PublishedVersion { manifest_key, manifest_sha256, urls, is_latest, adopted: false })
}

/// The version is already whole: check that it is this run's and intact, then make sure
/// `latest.json` has moved to it (the other execution may have stopped right before that).
async fn adopt(store: &ModelStore, info: &VersionInfo<'_>, manifest_key: &str) -> anyhow::Result<PublishedVersion> {
    let bytes = store.get(manifest_key).await?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).with_context(|| format!("{manifest_key} is not a valid manifest"))?;
    anyhow::ensure!(
        manifest.run_id == info.run_id,
        "version {} already exists, published by run {}, not {}",
        info.version,
        manifest.run_id,
        info.run_id
    );
    verify(store, &manifest).await.context("the version already published by this run is damaged")?;
    let manifest_sha256 = sha256_hex(&bytes);
    let mut urls: BTreeMap<String, String> =
        manifest.artifacts.iter().map(|e| (e.name.clone(), store.url_of(&e.key))).collect();
    urls.insert("manifest".to_string(), store.url_of(manifest_key));
    let is_latest = advance_latest(store, info, manifest_key, &manifest_sha256).await?;
    warn!(manifest = %store.url_of(manifest_key), is_latest, "version already published by another execution of this run; adopted it");
    Ok(PublishedVersion { manifest_key: manifest_key.to_string(), manifest_sha256, urls, is_latest, adopted: true })
}

/// Points `latest.json` at the version unless a newer one is already there; returns whether it
/// names this version now.
async fn advance_latest(
    store: &ModelStore,
    info: &VersionInfo<'_>,
    manifest_key: &str,
    manifest_sha256: &str,
) -> anyhow::Result<bool> {
    // latest.json only moves forward (versions sort by creation time); rolling back is an explicit
    // operator action, not a side effect of a late publish. Read, compare, then write only if
    // latest.json is still what was read: a worker paused between the two (the fault suite's
    // SIGSTOP) once moved it back over a newer version.
    const ATTEMPTS: usize = 10;
    let key = layout::latest(info.model);
    for _ in 0..ATTEMPTS {
        let read = match store.get_versioned(&key).await {
            Ok((bytes, e_tag)) => {
                Some((serde_json::from_slice::<Latest>(&bytes).context("latest.json is not valid")?, e_tag))
            }
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e).context("reading latest.json"),
        };
        match &read {
            Some((latest, _)) if latest.version.as_str() > info.version => {
                warn!(newer = %latest.version, "a newer version is already latest; leaving latest.json alone");
                return Ok(false);
            }
            Some((latest, _)) if latest.version == info.version => return Ok(true),
            _ => {}
        }
        let bytes = latest_json(info.model, info.version, manifest_key, manifest_sha256)?;
        if store.put_if_unchanged(&key, bytes, read.map(|(_, e_tag)| e_tag)).await.context("writing latest.json")? {
            return Ok(true);
        }
        warn!("latest.json changed between its read and its write; comparing again");
    }
    anyhow::bail!("latest.json changed under every one of {ATTEMPTS} attempts to advance it")
}

/// Points `<model>/latest.json` at a version whose manifest exists.
pub async fn write_latest(
    store: &ModelStore,
    model: &str,
    version: &str,
    manifest_key: &str,
    manifest_sha256: &str,
) -> anyhow::Result<()> {
    let bytes = latest_json(model, version, manifest_key, manifest_sha256)?;
    store.put(&layout::latest(model), bytes).await.context("writing latest.json")?;
    Ok(())
}

fn latest_json(model: &str, version: &str, manifest_key: &str, manifest_sha256: &str) -> anyhow::Result<Bytes> {
    let latest = Latest {
        model: model.to_string(),
        version: version.to_string(),
        manifest: manifest_key.to_string(),
        manifest_sha256: manifest_sha256.to_string(),
        updated_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
    };
    Ok(Bytes::from(serde_json::to_vec_pretty(&latest)?))
}

/// `<model>/latest.json`, if any.
pub async fn read_latest(store: &ModelStore, model: &str) -> anyhow::Result<Option<Latest>> {
    match store.get(&layout::latest(model)).await {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("latest.json is not valid")?)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e).context("reading latest.json"),
    }
}

/// Reads a manifest and checks it against `expected_sha256` (from `latest.json`).
pub async fn read_manifest(store: &ModelStore, key: &str, expected_sha256: Option<&str>) -> anyhow::Result<Manifest> {
    let bytes = store.get(key).await.with_context(|| format!("reading {key}"))?;
    if let Some(expected) = expected_sha256 {
        anyhow::ensure!(sha256_hex(&bytes) == expected, "{key} does not match the sha256 in latest.json");
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{key} is not a valid manifest"))
}

/// Checks every artifact of `manifest` against its size and sha256; names the first that differs.
pub async fn verify(store: &ModelStore, manifest: &Manifest) -> anyhow::Result<()> {
    for entry in &manifest.artifacts {
        let bytes = store.get(&entry.key).await.with_context(|| format!("reading {}", entry.key))?;
        anyhow::ensure!(
            bytes.len() as u64 == entry.size,
            "{} has {} bytes, the manifest says {}",
            entry.key,
            bytes.len(),
            entry.size
        );
        anyhow::ensure!(
            sha256_hex(&bytes) == entry.sha256,
            "{} does not match its sha256 in the manifest (corrupted)",
            entry.key
        );
    }
    Ok(())
}

/// What retention removed.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct RetentionReport {
    pub versions_deleted: Vec<String>,
    pub checkpoint_runs_cleaned: Vec<String>,
}

/// The version whose run trained `version`'s weights, and its metadata: `version` itself, or for a
/// refresh (which trains nothing and keeps its parent's weights) its nearest trained ancestor.
pub async fn trained_version(
    store: &ModelStore,
    model: &str,
    version: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let mut version = version.to_string();
    let mut seen = std::collections::HashSet::new();
    loop {
        // A parent is always an older version; a loop means damaged metadata, not a long lineage.
        anyhow::ensure!(seen.insert(version.clone()), "version {version}'s lineage of refreshes loops");
        let bytes = store.get(&layout::version_object(model, &version, layout::METADATA)).await?;
        let metadata: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("version {version}'s metadata"))?;
        if metadata["lineage"]["mode"] != "refresh" {
            return Ok((version, metadata));
        }
        version = metadata["lineage"]["parent_version"]
            .as_str()
            .with_context(|| format!("refresh version {version} names no parent"))?
            .to_string();
    }
}

/// Keeps the newest `keep` versions (never the one `latest.json` names, nor any newer one, which
/// may still be publishing) and deletes the others, manifest first. Deletes the checkpoints of
/// finished runs (whose version has a manifest) except the newest run's and the one that trained
/// the latest version's weights (a warm start may carry its optimiser state over).
pub async fn apply_retention(store: &ModelStore, model: &str, keep: usize) -> anyhow::Result<RetentionReport> {
    let mut report = RetentionReport::default();
    let latest = read_latest(store, model).await?;
    let Some(latest) = latest else { return Ok(report) };
    let latest_weights_run = match trained_version(store, model, &latest.version).await {
        Ok((_, metadata)) => metadata["run_id"].as_str().map(str::to_string),
        Err(e) => {
            warn!(error.message = %format!("{e:#}"), "cannot tell which run trained the latest version");
            None
        }
    };
    // Checkpoints first: a finished run is recognised by its version's manifest, which version
    // retention may delete.
    let runs = child_names(&store.list(&layout::runs_dir(model)).await?, &layout::runs_dir(model));
    for run_id in runs.iter().take(runs.len().saturating_sub(1)) {
        if latest_weights_run.as_deref() == Some(run_id.as_str()) {
            continue;
        }
        let checkpoints = store.list(&layout::checkpoints_dir(model, run_id)).await?;
        if checkpoints.is_empty() {
            continue;
        }
        let Ok(bytes) = store.get(&layout::run_record(model, run_id)).await else { continue };
        let Ok(run) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        let Some(version) = run["version"].as_str() else { continue };
        if store.exists(&layout::version_object(model, version, layout::MANIFEST)).await? {
            for key in checkpoints {
                store.delete(&key).await?;
            }
            report.checkpoint_runs_cleaned.push(run_id.clone());
        }
    }
    let versions = child_names(&store.list(&layout::versions_dir(model)).await?, &layout::versions_dir(model));
    let keep_from = versions.len().saturating_sub(keep.max(1));
    for (i, version) in versions.iter().enumerate() {
        if i >= keep_from || version.as_str() >= latest.version.as_str() {
            continue;
        }
        let dir = layout::version_dir(model, version);
        store.delete(&layout::version_object(model, version, layout::MANIFEST)).await?;
        for key in store.list(&dir).await? {
            store.delete(&key).await?;
        }
        report.versions_deleted.push(version.clone());
    }
    if !report.versions_deleted.is_empty() || !report.checkpoint_runs_cleaned.is_empty() {
        info!(?report, "retention applied");
    }
    Ok(report)
}

/// The distinct first path segments below `parent` among `keys`, sorted.
fn child_names(keys: &[String], parent: &str) -> Vec<String> {
    let mut names: Vec<String> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(parent)?.strip_prefix('/')?.split('/').next().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Deletes all but the newest `keep` checkpoints of a run (by position) and, when given, the end of
/// epoch `best` (the weights the run will publish); returns how many went.
pub async fn prune_checkpoints(
    store: &ModelStore,
    model: &str,
    run_id: &str,
    keep: usize,
    best: Option<usize>,
) -> anyhow::Result<usize> {
    let mut checkpoints: Vec<((usize, usize), String)> = store
        .list(&layout::checkpoints_dir(model, run_id))
        .await?
        .into_iter()
        .filter_map(|k| Some((crate::training::checkpoint::position_of(k.rsplit('/').next()?)?, k)))
        .collect();
    checkpoints.sort();
    let excess = checkpoints.len().saturating_sub(keep);
    let mut deleted = 0;
    for (position, key) in checkpoints.into_iter().take(excess) {
        if best.is_none_or(|epoch| position != (epoch, 0)) {
            store.delete(&key).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}
