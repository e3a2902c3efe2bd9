//! Model formats for consumers that are not this crate: a Keras 3 `.keras` archive, a TensorFlow.js
//! Layers model, and the human-facing model card with its training curves.

mod card_kinds;
pub mod keras;
pub mod model_card;
pub mod tables;
pub mod tfjs;
pub mod zip;

use std::collections::HashMap;

use anyhow::Context;
use candle_core::Device;

use crate::training::model::{Encoder, EncoderConfig, PARAM_NAMES};

/// The encoder's tensors on the host, by name, in Keras layouts (see [`crate::training::model`]).
pub struct HostWeights {
    pub config: EncoderConfig,
    tensors: HashMap<&'static str, (Vec<usize>, Vec<f32>)>,
}

impl HostWeights {
    pub fn from_encoder(encoder: &Encoder) -> anyhow::Result<Self> {
        let mut tensors = HashMap::new();
        for (name, t) in encoder.named_tensors() {
            let t = t.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
            tensors.insert(name, (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?));
        }
        Ok(Self { config: encoder.config, tensors })
    }

    /// Shape and row-major values of tensor `name`.
    pub fn get(&self, name: &str) -> anyhow::Result<(&[usize], &[f32])> {
        let (shape, values) = self.tensors.get(name).with_context(|| format!("no tensor {name}"))?;
        Ok((shape, values))
    }

    /// Every tensor in [`PARAM_NAMES`] order.
    pub fn in_order(&self) -> impl Iterator<Item = (&'static str, &[usize], &[f32])> {
        PARAM_NAMES.iter().map(|n| {
            let (shape, values) = &self.tensors[n];
            (*n, shape.as_slice(), values.as_slice())
        })
    }
}
