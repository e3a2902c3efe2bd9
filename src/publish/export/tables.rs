//! Keras 3 and TF.js exports of the collaborative and hybrid kinds: functional models with named
//! inputs whose predictions are the rows of `embeddings.safetensors`.
//!
//! Inputs (all but `features` are int32 indices; 0 always means "none", so every table is exported
//! with a zero row 0 in front of the trained rows):
//! - `features` `[11]`: standardised audio features (hybrid);
//! - `artist_indices` `[max_artists]`: `artist row + 1` of each credited artist, then 0s (hybrid);
//! - `album_index` `[1]`: `album row + 1`, 0 without an album (hybrid);
//! - `track_index` `[1]`: `catalogue row + 1`, 0 for a track the model has never seen.
//!
//! The mean over a track's artists needs a division by their count, which neither format has as a
//! layer (and safe mode refuses `Lambda`). It is a softmax instead: `artist_present` maps each slot to
//! a score (100 for an artist, 0 for padding), and the softmax of those scores is `1/n` on the `n`
//! artists (the padding's share, `e⁻¹⁰⁰`, falls below f32's range) — then a `Dot` with the artist
//! rows. Padding rows are zero, so a track without artists gets a zero artist term either way.
//! Keras ends with `UnitNormalization`; TF.js has no such layer, so its model ends at the sum and
//! consumers normalise (as with the content kind's TF.js model).

use anyhow::Context;
use hdf5_pure::FileBuilder;
use serde_json::{Value, json};

use super::HostWeights;
use super::keras::KERAS_VERSION;
use super::tfjs;
use super::zip::stored_zip;
use crate::data::features::NUM_FEATURES;
use crate::publish::artifacts::TRAINER_VERSION;
use crate::training::model::tables::{TableId, Tables};
use crate::training::model::vocab::TrackInputs;
use crate::training::model::{BN_EPSILON, BN_MOMENTUM, Encoder, ModelKind};

/// `artist_present`'s score of a real artist: large enough that the padding's softmax share
/// (`e^-SCORE`) vanishes in f32.
const ARTIST_SCORE: f32 = 100.0;

/// What the exports of a table kind are made of: the encoder (hybrid) and the tables, each with its
/// zero row in front.
pub struct TableModel {
    kind: ModelKind,
    encoder: Option<HostWeights>,
    dim: usize,
    /// Width of `artist_indices` (at least 1).
    max_artists: usize,
    /// `(name, rows, values)` of each exported table, zero row first.
    tables: Vec<(&'static str, usize, Vec<f32>)>,
}

impl TableModel {
    pub fn new(kind: ModelKind, encoder: &Encoder, tables: &Tables, inputs: &TrackInputs) -> anyhow::Result<Self> {
        anyhow::ensure!(!kind.is_content(), "the content kind has its own export");
        let dim = encoder.config.embedding_size;
        let padded = |id: TableId| -> anyhow::Result<(usize, Vec<f32>)> {
            let table =
                tables.get(id).ok_or_else(|| anyhow::anyhow!("the {} model has no {id:?} table", kind.as_str()))?;
            let mut values = vec![0.0f32; dim];
            values.extend_from_slice(&table.values);
            Ok((table.rows + 1, values))
        };
        let mut exported = Vec::new();
        if kind == ModelKind::Hybrid {
            let (rows, values) = padded(TableId::Artist)?;
            let present = (0..rows).map(|r| if r == 0 { 0.0 } else { ARTIST_SCORE }).collect();
            exported.push(("artist_present", rows, present));
            exported.push(("artist_embedding", rows, values));
            let (rows, values) = padded(TableId::Album)?;
            exported.push(("album_embedding", rows, values));
        }
        let (rows, values) = padded(TableId::Identity)?;
        exported.push(("track_embedding", rows, values));
        let encoder = (kind == ModelKind::Hybrid).then(|| HostWeights::from_encoder(encoder)).transpose()?;
        Ok(Self { kind, encoder, dim, max_artists: inputs.max_artists().max(1), tables: exported })
    }

    fn table(&self, name: &str) -> &(&'static str, usize, Vec<f32>) {
        self.tables.iter().find(|t| t.0 == name).expect("exported table")
    }

