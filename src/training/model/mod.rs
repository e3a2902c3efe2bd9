//! Model kinds: what turns a track into an embedding, with the parameters it trains.
//!
//! One kind today, [`ModelKind::ContentBased`]: the track encoder of [`content`] (audio features →
//! dense tower → L2-normalised embedding). A kind plugs in here as one file beside `content.rs`,
//! owning its inputs (features, track ids, or both), its parameters and their Keras names, and its
//! forward pass to embeddings; everything downstream consumes only embeddings:
//! - [`crate::training::eval`] ranks by embedding similarity, whatever produced the embeddings;
//! - [`crate::training::loss`] scores pairs of embeddings (in-batch softmax, logQ);
//! - [`crate::training::trainer`] samples pairs, steps the optimiser over the kind's trainable
//!   tensors and checkpoints them by name; the fused [`crate::training::cpu_step`] is the content
//!   encoder's hand-written step, and the autograd step serves any kind;
//! - [`crate::publish::export`] turns the kind's host weights into `.keras` and TF.js, and
//!   [`crate::publish::artifacts`] records its architecture and `model_type` ([`ModelKind::as_str`]).

pub mod content;

pub use content::*;

/// The kinds of model this crate trains: `metadata.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Audio features through a dense encoder ([`Encoder`]): embeds any track, known or new.
    ContentBased,
}

impl ModelKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelKind::ContentBased => "content-based",
        }
    }
}
