//! The publish stage: from trained weights to an immutable version in the model store.
//! It may use [`crate::training`] (the metadata it records), [`crate::data`] and [`crate::system`];
//! never the broker or the worker's coordination.
//!
//! - [`gate`]: whether a version may replace the current one (floors, lift, tolerance);
//! - [`artifacts`]: a version's files in memory — weights, embeddings, metadata;
//! - [`export`]: Keras 3 `.keras`, TF.js Layers and the model card;
//! - [`store`]: the object store (local directory or S3), with retries and typed errors;
//! - [`layout`]: where every object lives; [`versions`]: atomic publication (`manifest.json`, then
//!   `latest.json`), verification, rollback's checks and retention.

pub mod artifacts;
pub mod export;
pub mod gate;
pub mod layout;
pub mod lineage;
pub mod store;
pub mod versions;
