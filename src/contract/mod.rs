//! The wire contracts other services rely on — the bottom layer: it imports nothing of this crate.
//!
//! - [`request`]: the `retrain` request (its schema, parsing with a reason for every refusal, and
//!   [`request::RetrainRequest::to_body`]), and the one rule for model keys. The worker's consumer,
//!   the `retrain` command and the coordination SQL all use it, so the contract is written once.

pub mod request;
