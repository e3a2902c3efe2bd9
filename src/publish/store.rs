//! The model store: checkpoints and versioned artifacts, through `object_store`.
//!
//! `--output` / `MODEL_STORE_URL` names it: a bare path or `file://` URL is a local directory (created
//! if missing); `s3://bucket/prefix` is S3 or an S3-compatible server, configured from the standard
//! `AWS_*` variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_ALLOW_HTTP`, …). Keys are relative to the store's root and use `/`.
//!
//! - [`ModelStore::put_immutable`] creates an object that must never change (a version's files):
//!   a conditional create; a retry that finds its own identical object counts as done, a different
//!   object there is an error. Objects over 8 MiB go up as multipart uploads (which cannot be
//!   conditional, so they are checked with a `HEAD` first).
//! - [`ModelStore::put`] replaces (checkpoints, `run.json`, `latest.json`).
//! - Transient failures (network, server errors, timeouts) are retried with jittered exponential
//!   backoff (backon); permanent ones (bad credentials, missing bucket, conflicts) fail at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use url::Url;

/// Objects larger than this go up in parts of this size.
pub const MULTIPART_CHUNK: usize = 8 << 20;

/// Why the store could not be used; `is_transient` says whether retrying may help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid model store location {location:?}: {reason}")]
    InvalidLocation { location: String, reason: String },
    #[error("object {key} not found in the model store")]
    NotFound { key: String },
    #[error("object {key} already exists in the model store with different content (versions are immutable)")]
    Conflict { key: String },
    #[error(
        "the model store refused access to {key}: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    )]
    Denied {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("model store operation on {key} failed")]
    Backend {
        key: String,
        #[source]
        source: object_store::Error,
    },
}

impl StoreError {
    /// Network errors, timeouts and server errors: worth another try.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Backend { source, .. } => {
                matches!(source, object_store::Error::Generic { .. } | object_store::Error::JoinError { .. })
            }
            _ => false,
        }
    }
}

/// How hard to retry transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 6, min_delay: Duration::from_millis(200), max_delay: Duration::from_secs(10) }
    }
}

/// A handle on the store plus the URL that names its root (for logs, metadata and events).
#[derive(Clone)]
pub struct ModelStore {
    store: Arc<dyn ObjectStore>,
    root_url: String,
    retry: RetryPolicy,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore").field("root_url", &self.root_url).finish()
    }
}

impl ModelStore {
    /// Opens the store named by `location`: a path, a `file://` URL or `s3://bucket[/prefix]`.
    pub fn open(location: &str) -> Result<Self, StoreError> {
        Self::open_with(location, RetryPolicy::default())
    }

    pub fn open_with(location: &str, retry: RetryPolicy) -> Result<Self, StoreError> {
        let invalid =
            |reason: &str| StoreError::InvalidLocation { location: location.to_string(), reason: reason.to_string() };
        if location.trim().is_empty() {
            return Err(invalid("empty"));
        }
        let (store, root_url): (Arc<dyn ObjectStore>, String) = match Url::parse(location) {
            Ok(url) if url.scheme() == "s3" => s3(&url, location, &[])?,
            Ok(url) if url.scheme() == "file" => {
                local(&url.to_file_path().map_err(|_| invalid("not a valid file:// URL"))?, location)?
            }
            Ok(url) if url.scheme().len() > 1 => {
                return Err(invalid(&format!("unsupported scheme {}:// (use a path, file:// or s3://)", url.scheme())));
            }
            // No scheme, or a one-letter "scheme" that is really a Windows drive: a path.
            _ => local(&PathBuf::from(location), location)?,
        };
        Ok(Self { store, root_url, retry })
    }

    /// An `s3://bucket[/prefix]` store configured by explicit object_store S3 options
    /// (`aws_endpoint`, `aws_access_key_id`, …) on top of the `AWS_*` environment.
    pub fn open_s3_with(location: &str, options: &[(&str, String)], retry: RetryPolicy) -> Result<Self, StoreError> {
        let url = Url::parse(location)
            .map_err(|e| StoreError::InvalidLocation { location: location.to_string(), reason: e.to_string() })?;
        let (store, root_url) = s3(&url, location, options)?;
        Ok(Self { store, root_url, retry })
    }