    /// The layers in the order Keras lists them for this graph (its H5 keys count per class in
    /// this order): `(class, name, H5 key, config, inputs, output shape)`.
    fn layers(&self) -> Vec<Layer> {
        let (e, a) = (self.dim, self.max_artists);
        let rows = |name: &str| self.table(name).1;
        let embedding = |name: &'static str, key: &'static str, input: &'static str, width: usize, dim: usize| Layer {
            class: "Embedding",
            name,
            key,
            config: json!({"input_dim": rows(name), "output_dim": dim}),
            inputs: vec![input],
            shape: json!([null, width, dim]),
        };
        let simple = |class, name, key, config, inputs, shape| Layer { class, name, key, config, inputs, shape };
        let reshape = |name, key, input, width: usize| {
            simple("Reshape", name, key, json!({"target_shape": [width]}), vec![input], json!([null, width]))
        };
        let normalized = |input| {
            let config = json!({"axis": -1});
            simple(
                "UnitNormalization",
                "unit_normalization",
                "unit_normalization",
                config,
                vec![input],
                json!([null, e]),
            )
        };
        if self.kind == ModelKind::Collaborative {
            return vec![
                Layer::input("track_index", "input_layer", 1, "int32"),
                embedding("track_embedding", "embedding", "track_index", 1, e),
                reshape("track_vector", "reshape", "track_embedding", e),
                normalized("track_vector"),
            ];
        }
        let rate = self.encoder.as_ref().map_or(0.0, |w| w.config.dropout as f64);
        let dense = |name, key, input, units, activation: &str| {
            simple(
                "Dense",
                name,
                key,
                json!({"units": units, "activation": activation}),
                vec![input],
                json!([null, units]),
            )
        };
        let dropout = |name, input, units| {
            simple("Dropout", name, name, json!({"rate": rate}), vec![input], json!([null, units]))
        };
        vec![
            Layer::input("features", "input_layer", NUM_FEATURES, "float32"),
            simple(
                "BatchNormalization",
                "batch_normalization",
                "batch_normalization",
                json!({"axis": -1, "momentum": BN_MOMENTUM, "epsilon": BN_EPSILON}),
                vec!["features"],
                json!([null, NUM_FEATURES]),
            ),
            dense("dense", "dense", "batch_normalization", 2 * e, "relu"),
            Layer::input("artist_indices", "input_layer_1", a, "int32"),
            dropout("dropout", "dense", 2 * e),
            embedding("artist_present", "embedding", "artist_indices", a, 1),
            dense("dense_1", "dense_1", "dropout", e, "relu"),
            reshape("artist_scores", "reshape", "artist_present", a),
            Layer::input("album_index", "input_layer_2", 1, "int32"),
            Layer::input("track_index", "input_layer_3", 1, "int32"),
            dropout("dropout_1", "dense_1", e),
            simple(
                "Softmax",
                "artist_weights",
                "softmax",
                json!({"axis": -1}),
                vec!["artist_scores"],
                json!([null, a]),
            ),
            embedding("artist_embedding", "embedding_1", "artist_indices", a, e),
            embedding("album_embedding", "embedding_2", "album_index", 1, e),
            embedding("track_embedding", "embedding_3", "track_index", 1, e),
            dense("dense_2", "dense_2", "dropout_1", e, "tanh"),
            simple(
                "Dot",
                "artist_mean",
                "dot",
                json!({"axes": [1, 1], "normalize": false}),
                vec!["artist_weights", "artist_embedding"],
                json!([null, e]),
            ),
            reshape("album_vector", "reshape_1", "album_embedding", e),
            reshape("track_vector", "reshape_2", "track_embedding", e),
            simple(
                "Add",
                "sum",
                "add",
                json!({}),
                vec!["dense_2", "artist_mean", "album_vector", "track_vector"],
                json!([null, e]),
            ),
            normalized("sum"),
        ]
    }

