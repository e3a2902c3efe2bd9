//! The model store: where checkpoints and versioned artifacts go, through `object_store`.
//!
//! `--output` / `MODEL_STORE_URL` names it: a bare path or `file://` URL is a local directory
//! (created if missing). Keys are relative to the store's root and use `/`.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid model store location {location:?}: {reason}")]
    InvalidLocation { location: String, reason: String },
    #[error("object {key} not found in the model store")]
    NotFound { key: String },
    #[error("model store operation on {key} failed")]
    Backend {
        key: String,
        #[source]
        source: object_store::Error,
    },
}

/// A handle on the store plus the URL that names its root (for logs, metadata and events).
#[derive(Clone)]
pub struct ModelStore {
    store: Arc<dyn ObjectStore>,
    root_url: String,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore").field("root_url", &self.root_url).finish()
    }
}

impl ModelStore {
    /// Opens the store named by `location`: a bare path or a `file://` URL.
    pub fn open(location: &str) -> Result<Self, StoreError> {
        let invalid =
            |reason: &str| StoreError::InvalidLocation { location: location.to_string(), reason: reason.to_string() };
        if location.trim().is_empty() {
            return Err(invalid("empty"));
        }
        let dir: PathBuf = match Url::parse(location) {
            Ok(url) if url.scheme() == "file" => url.to_file_path().map_err(|_| invalid("not a valid file:// URL"))?,
            Ok(url) if url.scheme().len() > 1 => {
                return Err(invalid(&format!("unsupported scheme {}:// (use a path or file://)", url.scheme())));
            }
            // No scheme, or a one-letter "scheme" that is really a Windows drive: a path.
            _ => PathBuf::from(location),
        };
        std::fs::create_dir_all(&dir).map_err(|e| invalid(&format!("cannot create directory: {e}")))?;
        let dir = dir.canonicalize().map_err(|e| invalid(&e.to_string()))?;
        let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| invalid(&e.to_string()))?;
        let root_url = Url::from_directory_path(&dir).map_err(|_| invalid("not an absolute directory"))?.to_string();
        Ok(Self { store: Arc::new(store), root_url })
    }

    /// The full URL of `key` (e.g. `file:///…/models/content-based/versions/…/weights.safetensors`).
    pub fn url_of(&self, key: &str) -> String {
        format!("{}{}", self.root_url, key)
    }

    pub fn root_url(&self) -> &str {
        &self.root_url
    }

    /// Writes `bytes` at `key`, replacing any object there. The local store writes a temporary file
    /// and renames it, so a reader (or a resumed run) never sees a torn object.
    pub async fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let payload = PutPayload::from_bytes(bytes.into());
        self.store.put(&Path::from(key), payload).await.map(|_| ()).map_err(|source| backend(key, source))
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self.store.get(&Path::from(key)).await.map_err(|source| backend(key, source))?;
        result.bytes().await.map_err(|source| backend(key, source))
    }

    /// Keys of the objects under `prefix` (recursively), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = Path::from(prefix);
        let mut keys: Vec<String> = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .map_err(|source| backend(prefix.as_ref(), source))?;
        keys.sort();
        Ok(keys)
    }
}

fn backend(key: &str, source: object_store::Error) -> StoreError {
    match source {
        object_store::Error::NotFound { .. } => StoreError::NotFound { key: key.to_string() },
        source => StoreError::Backend { key: key.to_string(), source },
    }
}

/// Where each object of a model lives, relative to the store root.
pub mod layout {
    /// The metadata file name the platform already uses.
    pub const METADATA: &str = "content-based-model-metadata.json";
    pub const WEIGHTS: &str = "weights.safetensors";
    pub const EMBEDDINGS: &str = "embeddings.safetensors";
    pub const RUN_MANIFEST: &str = "run.json";

    pub fn version_dir(model: &str, version: &str) -> String {
        format!("{model}/versions/{version}")
    }

    pub fn version_object(model: &str, version: &str, name: &str) -> String {
        format!("{}/{name}", version_dir(model, version))
    }

    pub fn run_dir(model: &str, run_id: &str) -> String {
        format!("{model}/runs/{run_id}")
    }

    pub fn run_manifest(model: &str, run_id: &str) -> String {
        format!("{}/{RUN_MANIFEST}", run_dir(model, run_id))
    }

    pub fn checkpoints_dir(model: &str, run_id: &str) -> String {
        format!("{}/checkpoints", run_dir(model, run_id))
    }

    pub fn checkpoint(model: &str, run_id: &str, epoch: usize) -> String {
        format!("{}/{}", checkpoints_dir(model, run_id), crate::checkpoint::file_name(epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_round_trips_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path().join("nested/models").to_str().unwrap()).unwrap();
        store.put("m/runs/r/checkpoints/epoch-0002.safetensors", b"two".to_vec()).await.unwrap();
        store.put("m/runs/r/checkpoints/epoch-0001.safetensors", b"one".to_vec()).await.unwrap();
        assert_eq!(store.get("m/runs/r/checkpoints/epoch-0001.safetensors").await.unwrap().as_ref(), b"one");
        let keys = store.list("m/runs/r/checkpoints").await.unwrap();
        assert_eq!(
            keys,
            vec!["m/runs/r/checkpoints/epoch-0001.safetensors", "m/runs/r/checkpoints/epoch-0002.safetensors"]
        );
        assert!(matches!(store.get("m/absent").await, Err(StoreError::NotFound { .. })));
        assert!(store.url_of("m/x").starts_with("file:///") && store.url_of("m/x").ends_with("/nested/models/m/x"));
    }

    #[test]
    fn file_urls_and_paths_open_other_schemes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let url = Url::from_directory_path(dir.path()).unwrap().to_string();
        assert!(ModelStore::open(&url).is_ok());
        let err = ModelStore::open("ftp://example.com/models").unwrap_err().to_string();
        assert!(err.contains("unsupported scheme ftp://"), "{err}");
        assert!(ModelStore::open("").is_err());
    }
}
