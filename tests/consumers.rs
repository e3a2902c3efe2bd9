//! The artifacts as their real consumers load them: the `.keras` archive in Keras 3 (JAX backend,
//! safe mode) and the TF.js model in `@tensorflow/tfjs` on Node, each fed standardised features and
//! compared with the trainer's own embeddings (max abs diff ≤ 1e-5; TF.js after L2 normalisation).
//!
//! The Python venv (`.venv-consumers`) and `tests/consumers/node_modules` come from
//! `scripts/consumers.sh`, which `scripts/test.sh` runs; without them these tests fail, loudly.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;

const BIN: &str = env!("CARGO_BIN_EXE_audotics-trainer");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Trains a small model once per test and returns its version folder.
fn train(dir: &Path) -> PathBuf {
    train_with(dir, "content-based", &[])
}

/// Trains a small model of model key `model` with `extra` flags; returns its version folder.
fn train_with(dir: &Path, model: &str, extra: &[&str]) -> PathBuf {
    let out = Command::new(BIN)
        .args(["train", "--no-progress", "--epochs", "3", "--batch-size", "32", "--embedding-size", "16"])
        .args(["--synthetic-tracks", "600", "--synthetic-users", "60", "--synthetic-interactions", "6000"])
        // A model trained for seconds: its quality floors are recorded, not enforced.
        .args(["--quality-floors", "false", "--model", model])
        .args(extra)
        .args(["--output", dir.to_str().unwrap()])
        .env("AUDOTICS_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_dir(dir.join(model).join("versions")).unwrap().next().unwrap().unwrap().path()
}

/// The synthetic dataset the small models of these tests train on (`train_with`'s sizes, seed 42).
fn synthetic_dataset() -> audotics_trainer::data::Dataset {
    let spec = audotics_trainer::data::source::SyntheticSpec {
        tracks: 600,
        users: 60,
        interactions: 6000,
        genres: 16,
        seed: 42,
    };
    audotics_trainer::data::synthetic::generate(&spec)
}

/// Standardised features of every track (from the metadata's means and stds, as a consumer would)
/// and the trainer's embeddings, as the consumer scripts read them.
fn inputs(version: &Path) -> PathBuf {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(version.join("content-based-model-metadata.json")).unwrap()).unwrap();
    let emb = candle_core::safetensors::load(version.join("embeddings.safetensors"), &Device::Cpu).unwrap();
    let embeddings: Vec<Vec<f32>> = emb["embeddings"].to_vec2().unwrap();
    // The features themselves are not in the metadata; regenerate the same synthetic catalogue.
    let dataset = synthetic_dataset();
    let ids: Vec<&str> = meta["track_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(ids, dataset.catalogue.track_ids.iter().map(String::as_str).collect::<Vec<_>>());
    let f =
        |key: &str| -> Vec<f32> { meta[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect() };
    let (means, stds) = (f("feature_means"), f("feature_stds"));
    let features: Vec<Vec<f32>> = dataset
        .catalogue
        .features
        .iter()
        .map(|row| row.iter().enumerate().map(|(i, v)| (v - means[i]) / stds[i]).collect())
        .collect();
    let path = version.join("consumer-inputs.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({"features": features, "embeddings": embeddings})).unwrap(),
    )
    .unwrap();
    path
}

fn check(out: std::process::Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} check failed ({:?}): {stdout}{stderr}", out.status.code());
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let diff = report["max_abs_diff"].as_f64().unwrap();
    assert!(diff <= 1e-5, "{what}: max abs diff {diff}");
    eprintln!("{what}: {report}");
}

#[test]
fn keras_3_loads_the_archive_and_predicts_our_embeddings() {
    let python = Path::new(ROOT).join(".venv-consumers/bin/python");
    assert!(python.exists(), "no {} — run scripts/consumers.sh", python.display());
    let dir = tempfile::tempdir().unwrap();
    let version = train(dir.path());
    let inputs = inputs(&version);
    let out = Command::new(python)
        .arg(Path::new(ROOT).join("tests/consumers/keras_check.py"))
        .arg(version.join("content-based-model.keras"))
        .arg(inputs)
        .env("KERAS_BACKEND", "jax")
        .env("JAX_PLATFORMS", "cpu")
        .output()
        .unwrap();
    check(out, "Keras");
}

#[test]
fn tensorflow_js_loads_the_layers_model_and_predicts_our_embeddings() {
    let modules = Path::new(ROOT).join("tests/consumers/node_modules/@tensorflow/tfjs");
    assert!(modules.exists(), "no {} — run scripts/consumers.sh", modules.display());
    let dir = tempfile::tempdir().unwrap();
    let version = train(dir.path());
    let inputs = inputs(&version);
    let out = Command::new("node")
        .arg(Path::new(ROOT).join("tests/consumers/tfjs_check.mjs"))
        .arg(version.join("tfjs"))
        .arg(inputs)
        .output()
        .unwrap();
    check(out, "TF.js");
}

#[test]
fn the_keras_check_fails_on_a_wrong_model() {
    // The check itself can fail: the same archive against other embeddings.
    let python = Path::new(ROOT).join(".venv-consumers/bin/python");
    assert!(python.exists(), "no {} — run scripts/consumers.sh", python.display());
    let dir = tempfile::tempdir().unwrap();
    let version = train(dir.path());
    let inputs = inputs(&version);
    let mut data: serde_json::Value = serde_json::from_slice(&std::fs::read(&inputs).unwrap()).unwrap();
    data["embeddings"][0][0] = serde_json::json!(data["embeddings"][0][0].as_f64().unwrap() + 1e-3);
    std::fs::write(&inputs, serde_json::to_vec(&data).unwrap()).unwrap();
    let out = Command::new(python)
        .arg(Path::new(ROOT).join("tests/consumers/keras_check.py"))
        .arg(version.join("content-based-model.keras"))
        .arg(inputs)
        .env("KERAS_BACKEND", "jax")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Trains a small model of a table kind with 20 % of the tracks held out cold; returns its version.
fn train_kind(dir: &Path, kind: &str) -> PathBuf {
    train_with(dir, kind, &["--model-kind", kind, "--cold-tracks", "0.2"])
}

/// The named inputs of every track for a table kind's exported model, and the embeddings they must
/// give: a track whose identity row is zero (never trained: a cold track, or one without listens) is
/// fed as a new track (`track_index` 0), every other one by its row. Returns the inputs file and how
/// many tracks went in as new.
fn table_inputs(version: &Path, kind: &str) -> (PathBuf, usize) {
    use audotics_trainer::publish::export::tables::model_inputs;
    use audotics_trainer::training::model::vocab::TrackInputs;
    let features_file = inputs(version);
    let data: serde_json::Value = serde_json::from_slice(&std::fs::read(&features_file).unwrap()).unwrap();
    let weights = candle_core::safetensors::load(version.join("weights.safetensors"), &Device::Cpu).unwrap();
    let identity: Vec<Vec<f32>> = weights["track_embedding.embeddings"].to_vec2().unwrap();
    let vocab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(version.join("vocabularies.json")).unwrap()).unwrap();
    let tags = synthetic_dataset().catalogue.tags;
    let track_inputs = TrackInputs::build(&tags, vocab["artists"]["min_count"].as_u64().unwrap() as usize);
    assert_eq!(serde_json::json!(track_inputs.artists.names), vocab["artists"]["names"], "the published vocabulary");
    let (mut artists, mut albums, mut tracks, mut new) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for (t, row) in identity.iter().enumerate() {
        let known = row.iter().any(|v| *v != 0.0);
        new += usize::from(!known);
        let (a, b, i) = model_inputs(&track_inputs, t, known);
        artists.push(a);
        albums.push(vec![b]);
        tracks.push(vec![i]);
    }
    let named = match kind {
        "hybrid" => {
            serde_json::json!({"features": data["features"], "artist_indices": artists, "album_index": albums, "track_index": tracks})
        }
        _ => serde_json::json!({"track_index": tracks}),
    };
    let path = version.join("table-inputs.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({"inputs": named, "embeddings": data["embeddings"]})).unwrap(),
    )
    .unwrap();
    (path, new)
}

/// The hybrid and collaborative exports, loaded by Keras 3 (safe mode) and TF.js, predict every
/// published embedding: warm tracks through their identity rows, cold and unplayed ones as new
/// tracks (the hybrid places them by audio, artists and album; the collaborative gives zeros).
#[test]
fn keras_and_tfjs_exports_of_the_table_kinds_predict_warm_and_cold_embeddings() {
    let python = Path::new(ROOT).join(".venv-consumers/bin/python");
    assert!(python.exists(), "no {} — run scripts/consumers.sh", python.display());
    for kind in ["hybrid", "collaborative"] {
        let dir = tempfile::tempdir().unwrap();
        let version = train_kind(dir.path(), kind);
        let (inputs, new) = table_inputs(&version, kind);
        assert!((100..600).contains(&new), "{kind}: {new} tracks fed as new (120 cold of 600)");
        let out = Command::new(&python)
            .arg(Path::new(ROOT).join("tests/consumers/keras_check.py"))
            .arg(version.join("content-based-model.keras"))
            .arg(&inputs)
            .env("KERAS_BACKEND", "jax")
            .env("JAX_PLATFORMS", "cpu")
            .output()
            .unwrap();
        check(out, &format!("Keras {kind}"));
        let out = Command::new("node")
            .arg(Path::new(ROOT).join("tests/consumers/tfjs_check.mjs"))
            .arg(version.join("tfjs"))
            .arg(&inputs)
            .output()
            .unwrap();
        check(out, &format!("TF.js {kind}"));
    }
}
