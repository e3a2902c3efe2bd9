//! audotics-trainer: keeps the Audotics track embedding models fresh.
//!
//! # Layout — a request's path, from the bottom layer up
//! Each folder opens with what it owns and what it may call; imports point down this list, never up
//! and never in a circle (docs/ARCHITECTURE.md has the table; tests/layout.rs checks it).
//! - [`contract`]: the `retrain` request on the wire, parsed once for everyone; the model-key rule.
//! - [`system`]: logging, `/proc` readings, signals, the device.
//! - [`data`]: the catalogue and listening history in compact interned form, the audio features,
//!   the synthetic default dataset and the Spotify CSV.
//! - [`training`]: model kinds, losses, the fused CPU step, Adam, pair mining, evaluation, the loop,
//!   checkpoints, memory estimates; beside it [`db`]: Postgres — the platform's data (binary COPY),
//!   the trainer's schema, run ledger and the worker's coordination SQL (requests, leases, outbox);
//!   and [`broker`]: RabbitMQ.
//! - [`publish`]: the quality gate, a version's artifacts and export formats, the model store and
//!   atomic publication.
//! - [`job`]: one training run end to end (new or resumed): load, train off the async runtime with a
//!   checkpoint every epoch, judge, publish; beside it [`bench`]: throughput and load benchmarks.
//! - [`worker`]: the retrain worker — consume, coordinate, run, announce.
//! - [`cli`]: flags → the commands; `main.rs` calls it.

pub mod bench;
pub mod broker;
pub mod cli;
pub mod contract;
pub mod data;
pub mod db;
pub mod job;
pub mod publish;
pub mod system;
pub mod training;
pub mod worker;
