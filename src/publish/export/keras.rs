//! `content-based-model.keras`: a Keras 3 archive (`../shared/KERAS_FORMAT.md`) of the encoder
//! followed by `UnitNormalization`, so that `predict` on standardised features returns exactly the
//! rows of `embeddings.safetensors`. Loads with `keras.models.load_model(path)`, safe mode on.
//!
//! Members: `metadata.json`, `config.json` (a Sequential model), `model.weights.h5` (one HDF5 group
//! per layer, `/layers/<class_snake>[_<n>]/vars/<i>`, plus the empty root group `/vars` that Keras
//! 3.0 needs).

use hdf5_pure::FileBuilder;
use serde_json::{Value, json};

use super::HostWeights;
use super::zip::stored_zip;
use crate::data::features::NUM_FEATURES;
use crate::training::model::{BN_EPSILON, BN_MOMENTUM};

/// The Keras version written in `metadata.json` (the newest one the format was proven on).
pub const KERAS_VERSION: &str = "3.15.1";

/// `config.json`.
pub fn config(weights: &HostWeights) -> Value {
    let e = weights.config.embedding_size;
    let rate = weights.config.dropout as f64;
    let layer = |class: &str, config: Value| json!({"module": "keras.layers", "class_name": class, "config": config});
    json!({
        "module": "keras",
        "class_name": "Sequential",
        "config": {
            "name": "track_encoder",
            "trainable": false,
            "layers": [
                layer("InputLayer", json!({"batch_shape": [null, NUM_FEATURES], "dtype": "float32", "name": "input_layer"})),
                layer("BatchNormalization", json!({"name": "batch_normalization", "axis": -1, "momentum": BN_MOMENTUM, "epsilon": BN_EPSILON})),
                layer("Dense", json!({"name": "dense", "units": 2 * e, "activation": "relu"})),
                layer("Dropout", json!({"name": "dropout", "rate": rate})),
                layer("Dense", json!({"name": "dense_1", "units": e, "activation": "relu"})),
                layer("Dropout", json!({"name": "dropout_1", "rate": rate})),
                layer("Dense", json!({"name": "dense_2", "units": e, "activation": "tanh"})),
                layer("UnitNormalization", json!({"name": "unit_normalization", "axis": -1})),
            ],
        },
        "compile_config": null,
    })
}

/// `model.weights.h5`. Variable order per layer is Keras': trainable first, then non-trainable.
pub fn weights_h5(weights: &HostWeights) -> anyhow::Result<Vec<u8>> {
    let mut file = FileBuilder::new();
    let mut layers = file.create_group("layers");
    let with_vars = [
        (
            "batch_normalization",
            vec![
                "batch_normalization.gamma",
                "batch_normalization.beta",
                "batch_normalization.moving_mean",
                "batch_normalization.moving_variance",
            ],
        ),
        ("dense", vec!["dense.kernel", "dense.bias"]),
        ("dense_1", vec!["dense_1.kernel", "dense_1.bias"]),
        ("dense_2", vec!["dense_2.kernel", "dense_2.bias"]),
    ];
    for (layer, tensors) in with_vars {
        let mut group = layers.create_group(layer);
        let mut vars = group.create_group("vars");
        for (i, name) in tensors.iter().enumerate() {
            let (shape, values) = weights.get(name)?;
            let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            vars.create_dataset(&i.to_string()).with_f32_data(values).with_shape(&shape);
        }
        group.add_group(vars.finish());
        layers.add_group(group.finish());
    }
    // Weightless layers get empty `vars` groups, as Keras writes them.
    for layer in ["dropout", "dropout_1", "unit_normalization"] {
        let mut group = layers.create_group(layer);
        let vars = group.create_group("vars").finish();
        group.add_group(vars);
        layers.add_group(group.finish());
    }
    file.add_group(layers.finish());
    let root_vars = file.create_group("vars").finish();
    file.add_group(root_vars);
    Ok(file.finish()?)
}

/// The whole `.keras` archive.
pub fn archive(weights: &HostWeights, date_saved: &str) -> anyhow::Result<Vec<u8>> {
    let metadata = serde_json::to_vec(&json!({"keras_version": KERAS_VERSION, "date_saved": date_saved}))?;
    let config = serde_json::to_vec(&config(weights))?;
    let h5 = weights_h5(weights)?;
    Ok(stored_zip(&[("metadata.json", &metadata), ("config.json", &config), ("model.weights.h5", &h5)]))
}
