//! audotics-trainer: keeps the Audotics content-based track embedding model fresh.
//!
//! # Layout
//! - [`cli`]: flags and environment variables → a [`job::TrainJob`]; `main.rs` only calls it.
//! - [`job`]: one training run end to end (new or resumed), training kept off the async runtime.
//! - [`features`]: the 11 audio features, their order and ranges, and z-score standardisation.
//! - [`data`]: the catalogue and listening history in compact interned form; [`data::synthetic`]
//!   generates the embedded default dataset.
//! - [`pairs`]: co-listening pair mining (user → tracks index, held-out split, per-epoch sampling).
//! - [`model`], [`loss`], [`optim`]: the encoder, its objectives and Adam, on candle.
//! - [`train`]: the synchronous training loop; [`eval`]: Recall@10 / NDCG@10 and baselines.
//! - [`checkpoint`]: per-epoch safetensors checkpoints for exact resume.
//! - [`artifacts`]: weights, embeddings and metadata of a version; [`export`]: Keras 3, TF.js and the
//!   model card; [`storage`]: the model store (local or S3) and atomic publication.
//! - [`db`]: Postgres — the platform's data (binary COPY), the trainer's schema and run ledger;
//!   [`seed`] loads demo data into the platform's tables.
//! - [`worker`]: the retrain worker (RabbitMQ in, model-ready out) and [`broker`], its RabbitMQ
//!   client and topology; [`db::coord`] holds its Postgres coordination (requests, leases, outbox).
//! - [`ops`]: operator commands — `rollback` and `replay-dead-letters`.
//! - [`device`], [`telemetry`], [`procstat`], [`bench`]: device choice, logging, `/proc` readings,
//!   and the throughput benchmark; [`resources`]: a run's memory estimate and the process's budget.

pub mod artifacts;
pub mod bench;
pub mod bench_load;
pub mod broker;
pub mod chaos;
pub mod checkpoint;
pub mod cli;
pub mod cpu_step;
pub mod data;
pub mod db;
pub mod device;
pub mod eval;
pub mod export;
pub mod features;
pub mod job;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod pairs;
pub mod procstat;
pub mod resources;
pub mod seed;
pub mod signals;
pub mod spotify;
pub mod storage;
pub mod telemetry;
pub mod train;
pub mod worker;