    /// The full URL of `key` (`file:///…/content-based/latest.json`, `s3://models/…`).
    pub fn url_of(&self, key: &str) -> String {
        format!("{}{}", self.root_url, key)
    }

    pub fn root_url(&self) -> &str {
        &self.root_url
    }

    /// Writes `bytes` at `key`, replacing any object there (atomically: readers see the old or the
    /// new object, never a torn one).
    pub async fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let bytes = bytes.into();
        self.retrying(key, || async {
            let payload = PutPayload::from_bytes(bytes.clone());
            self.store.put(&Path::from(key), payload).await.map(|_| ()).map_err(|e| classify(key, e))
        })
        .await
    }

    /// Creates `key` with `bytes` unless it exists. An identical object already there (our own
    /// earlier attempt) is success; a different one is [`StoreError::Conflict`].
    pub async fn put_immutable(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let bytes = bytes.into();
        self.retrying(key, || async {
            if bytes.len() > MULTIPART_CHUNK {
                return self.put_immutable_multipart(key, &bytes).await;
            }
            let options = PutOptions { mode: PutMode::Create, ..Default::default() };
            match self.store.put_opts(&Path::from(key), PutPayload::from_bytes(bytes.clone()), options).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    self.same_as(key, &bytes).await
                }
                Err(e) => Err(classify(key, e)),
            }
        })
        .await
    }

    /// Reads `key` with its entity tag, for a later [`Self::put_if_unchanged`].
    pub async fn get_versioned(&self, key: &str) -> Result<(Bytes, Option<String>), StoreError> {
        self.retrying(key, || async {
            let result = self.store.get(&Path::from(key)).await.map_err(|e| classify(key, e))?;
            let e_tag = result.meta.e_tag.clone();
            Ok((result.bytes().await.map_err(|e| classify(key, e))?, e_tag))
        })
        .await
    }

    /// Writes `bytes` at `key` only if it is still as read: absent when `read` is `None`, else
    /// carrying the entity tag `read` (a conditional PUT: `If-None-Match: *` / `If-Match`). Returns
    /// false when someone wrote it in between. The check is the server's, at write time, so a
    /// writer paused between its read and its write cannot overwrite a newer object.
    ///
    /// A local filesystem store has no conditional overwrite (object_store's `PutMode::Update`):
    /// there, an existing object is overwritten without the check — one machine, no such race
    /// between separate workers in practice.
    pub async fn put_if_unchanged(
        &self,
        key: &str,
        bytes: Bytes,
        read: Option<Option<String>>,
    ) -> Result<bool, StoreError> {
        Ok(self.put_if_unchanged_tagged(key, bytes, read).await?.is_some())
    }

    /// [`Self::put_if_unchanged`], returning the written object's new entity tag (`Some(tag)`;
    /// the inner `None` where the store names none) for the next conditional write, or `None`
    /// when the write was refused.
    pub async fn put_if_unchanged_tagged(
        &self,
        key: &str,
        bytes: Bytes,
        read: Option<Option<String>>,
    ) -> Result<Option<Option<String>>, StoreError> {
        self.retrying(key, || async {
            let mode = match &read {
                None => PutMode::Create,
                Some(e_tag) => PutMode::Update(object_store::UpdateVersion { e_tag: e_tag.clone(), version: None }),
            };
            let options = PutOptions { mode, ..Default::default() };
            let path = Path::from(key);
            match self.store.put_opts(&path, PutPayload::from_bytes(bytes.clone()), options).await {
                Ok(written) => Ok(Some(written.e_tag)),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(None),
                Err(object_store::Error::NotImplemented { .. }) => {
                    let written = self
                        .store
                        .put(&path, PutPayload::from_bytes(bytes.clone()))
                        .await
                        .map_err(|e| classify(key, e))?;
                    Ok(Some(written.e_tag))
                }
                Err(e) => Err(classify(key, e)),
            }
        })
        .await
    }

    async fn put_immutable_multipart(&self, key: &str, bytes: &Bytes) -> Result<(), StoreError> {
        let path = Path::from(key);
        match self.store.head(&path).await {
            Ok(_) => return self.same_as(key, bytes).await,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(classify(key, e)),
        }
        let upload = self.store.put_multipart(&path).await.map_err(|e| classify(key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_CHUNK);
        writer.put(bytes.clone());
        writer.finish().await.map(|_| ()).map_err(|e| classify(key, e))
    }

    /// Ok when the object at `key` has exactly `bytes`.
    async fn same_as(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let existing = self.get_once(key).await?;
        if Sha256::digest(&existing) == Sha256::digest(bytes) {
            Ok(())
        } else {
            Err(StoreError::Conflict { key: key.to_string() })
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.retrying(key, || self.get_once(key)).await
    }

    async fn get_once(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self.store.get(&Path::from(key)).await.map_err(|e| classify(key, e))?;
        result.bytes().await.map_err(|e| classify(key, e))
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.retrying(key, || async {
            match self.store.head(&Path::from(key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(classify(key, e)),
            }
        })
        .await
    }

    /// Keys of the objects under `prefix` (recursively), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.retrying(prefix, || async {
            let p = Path::from(prefix);
            let mut keys: Vec<String> = self
                .store
                .list(Some(&p))
                .map_ok(|meta| meta.location.to_string())
                .try_collect()
                .await
                .map_err(|e| classify(prefix, e))?;
            keys.sort();
            Ok(keys)
        })
        .await
    }

    /// Deletes `key` (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.retrying(key, || async {
            match self.store.delete(&Path::from(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(classify(key, e)),
            }
        })
        .await
    }

    async fn retrying<T, F, Fut>(&self, key: &str, op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.attempts)
            .with_jitter();
        op.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(StoreError::is_transient)
            .notify(|e, delay| tracing::warn!(key, error.message = %e, error.cause_chain = %error_chain(e), ?delay, "model store operation failed; retrying"))
            .await
    }
}

