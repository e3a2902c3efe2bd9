//! The `train` command as a user runs it: the real binary, the real local model store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_audotics-trainer");

/// A small synthetic dataset and few epochs: seconds per run. `train` lets a test override any of
/// these flags.
const SMALL: &[(&str, &str)] = &[
    ("--synthetic-tracks", "800"),
    ("--synthetic-users", "120"),
    ("--synthetic-interactions", "8000"),
    ("--batch-size", "32"),
    ("--embedding-size", "16"),
];

/// `train` arguments: `extra` (flag/value pairs or lone flags) plus every SMALL flag it does not set.
fn train_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        ["train", "--no-progress", "--output", dir.to_str().unwrap()].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    for (flag, value) in SMALL {
        if !extra.contains(flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args
}

fn trainer<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG").env("AUDOTICS_LOG_FORMAT", "json");
    cmd
}

fn train(dir: &Path, extra: &[&str]) -> Output {
    let out = trainer(&train_args(dir, extra)).output().unwrap();
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The one version directory under `<dir>/content-based/versions/`.
fn only_version(dir: &Path) -> PathBuf {
    let versions: Vec<PathBuf> =
        std::fs::read_dir(dir.join("content-based/versions")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(versions.len(), 1, "{versions:?}");
    versions.into_iter().next().unwrap()
}

fn metadata(version_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(version_dir.join("content-based-model-metadata.json")).unwrap()).unwrap()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn assert_same_tensors(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (name, ta) in a {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(va == vb, "tensor {name} differs");
    }
}

#[test]
fn invalid_flags_exit_2_with_one_line_naming_the_flag() {
    let cases: [(&[&str], &str); 7] = [
        (&["--epochs", "0"], "--epochs"),
        (&["--validation-split", "1"], "--validation-split"),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--learning-rate", "0"], "--learning-rate"),
        (&["--learning-rate", "NaN"], "--learning-rate"),
        (&["--embedding-size", "0"], "--embedding-size"),
        (&["--device", "tpu"], "--device"),
    ];
    for (args, flag) in cases {
        let mut full = vec!["train"];
        full.extend_from_slice(args);
        let out = trainer(&full).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?} printed more than one line: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

#[test]
fn environment_variables_are_validated_like_flags() {
    let out = trainer(&["train"]).env("AUDOTICS_EPOCHS", "0").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--epochs"), "{stderr}");
    let out = trainer(&["train"]).env("AUDOTICS_VALIDATION_SPLIT", "-0.5").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn writes_a_version_whose_metadata_and_embeddings_agree() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(dir.path(), &["--epochs", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SYNTHETIC"), "logs must say the data is synthetic");
    let version = only_version(dir.path());
    let meta = metadata(&version);
    for key in [
        "model_type",
        "feature_names",
        "feature_means",
        "feature_stds",
        "track_ids",
        "num_tracks",
        "training_history",
        "training_date",
        "model_version",
        "embedding_size",
        "architecture",
        "hyperparameters",
        "loss",
        "baselines",
        "data",
        "device",
        "seed",
        "trainer_version",
    ] {
        assert!(meta.get(key).is_some(), "metadata lacks {key}");
    }
    assert_eq!(meta["model_type"], "content-based");
    assert_eq!(meta["data"]["synthetic"], true);
    assert_eq!(meta["model_version"].as_str().unwrap(), version.file_name().unwrap().to_str().unwrap());
    let names: Vec<&str> = meta["feature_names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, audotics_trainer::features::FEATURE_NAMES);
    assert_eq!(meta["feature_means"].as_array().unwrap().len(), 11);
    assert_eq!(meta["feature_stds"].as_array().unwrap().len(), 11);
    let num_tracks = meta["num_tracks"].as_u64().unwrap() as usize;
    assert_eq!(num_tracks, 800);
    assert_eq!(meta["track_ids"].as_array().unwrap().len(), num_tracks);
    for curve in ["loss", "val_loss", "recall_at_10", "ndcg_at_10"] {
        assert_eq!(meta["training_history"][curve].as_array().unwrap().len(), 3, "{curve}");
    }

    let emb = &tensors(&version.join("embeddings.safetensors"))["embeddings"];
    assert_eq!(emb.dims(), &[num_tracks, 16]);
    let norms: Vec<f32> = emb.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "embeddings are L2-normalised");

    let weights = tensors(&version.join("weights.safetensors"));
    assert_eq!(weights["dense.kernel"].dims(), &[11, 32]);
    assert_eq!(weights["dense_2.kernel"].dims(), &[16, 16]);
    assert_eq!(weights["batch_normalization.moving_variance"].dims(), &[11]);

    // A checkpoint per epoch under the run, of which the newest two (--keep-checkpoints) are kept.
    let runs: Vec<PathBuf> =
        std::fs::read_dir(dir.path().join("content-based/runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 1);
    let mut checkpoints: Vec<String> = std::fs::read_dir(runs[0].join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    checkpoints.sort();
    assert_eq!(checkpoints, ["epoch-0002.safetensors", "epoch-0003.safetensors"]);
}

#[test]
fn same_seed_gives_the_same_model_and_metrics() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(a.path(), &["--epochs", "2", "--seed", "5"]);
    train(b.path(), &["--epochs", "2", "--seed", "5"]);
    train(c.path(), &["--epochs", "2", "--seed", "6"]);
    let (va, vb, vc) = (only_version(a.path()), only_version(b.path()), only_version(c.path()));
    // Everything but the timings (seconds, pairs/s) must agree exactly.
    for curve in ["loss", "val_loss", "recall_at_10", "ndcg_at_10", "mean_pairwise_cosine"] {
        assert_eq!(metadata(&va)["training_history"][curve], metadata(&vb)["training_history"][curve], "{curve}");
    }
    assert_eq!(metadata(&va)["final_metrics"], metadata(&vb)["final_metrics"]);
    assert_same_tensors(&tensors(&va.join("weights.safetensors")), &tensors(&vb.join("weights.safetensors")));
    assert_same_tensors(&tensors(&va.join("embeddings.safetensors")), &tensors(&vb.join("embeddings.safetensors")));
    assert_ne!(
        metadata(&va)["training_history"]["loss"],
        metadata(&vc)["training_history"]["loss"],
        "another seed, another run"
    );
}

/// kill -9 after a checkpoint, `--resume`, and the final weights equal an uninterrupted run's.
#[test]
fn killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one() {
    let epochs = ["--epochs", "6", "--synthetic-interactions", "20000"];
    let reference = tempfile::tempdir().unwrap();
    train(reference.path(), &epochs);

    let dir = tempfile::tempdir().unwrap();
    // If the run ever finished before the kill, the assertion below fails loudly rather than
    // testing nothing.
    let mut child =
        trainer(&train_args(dir.path(), &epochs)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_checkpoint(dir.path(), 2, &mut child);
    assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(newest_checkpoint_epoch(dir.path()).is_some_and(|e| e >= 2), "the checkpoints survive the kill");
    assert!(!dir.path().join("content-based/versions").exists(), "a killed run publishes nothing");

    let run_dir = std::fs::read_dir(dir.path().join("content-based/runs")).unwrap().next().unwrap().unwrap().path();
    let run_id = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    let out = trainer(&["train", "--output", dir.path().to_str().unwrap(), "--resume", &run_id, "--no-progress"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resumed from checkpoint"), "{stderr}");

    let resumed = only_version(dir.path());
    assert_same_tensors(
        &tensors(&only_version(reference.path()).join("weights.safetensors")),
        &tensors(&resumed.join("weights.safetensors")),
    );
    assert_eq!(
        metadata(&only_version(reference.path()))["training_history"]["loss"],
        metadata(&resumed)["training_history"]["loss"]
    );
}

/// The newest checkpoint's completed epochs, over every run in `dir`.
fn newest_checkpoint_epoch(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir.join("content-based/runs"))
        .ok()?
        .flatten()
        .flat_map(|run| std::fs::read_dir(run.path().join("checkpoints")).into_iter().flatten().flatten())
        .filter_map(|f| audotics_trainer::checkpoint::position_of(f.file_name().to_str()?))
        .map(|(epoch, _)| epoch)
        .max()
}

/// Polls the run's checkpoint folder (the observable effect of the epoch) until a checkpoint of
/// epoch `epoch` or later exists (older ones are pruned), failing if the process exits first or
/// two minutes pass.
fn wait_for_checkpoint(dir: &Path, epoch: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while newest_checkpoint_epoch(dir).is_none_or(|e| e < epoch) {
        assert!(child.try_wait().unwrap().is_none(), "the run exited before writing checkpoint {epoch}");
        assert!(Instant::now() < deadline, "no checkpoint {epoch} within two minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn resuming_an_unknown_run_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        trainer(&["train", "--output", dir.path().to_str().unwrap(), "--resume", "no-such-run"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("cannot resume run no-such-run"), "{stderr}");
}

#[test]
fn cosine_loss_collapses_while_contrastive_does_not() {
    let (cos, con) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(cos.path(), &["--epochs", "4", "--loss", "cosine"]);
    train(con.path(), &["--epochs", "4"]);
    let spread = |dir: &Path| -> f64 {
        let m = metadata(&only_version(dir));
        *m["training_history"]["mean_pairwise_cosine"].as_array().unwrap().last().unwrap().as_f64().as_ref().unwrap()
    };
    let (collapsed, healthy) = (spread(cos.path()), spread(con.path()));
    // A random initialisation already has a large common component (mean cosine ≈ 0.98 here); the
    // cosine objective squeezes what is left to nothing, the contrastive one keeps it.
    assert!(collapsed > 0.999, "cosine objective: mean pairwise cosine {collapsed}");
    assert!(1.0 - healthy > 10.0 * (1.0 - collapsed), "contrastive {healthy} vs cosine {collapsed}");
}