    /// The model's named inputs, in order.
    fn input_names(&self) -> Vec<&'static str> {
        match self.kind {
            ModelKind::Hybrid => vec!["features", "artist_indices", "album_index", "track_index"],
            _ => vec!["track_index"],
        }
    }

    /// Variables of layer `name`, in Keras' order, as `(TF.js name, shape, values)`.
    fn variables(&self, name: &str) -> anyhow::Result<Vec<Variable>> {
        if let Some((_, rows, values)) = self.tables.iter().find(|t| t.0 == name) {
            let dim = values.len() / rows;
            return Ok(vec![(format!("{name}/embeddings"), vec![*rows, dim], values.clone())]);
        }
        let Some(encoder) = &self.encoder else { return Ok(Vec::new()) };
        let names: &[(&str, &str)] = match name {
            "batch_normalization" => &tfjs::WEIGHTS[0..4],
            "dense" => &tfjs::WEIGHTS[4..6],
            "dense_1" => &tfjs::WEIGHTS[6..8],
            "dense_2" => &tfjs::WEIGHTS[8..10],
            _ => &[],
        };
        names
            .iter()
            .map(|(tfjs_name, ours)| {
                let (shape, values) = encoder.get(ours)?;
                Ok((tfjs_name.to_string(), shape.to_vec(), values.to_vec()))
            })
            .collect()
    }

    /// The Keras 3 `config.json` (a Functional model).
    fn keras_config(&self) -> Value {
        let layers = self.layers();
        let shape_of = |name: &str| layers.iter().find(|l| l.name == name).expect("an earlier layer").shape.clone();
        let dtype_of =
            |name: &str| if name.ends_with("_index") || name.ends_with("_indices") { "int32" } else { "float32" };
        let tensor = |from: &str| json!({"class_name": "__keras_tensor__", "config": {"shape": shape_of(from), "dtype": dtype_of(from), "keras_history": [from, 0, 0]}});
        let json_layers: Vec<Value> = layers
            .iter()
            .map(|l| {
                if l.class == "InputLayer" {
                    return json!({"module": "keras.layers", "class_name": "InputLayer", "config": l.config, "name": l.name, "inbound_nodes": []});
                }
                let mut config = l.config.clone();
                config["name"] = json!(l.name);
                let args = match l.inputs.as_slice() {
                    [one] => tensor(one),
                    many => Value::Array(many.iter().map(|i| tensor(i)).collect()),
                };
                let kwargs = match l.class {
                    "BatchNormalization" | "Softmax" => json!({"mask": null}),
                    "Dropout" => json!({"training": false}),
                    _ => json!({}),
                };
                json!({"module": "keras.layers", "class_name": l.class, "config": config, "name": l.name,
                       "inbound_nodes": [{"args": [args], "kwargs": kwargs}]})
            })
            .collect();
        let ends = |names: Vec<&str>| names.into_iter().map(|n| json!([n, 0, 0])).collect::<Vec<_>>();
        json!({
            "module": "keras.src.models.functional",
            "class_name": "Functional",
            "registered_name": "Functional",
            "config": {
                "name": format!("{}_track_encoder", self.kind.as_str()),
                "trainable": false,
                "layers": json_layers,
                "input_layers": ends(self.input_names()),
                "output_layers": [["unit_normalization", 0, 0]],
            },
            "compile_config": null,
        })
    }

    /// `model.weights.h5`: a group per layer under its Keras key, variables in order.
    fn keras_weights(&self) -> anyhow::Result<Vec<u8>> {
        let mut file = FileBuilder::new();
        let mut layers = file.create_group("layers");
        for layer in self.layers() {
            let mut group = layers.create_group(layer.key);
            let mut vars = group.create_group("vars");
            for (i, (_, shape, values)) in self.variables(layer.name)?.iter().enumerate() {
                let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                vars.create_dataset(&i.to_string()).with_f32_data(values).with_shape(&shape);
            }
            group.add_group(vars.finish());
            layers.add_group(group.finish());
        }
        file.add_group(layers.finish());
        let root_vars = file.create_group("vars").finish();
        file.add_group(root_vars);
        Ok(file.finish()?)
    }

    /// The `.keras` archive.
    pub fn keras_archive(&self, date_saved: &str) -> anyhow::Result<Vec<u8>> {
        let metadata = serde_json::to_vec(&json!({"keras_version": KERAS_VERSION, "date_saved": date_saved}))?;
        let config = serde_json::to_vec(&self.keras_config())?;
        let h5 = self.keras_weights()?;
        Ok(stored_zip(&[("metadata.json", &metadata), ("config.json", &config), ("model.weights.h5", &h5)]))
    }

    /// The TF.js Layers model: `(model.json, shard)`. It ends at the sum, before normalisation.
    pub fn tfjs(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let layers: Vec<Layer> = self.layers().into_iter().filter(|l| l.class != "UnitNormalization").collect();
        let output = layers.last().expect("layers").name;
        let mut shard = Vec::new();
        let mut manifest = Vec::new();
        let mut json_layers = Vec::new();
        for l in &layers {
            for (name, shape, values) in self.variables(l.name)? {
                values.iter().for_each(|v| shard.extend(v.to_le_bytes()));
                manifest.push(json!({"name": name, "shape": shape, "dtype": "float32"}));
            }
            let mut layer = match l.class {
                "InputLayer" => {
                    let shape = l.config["batch_shape"].clone();
                    json!({"class_name": "InputLayer", "config": {"batch_input_shape": shape, "dtype": l.config["dtype"], "sparse": false, "name": l.name}})
                }
                "Dense" => {
                    let units = l.config["units"].as_u64().with_context(|| format!("{} has no units", l.name))?;
                    let activation =
                        l.config["activation"].as_str().with_context(|| format!("{} has no activation", l.name))?;
                    tfjs::dense(l.name, units as usize, activation)
                }
                "Dropout" => {
                    tfjs::dropout(l.name, l.config["rate"].as_f64().with_context(|| format!("{} has no rate", l.name))?)
                }
                "BatchNormalization" => tfjs::batch_normalization(),
                "Embedding" => json!({"class_name": "Embedding", "config": {
                    "name": l.name, "trainable": true, "dtype": "float32",
                    "input_dim": l.config["input_dim"], "output_dim": l.config["output_dim"],
                    "embeddings_initializer": {"class_name": "RandomUniform", "config": {"minval": -0.05, "maxval": 0.05, "seed": null}},
                    "embeddings_regularizer": null, "activity_regularizer": null, "embeddings_constraint": null,
                    "mask_zero": false, "input_length": null
                }}),
                class => {
                    let mut config = l.config.clone();
                    config["name"] = json!(l.name);
                    config["trainable"] = json!(true);
                    config["dtype"] = json!("float32");
                    json!({"class_name": class, "config": config})
                }
            };
            layer["name"] = json!(l.name);
            let inbound: Vec<Value> = l.inputs.iter().map(|i| json!([i, 0, 0, {}])).collect();
            layer["inbound_nodes"] = if inbound.is_empty() { json!([]) } else { json!([inbound]) };
            json_layers.push(layer);
        }
        let ends = |names: Vec<&str>| names.into_iter().map(|n| json!([n, 0, 0])).collect::<Vec<_>>();
        let model = json!({
            "format": "layers-model",
            "generatedBy": format!("audotics-trainer {TRAINER_VERSION}"),
            "convertedBy": null,
            "modelTopology": {
                "class_name": "Model",
                "config": {
                    "name": format!("{}_track_encoder", self.kind.as_str()),
                    "layers": json_layers,
                    "input_layers": ends(self.input_names()),
                    "output_layers": [[output, 0, 0]],
                },
                "keras_version": "2.15.0",
                "backend": "tensorflow",
            },
            "weightsManifest": [{"paths": [tfjs::SHARD], "weights": manifest}],
        });
        Ok((serde_json::to_vec_pretty(&model)?, shard))
    }
}