fn s3(url: &Url, location: &str, options: &[(&str, String)]) -> Result<(Arc<dyn ObjectStore>, String), StoreError> {
    let invalid = |reason: String| StoreError::InvalidLocation { location: location.to_string(), reason };
    let bucket = url.host_str().ok_or_else(|| invalid("s3:// URL without a bucket".into()))?;
    // Retries are ours (backon, around whole operations); the client's own would stack on them.
    let client_retry = object_store::RetryConfig { max_retries: 0, ..Default::default() };
    let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(client_retry);
    for (key, value) in options {
        let key: object_store::aws::AmazonS3ConfigKey =
            key.parse().map_err(|e: object_store::Error| invalid(e.to_string()))?;
        builder = builder.with_config(key, value);
    }
    let s3 = builder.build().map_err(|e| invalid(e.to_string()))?;
    let prefix = url.path().trim_matches('/');
    let root = if prefix.is_empty() { format!("s3://{bucket}/") } else { format!("s3://{bucket}/{prefix}/") };
    Ok((Arc::new(PrefixStore::new(s3, prefix)), root))
}

fn local(dir: &std::path::Path, location: &str) -> Result<(Arc<dyn ObjectStore>, String), StoreError> {
    let invalid = |reason: String| StoreError::InvalidLocation { location: location.to_string(), reason };
    std::fs::create_dir_all(dir).map_err(|e| invalid(format!("cannot create directory: {e}")))?;
    let dir = dir.canonicalize().map_err(|e| invalid(e.to_string()))?;
    let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| invalid(e.to_string()))?;
    let root = Url::from_directory_path(&dir).map_err(|_| invalid("not an absolute directory".into()))?.to_string();
    Ok((Arc::new(store), root))
}

fn classify(key: &str, source: object_store::Error) -> StoreError {
    let key = key.to_string();
    match source {
        object_store::Error::NotFound { .. } => StoreError::NotFound { key },
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            StoreError::Denied { key, source }
        }
        source => StoreError::Backend { key, source },
    }
}

/// `e` and its sources, joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}
