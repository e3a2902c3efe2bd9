//! A TensorFlow.js Layers model (`tfjs/model.json` + `tfjs/group1-shard1of1.bin`), the format the
//! platform's TypeScript inference loads with `tf.loadLayersModel`. TF.js has no UnitNormalization
//! layer, so the model ends at the tanh layer: its outputs equal the embeddings up to the final L2
//! normalisation (which the consumer applies, or which cosine similarity makes irrelevant).
//!
//! The topology is Keras 2 style JSON (TF.js's converter format); weights are one little-endian f32
//! shard, in the manifest's order, named `<layer>/<variable>`.

use serde_json::{Value, json};

use super::HostWeights;
use crate::data::features::NUM_FEATURES;
use crate::publish::artifacts::TRAINER_VERSION;
use crate::training::model::{BN_EPSILON, BN_MOMENTUM};

/// The weight shard's file name, next to `model.json`.
pub const SHARD: &str = "group1-shard1of1.bin";

/// `(tfjs weight name, our tensor name)` of the content encoder, in shard order.
pub(super) const WEIGHTS: [(&str, &str); 10] = [
    ("batch_normalization/gamma", "batch_normalization.gamma"),
    ("batch_normalization/beta", "batch_normalization.beta"),
    ("batch_normalization/moving_mean", "batch_normalization.moving_mean"),
    ("batch_normalization/moving_variance", "batch_normalization.moving_variance"),
    ("dense/kernel", "dense.kernel"),
    ("dense/bias", "dense.bias"),
    ("dense_1/kernel", "dense_1.kernel"),
    ("dense_1/bias", "dense_1.bias"),
    ("dense_2/kernel", "dense_2.kernel"),
    ("dense_2/bias", "dense_2.bias"),
];

/// `(model.json, shard bytes)`.
pub fn model(weights: &HostWeights) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut shard = Vec::new();
    let mut manifest = Vec::new();
    for (tfjs_name, name) in WEIGHTS {
        let (shape, values) = weights.get(name)?;
        for v in values {
            shard.extend(v.to_le_bytes());
        }
        manifest.push(json!({"name": tfjs_name, "shape": shape, "dtype": "float32"}));
    }
    let model = json!({
        "format": "layers-model",
        "generatedBy": format!("audotics-trainer {TRAINER_VERSION}"),
        "convertedBy": null,
        "modelTopology": topology(weights),
        "weightsManifest": [{"paths": [SHARD], "weights": manifest}],
    });
    Ok((serde_json::to_vec_pretty(&model)?, shard))
}

fn topology(weights: &HostWeights) -> Value {
    let e = weights.config.embedding_size;
    let rate = weights.config.dropout as f64;
    let mut batch_normalization = batch_normalization();
    batch_normalization["config"]["batch_input_shape"] = json!([null, NUM_FEATURES]);
    json!({
        "class_name": "Sequential",
        "config": {"name": "track_encoder", "layers": [
            batch_normalization,
            dense("dense", 2 * e, "relu"),
            dropout("dropout", rate),
            dense("dense_1", e, "relu"),
            dropout("dropout_1", rate),
            dense("dense_2", e, "tanh"),
        ]},
        "keras_version": "2.15.0",
        "backend": "tensorflow",
    })
}

/// A Dense layer as TF.js's (Keras 2) topology spells it.
pub(super) fn dense(name: &str, units: usize, activation: &str) -> Value {
    json!({"class_name": "Dense", "config": {
        "name": name, "trainable": true, "dtype": "float32", "units": units, "activation": activation,
        "use_bias": true,
        "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": null}},
        "bias_initializer": {"class_name": "Zeros", "config": {}},
        "kernel_regularizer": null, "bias_regularizer": null, "activity_regularizer": null,
        "kernel_constraint": null, "bias_constraint": null
    }})
}

pub(super) fn dropout(name: &str, rate: f64) -> Value {
    json!({"class_name": "Dropout", "config": {"name": name, "trainable": true, "dtype": "float32", "rate": rate, "noise_shape": null, "seed": null}})
}

/// The encoder's BatchNormalization layer (Keras' momentum and epsilon).
pub(super) fn batch_normalization() -> Value {
    json!({"class_name": "BatchNormalization", "config": {
        "name": "batch_normalization", "trainable": true, "dtype": "float32",
        "axis": -1, "momentum": BN_MOMENTUM, "epsilon": BN_EPSILON, "center": true, "scale": true,
        "beta_initializer": {"class_name": "Zeros", "config": {}},
        "gamma_initializer": {"class_name": "Ones", "config": {}},
        "moving_mean_initializer": {"class_name": "Zeros", "config": {}},
        "moving_variance_initializer": {"class_name": "Ones", "config": {}},
        "beta_regularizer": null, "gamma_regularizer": null, "beta_constraint": null, "gamma_constraint": null
    }})
}