/// A layer variable: `(TF.js name, shape, row-major values)`.
type Variable = (String, Vec<usize>, Vec<f32>);

/// One layer of an exported graph.
struct Layer {
    class: &'static str,
    name: &'static str,
    /// Its group in `model.weights.h5`.
    key: &'static str,
    config: Value,
    inputs: Vec<&'static str>,
    shape: Value,
}

impl Layer {
    fn input(name: &'static str, key: &'static str, width: usize, dtype: &str) -> Self {
        Layer {
            class: "InputLayer",
            name,
            key,
            config: json!({"batch_shape": [null, width], "dtype": dtype, "name": name}),
            inputs: Vec::new(),
            shape: json!([null, width]),
        }
    }
}

/// The exported models' inputs for catalogue track `t` (`known`: the model has its identity row;
/// false embeds it as a new track): `(artist_indices, album_index, track_index)`.
pub fn model_inputs(inputs: &TrackInputs, t: usize, known: bool) -> (Vec<i32>, i32, i32) {
    let width = inputs.max_artists().max(1);
    let mut artists: Vec<i32> = inputs.artist_rows(t).iter().map(|&r| r as i32 + 1).collect();
    artists.resize(width, 0);
    let album = inputs.album_row(t).map_or(0, |r| r as i32 + 1);
    (artists, album, if known { t as i32 + 1 } else { 0 })
}
