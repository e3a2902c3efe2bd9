//! The train stage: from a [`crate::data::Dataset`] to trained weights and their held-out scores.
//! Synchronous and CPU/GPU bound — callers run it off the async runtime. It may use [`crate::data`]
//! and [`crate::system`], never the database, the broker or the store.
//!
//! From the bottom up:
//! - [`host`]: copies between tensors and host memory, and fallible allocation;
//! - [`model`]: the model kinds (content, collaborative, hybrid), their parameters, embedding tables,
//!   vocabularies and dropout;
//! - [`loss`], [`optim`]: the objectives and Adam; [`cpu_step`]: the fused CPU training step;
//! - [`pairs`]: co-listening pair mining, the held-out split and per-epoch sampling;
//! - [`eval`]: Recall@10 / NDCG@10 with standard errors, and the baselines;
//! - [`neighbours`]: each track's exact top-K most similar tracks (the version's neighbour table);
//! - [`trainer`]: the loop (epochs, early stopping, the best epoch) and its observer hooks;
//! - [`checkpoint`]: per-epoch safetensors checkpoints for exact resume;
//! - [`resources`]: a run's peak-memory estimate and the process's memory budget;
//! - [`warm`]: starting a run from a published version's weights (warm start).

pub mod checkpoint;
pub mod cpu_step;
pub mod eval;
pub mod host;
pub mod loss;
pub mod model;
pub mod neighbours;
pub mod optim;
pub mod pairs;
pub mod resources;
pub mod trainer;
pub mod warm;
