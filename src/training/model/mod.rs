//! Model kinds: what turns a track into an embedding, with the parameters it trains.
//!
//! Three kinds ([`ModelKind`]): the content encoder of [`content`] (audio features → dense tower),
//! the collaborative kind (an identity row per played track) and the hybrid (the content output plus
//! identity, artist and album rows), whose embedding tables live in [`tables`] and whose name → row
//! vocabularies live in [`vocab`]. Everything downstream consumes only embeddings:
//! - [`crate::training::eval`] ranks by embedding similarity, whatever produced the embeddings;
//! - [`crate::training::loss`] scores pairs of embeddings (in-batch softmax, logQ);
//! - [`crate::training::trainer`] samples pairs, steps the optimiser over the kind's parameters and
//!   checkpoints them by name; the fused [`crate::training::cpu_step`] covers every kind (the table
//!   terms join the content output before normalisation), and the autograd step serves any kind;
//! - [`crate::publish::export`] turns each kind's weights into `.keras` and TF.js models (the table
//!   kinds' with named inputs), and [`crate::publish::artifacts`] records each kind's architecture,
//!   tables and `model_type` ([`ModelKind::as_str`]).

use serde::{Deserialize, Serialize};

pub mod content;
pub mod tables;
pub mod vocab;

pub use content::*;

/// The kinds of model this crate trains: `metadata.json`'s `model_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Audio features through a dense encoder ([`Encoder`]): embeds any track, known or new.
    #[default]
    #[value(name = "content", alias = "content-based")]
    ContentBased,
    /// A learned identity row per played track ([`tables`]), item2vec-style: no row for a track
    /// without training listens.
    Collaborative,
    /// The content encoder plus identity, artist and album rows, summed, with identity and album
    /// dropout so that a track without listens is placed by its audio and artists.
    Hybrid,
}

impl ModelKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelKind::ContentBased => "content-based",
            ModelKind::Collaborative => "collaborative",
            ModelKind::Hybrid => "hybrid",
        }
    }

    /// Whether the kind runs the content encoder.
    pub const fn has_content(self) -> bool {
        matches!(self, ModelKind::ContentBased | ModelKind::Hybrid)
    }

    /// The centering penalty's weight unless one is given: the audio encoder needs it (without it
    /// its embeddings share one dominant direction); on the table kinds it cost Recall@10
    /// (collaborative 0.1270 → 0.1373, hybrid 0.1177 → 0.1267 on a tuning seed's 20k-track history).
    pub fn default_centering_weight(self) -> f64 {
        if self.is_content() { 1.0 } else { 0.0 }
    }

    pub fn is_content(&self) -> bool {
        *self == ModelKind::ContentBased
    }
}
