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
    // Models trained for seconds are for testing the machinery: the floors are recorded, not
    // enforced (the floor test sets them on).
    ("--quality-floors", "false"),
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
        "best_epoch",
        "stop_reason",
        "quality_gate",
    ] {
        assert!(meta.get(key).is_some(), "metadata lacks {key}");
    }
    assert_eq!(meta["model_type"], "content-based");
    assert_eq!(meta["data"]["synthetic"], true);
    assert_eq!(meta["model_version"].as_str().unwrap(), version.file_name().unwrap().to_str().unwrap());
    let names: Vec<&str> = meta["feature_names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, audotics_trainer::data::features::FEATURE_NAMES);
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

    // A checkpoint per epoch under the run, of which the newest two (--keep-checkpoints) are kept,
    // and the best epoch's (the published weights).
    let best = meta["best_epoch"].as_u64().unwrap() as usize;
    assert!((1..=3).contains(&best), "{best}");
    let runs: Vec<PathBuf> =
        std::fs::read_dir(dir.path().join("content-based/runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 1);
    let mut checkpoints: Vec<String> = std::fs::read_dir(runs[0].join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    checkpoints.sort();
    let mut expected: Vec<String> = [best, 2, 3].iter().map(|e| format!("epoch-{e:04}.safetensors")).collect();
    expected.sort();
    expected.dedup();
    assert_eq!(checkpoints, expected);
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
    kill_after_checkpoint(dir.path(), &epochs, 2);
    assert!(newest_checkpoint_epoch(dir.path()).is_some_and(|e| e >= 2), "the checkpoints survive the kill");
    assert!(!dir.path().join("content-based/versions").exists(), "a killed run publishes nothing");

    let out = resume_only_run(dir.path());
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

/// Starts `train` with `flags` and SIGKILLs it once the checkpoint of epoch `epoch` exists; fails
/// loudly if the run finished first (rather than testing nothing).
fn kill_after_checkpoint(dir: &Path, flags: &[&str], epoch: usize) {
    let mut child = trainer(&train_args(dir, flags)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_checkpoint(dir, epoch, &mut child);
    assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `train --resume` of the one run in `dir`, with its stored settings (floors recorded, not enforced).
fn resume_only_run(dir: &Path) -> Output {
    let run_dir = std::fs::read_dir(dir.join("content-based/runs")).unwrap().next().unwrap().unwrap().path();
    let run_id = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    let output = dir.to_str().unwrap();
    let args = ["train", "--output", output, "--resume", &run_id, "--no-progress", "--quality-floors", "false"];
    trainer(&args).output().unwrap()
}

/// The newest checkpoint's completed epochs, over every run in `dir`.
fn newest_checkpoint_epoch(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir.join("content-based/runs"))
        .ok()?
        .flatten()
        .flat_map(|run| std::fs::read_dir(run.path().join("checkpoints")).into_iter().flatten().flatten())
        .filter_map(|f| audotics_trainer::training::checkpoint::position_of(f.file_name().to_str()?))
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

/// Early stopping and best-epoch selection on a real run: the run stops `patience` epochs after its
/// best Recall@10, publishes that epoch's figures, and a run killed part-way and resumed stops at the
/// same epoch with the same weights.
#[test]
fn early_stopping_publishes_the_best_epoch_and_a_resumed_run_stops_at_the_same_epoch() {
    // Patience 2 and a high learning rate: the curve peaks and the run stops well before 60.
    let flags = ["--epochs", "60", "--patience", "2", "--synthetic-interactions", "40000", "--learning-rate", "0.01"];
    let reference = tempfile::tempdir().unwrap();
    train(reference.path(), &flags);
    let meta = metadata(&only_version(reference.path()));
    assert_eq!(meta["stop_reason"], "early_stopping", "{}", meta["training_history"]["recall_at_10"]);
    let curve: Vec<f64> =
        meta["training_history"]["recall_at_10"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let (trained, best) =
        (meta["epochs_completed"].as_u64().unwrap() as usize, meta["best_epoch"].as_u64().unwrap() as usize);
    assert_eq!(curve.len(), trained);
    assert_eq!(trained, best + 2, "stopped two epochs (the patience) after the best: {curve:?}");
    let max = curve.iter().cloned().fold(f64::MIN, f64::max);
    assert_eq!(curve[best - 1], max, "the best epoch has the best Recall@10: {curve:?}");
    assert!(curve[trained - 1] <= max);
    assert_eq!(
        meta["final_metrics"]["recall_at_10"].as_f64().unwrap(),
        max,
        "the published figures are the best epoch's"
    );

    let dir = tempfile::tempdir().unwrap();
    kill_after_checkpoint(dir.path(), &flags, 1);
    let out = resume_only_run(dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = metadata(&only_version(dir.path()));
    assert_eq!(
        (resumed["epochs_completed"].clone(), resumed["best_epoch"].clone()),
        (meta["epochs_completed"].clone(), meta["best_epoch"].clone())
    );
    assert_same_tensors(
        &tensors(&only_version(reference.path()).join("weights.safetensors")),
        &tensors(&only_version(dir.path()).join("weights.safetensors")),
    );
    eprintln!("figures: stopped after {trained} epochs, best epoch {best}; curve {curve:?}");
}

/// A model that does not beat popularity is not published, even as the model's first version: the
/// run says which floor failed, with the figures, and exits 4.
#[test]
fn a_model_that_loses_to_popularity_is_not_published_even_as_the_first_version() {
    let dir = tempfile::tempdir().unwrap();
    // One epoch at a learning rate too small to move the weights: an untrained encoder.
    let flags = ["--epochs", "1", "--learning-rate", "0.0000001", "--quality-floors", "true"];
    let out = trainer(&train_args(dir.path(), &flags)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("not published") && stdout.contains("popularity's"), "{stdout}");
    assert!(!dir.path().join("content-based/versions").exists(), "nothing is uploaded");
    assert!(!dir.path().join("content-based/latest.json").exists());
    eprintln!(
        "figures: {}",
        stdout.lines().filter(|l| !l.trim_start().starts_with("not")).collect::<Vec<_>>().join(" / ")
    );
}

/// Every version directory under `<dir>/content-based/versions/`, oldest first (names sort by time).
fn versions(dir: &Path) -> Vec<PathBuf> {
    let mut versions: Vec<PathBuf> =
        std::fs::read_dir(dir.join("content-based/versions")).unwrap().map(|e| e.unwrap().path()).collect();
    versions.sort();
    versions
}

/// `(indices, cosines)` of a version's neighbour table, row by row.
fn neighbour_rows(version: &Path) -> Vec<Vec<(u32, f32)>> {
    let t = tensors(&version.join("neighbours.safetensors"));
    let (n, k) = t["indices"].dims2().unwrap();
    let idx: Vec<u32> = t["indices"].flatten_all().unwrap().to_vec1().unwrap();
    let cos: Vec<f32> = t["cosines"].flatten_all().unwrap().to_vec1().unwrap();
    (0..n).map(|r| (0..k).map(|s| (idx[r * k + s], cos[r * k + s])).collect()).collect()
}

#[test]
fn each_version_lists_every_tracks_neighbours_exact_or_approximate_and_how_far_they_moved() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), &["--epochs", "2", "--neighbours", "20"]);
    let first = only_version(dir.path());
    let emb = &tensors(&first.join("embeddings.safetensors"))["embeddings"];
    let (n, e) = emb.dims2().unwrap();
    let z: Vec<f32> = emb.flatten_all().unwrap().to_vec1().unwrap();
    let rows = neighbour_rows(&first);
    assert_eq!((rows.len(), rows[0].len()), (n, 20));
    // Brute force in f64: every other track, cosine descending, then lower row.
    for (t, got) in rows.iter().enumerate() {
        let mut all: Vec<(u32, f64)> = (0..n)
            .filter(|&j| j != t)
            .map(|j| (j as u32, (0..e).map(|d| z[t * e + d] as f64 * z[j * e + d] as f64).sum()))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (slot, (&(i, c), &(wi, wc))) in got.iter().zip(&all).enumerate() {
            assert!((c as f64 - wc).abs() < 1e-5, "track {t} slot {slot}: cosine {c} vs {wc}");
            // The same track, unless another has the same cosine to f32 precision.
            let near_tie = all.iter().any(|&(j, x)| j == i && (x - wc).abs() < 1e-5);
            assert!(i == wi || near_tie, "track {t} slot {slot}: {i} vs {wi}");
        }
    }
    let meta = metadata(&first);
    assert_eq!(meta["neighbours"]["k"], 20);
    assert_eq!(meta["neighbours"]["tracks_listed"], n as u64);
    assert!(meta["neighbours"].get("parent_version").is_none(), "a first version has no parent");

    assert_eq!(meta["neighbours"]["method"], "exact");

    // Another model of the same catalogue, its table approximate (HNSW): it finds (almost) every
    // exact neighbour, and the card and metadata say how far the lists moved.
    train(dir.path(), &["--epochs", "1", "--neighbours", "20", "--neighbour-index", "approximate"]);
    let second = versions(dir.path()).pop().unwrap();
    let meta = metadata(&second);
    assert_eq!(meta["neighbours"]["method"], "hnsw", "{:#}", meta["neighbours"]);
    assert_eq!(meta["neighbours"]["hnsw"]["connections"], 24);
    let emb = &tensors(&second.join("embeddings.safetensors"))["embeddings"];
    let z: Vec<f32> = emb.flatten_all().unwrap().to_vec1().unwrap();
    let (mut found, approx) = (0usize, neighbour_rows(&second));
    for (t, got) in approx.iter().enumerate() {
        let mut all: Vec<(u32, f32)> =
            (0..n).filter(|&j| j != t).map(|j| (j as u32, (0..e).map(|d| z[t * e + d] * z[j * e + d]).sum())).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        found += all[..10].iter().filter(|(i, _)| got[..10].iter().any(|(j, _)| j == i)).count();
        assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "track {t}: cosines out of order");
    }
    let recall = found as f64 / (10 * n) as f64;
    assert!(recall >= 0.99, "the approximate table's recall@10 {recall}");
    eprintln!("figures: approximate table recall@10 {recall:.4} over {n} tracks");
    assert_eq!(meta["neighbours"]["parent_version"].as_str().unwrap(), first.file_name().unwrap().to_str().unwrap());
    assert_eq!(meta["neighbours"]["tracks_compared"], n as u64);
    let (a, b) = (neighbour_rows(&first), neighbour_rows(&second));
    let jaccard: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            let both = x[..10].iter().filter(|(i, _)| y[..10].iter().any(|(j, _)| j == i)).count();
            both as f64 / (20 - both) as f64
        })
        .sum::<f64>()
        / n as f64;
    let reported = meta["neighbours"]["jaccard_at_10_vs_parent"].as_f64().unwrap();
    assert!((reported - jaccard).abs() < 1e-9, "reported {reported}, recomputed {jaccard}");
    assert!(jaccard > 0.0 && jaccard < 1.0, "one more epoch moves some lists, not all: {jaccard}");
    let card = std::fs::read_to_string(second.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains(&format!("mean Jaccard@10 {jaccard:.3}")), "{card}");
    assert!(card.contains("approximate: the candidates an HNSW graph"), "{card}");

    // K = 0: no table.
    train(dir.path(), &["--epochs", "1", "--neighbours", "0"]);
    let third = versions(dir.path()).pop().unwrap();
    assert!(!third.join("neighbours.safetensors").exists());
    assert!(metadata(&third).get("neighbours").is_none());
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_warm_start_begins_at_the_parents_weights_keeps_its_statistics_and_grows_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let hybrid = ["--model-kind", "hybrid", "--warm-start", "auto", "--epochs", "2"];
    train(dir.path(), &hybrid);
    let first = only_version(dir.path());
    let lineage = &metadata(&first)["lineage"];
    assert_eq!(
        (lineage["mode"].as_str(), lineage["reason"].as_str()),
        (Some("full"), Some("the first version of this model"))
    );

    // Learning rates of 1e-12: whatever the run ends with is where it started, to float precision.
    // A warm start begins at the parent's weights; a full run would begin at a seeded initialisation.
    let frozen = ["--learning-rate", "1e-12", "--table-learning-rate", "1e-12", "--epochs", "1"];
    train(dir.path(), &[&hybrid[..4], &frozen[..]].concat());
    let second = versions(dir.path()).pop().unwrap();
    let meta = metadata(&second);
    assert_eq!(meta["lineage"]["mode"], "warm", "{:#}", meta["lineage"]);
    assert_eq!(meta["lineage"]["parent_version"].as_str().unwrap(), first.file_name().unwrap().to_str().unwrap());
    assert_eq!(meta["lineage"]["versions_since_full"], 1);
    let (parent, child) = (tensors(&first.join("weights.safetensors")), tensors(&second.join("weights.safetensors")));
    for name in ["dense.kernel", "dense_2.kernel", "track_embedding.embeddings", "artist_embedding.embeddings"] {
        let (a, b) = (floats(&parent[name]), floats(&child[name]));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "{name} moved {worst} from the parent's");
        assert!(a.iter().any(|&x| x != 0.0), "{name} of the parent is not trivially zero");
    }
    assert_eq!(meta["feature_means"], metadata(&first)["feature_means"]);

    // A catalogue grown by 100 tracks (the generator draws the first 800 exactly as before): the
    // lineage's standardisation stays, the known tracks' rows carry over, the new ones are new.
    train(dir.path(), &[&hybrid[..], &["--synthetic-tracks", "900"][..]].concat());
    let third = versions(dir.path()).pop().unwrap();
    let meta = metadata(&third);
    assert_eq!(meta["lineage"]["mode"], "warm");
    assert_eq!(meta["lineage"]["versions_since_full"], 2);
    assert_eq!(meta["feature_means"], metadata(&first)["feature_means"], "the statistics are the lineage's");
    assert_eq!(meta["feature_stds"], metadata(&first)["feature_stds"]);
    let carried = &meta["lineage"]["carried_over"];
    assert_eq!(carried[0]["table"], "track_embedding");
    assert_eq!((carried[0]["copied_rows"].as_u64(), carried[0]["new_rows"].as_u64()), (Some(800), Some(100)));
    assert!(carried[1]["copied_rows"].as_u64().unwrap() > 0, "artists carry over by name: {carried:#}");

    // Another kind cannot be a parent: a full retrain, and it says why.
    train(dir.path(), &["--model-kind", "collaborative", "--warm-start", "auto", "--epochs", "1"]);
    let fourth = versions(dir.path()).pop().unwrap();
    let lineage = &metadata(&fourth)["lineage"];
    assert_eq!(lineage["mode"], "full");
    assert!(lineage["reason"].as_str().unwrap().contains("is a hybrid model"), "{lineage:#}");
}

/// kill -9 inside a warm run, `--resume`: the same weights as the uninterrupted warm run, which
/// read the same parent (the resumed run's parent comes from its run.json, not from latest.json).
#[test]
fn a_killed_warm_run_resumes_to_the_same_weights_as_an_uninterrupted_one() {
    let first = ["--warm-start", "auto", "--epochs", "2", "--synthetic-interactions", "20000"];
    let warm = ["--warm-start", "auto", "--epochs", "6", "--patience", "0", "--synthetic-interactions", "20000"];
    let reference = tempfile::tempdir().unwrap();
    train(reference.path(), &first);
    train(reference.path(), &warm);

    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), &first);
    // The first run checkpointed epochs 1 and 2: wait for the warm run's third.
    kill_after_checkpoint(dir.path(), &warm, 3);
    let run = std::fs::read_dir(dir.path().join("content-based/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|run| {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
            record["lineage"]["mode"] == "warm"
        })
        .expect("the killed run recorded its warm plan");
    let run_id = run.file_name().unwrap().to_str().unwrap();
    let output = dir.path().to_str().unwrap();
    let args = ["train", "--output", output, "--resume", run_id, "--no-progress", "--quality-floors", "false"];
    let out = trainer(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("resumed from checkpoint"), "{stderr}");

    let (want, got) = (versions(reference.path()).pop().unwrap(), versions(dir.path()).pop().unwrap());
    assert_eq!(metadata(&got)["lineage"]["mode"], "warm");
    assert_same_tensors(&tensors(&want.join("weights.safetensors")), &tensors(&got.join("weights.safetensors")));
    assert_eq!(metadata(&want)["training_history"]["loss"], metadata(&got)["training_history"]["loss"]);
}

/// `train --refresh`: no epoch; the tracks added since the latest version get the embedding its
/// weights give them (recomputed here from its weights file and statistics), and every other row is
/// the parent's, bit for bit.
#[test]
fn a_refresh_embeds_exactly_the_new_tracks_and_keeps_every_other_row() {
    use audotics_trainer::training::model::{Encoder, EncoderConfig};
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), &["--epochs", "2"]);
    let parent = only_version(dir.path());
    // 850 tracks: the generator draws the first 800 exactly as before, then 50 new ones.
    let out = train(dir.path(), &["--refresh", "--synthetic-tracks", "850", "--embedding-size", "8"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("epoch finished"), "a refresh trains nothing: {stderr}");
    let child = versions(dir.path()).pop().unwrap();
    let meta = metadata(&child);
    assert_eq!(meta["lineage"]["mode"], "refresh");
    assert_eq!(meta["lineage"]["new_tracks"], 50);
    assert_eq!(meta["epochs_completed"], 0);
    assert_eq!(meta["embedding_size"], 16, "the parent's settings, not the flags (--embedding-size 8)");
    assert_same_tensors(&tensors(&parent.join("weights.safetensors")), &tensors(&child.join("weights.safetensors")));

    let old = floats(&tensors(&parent.join("embeddings.safetensors"))["embeddings"]);
    let new = floats(&tensors(&child.join("embeddings.safetensors"))["embeddings"]);
    let ids = |m: &serde_json::Value| -> Vec<String> { serde_json::from_value(m["track_ids"].clone()).unwrap() };
    let (old_ids, new_ids) = (ids(&metadata(&parent)), ids(&meta));
    let e = 16;
    let spec = audotics_trainer::data::source::SyntheticSpec {
        tracks: 850,
        users: 120,
        interactions: 8000,
        ..Default::default()
    };
    let catalogue = audotics_trainer::data::synthetic::generate(&spec).catalogue;
    assert!(catalogue.track_ids == new_ids, "the refresh's catalogue is the generator's");
    let parent_meta = metadata(&parent);
    let stats = |key: &str| -> [f32; 11] { serde_json::from_value(parent_meta[key].clone()).unwrap() };
    let standardizer =
        audotics_trainer::data::features::Standardizer { means: stats("feature_means"), stds: stats("feature_stds") };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let encoder = Encoder::new(
        EncoderConfig { embedding_size: e, dropout: 0.2 },
        &mut rng,
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    encoder.load(&tensors(&parent.join("weights.safetensors"))).unwrap();
    let mut fresh = 0;
    for (t, id) in new_ids.iter().enumerate() {
        let row = &new[t * e..(t + 1) * e];
        match old_ids.iter().position(|o| o == id) {
            Some(p) => assert!(row == &old[p * e..(p + 1) * e], "track {id}: not the parent's row"),
            None => {
                fresh += 1;
                let x = Tensor::from_vec(standardizer.apply(&catalogue.features[t]).to_vec(), (1, 11), &Device::Cpu)
                    .unwrap();
                let want = floats(&encoder.embed(&x).unwrap());
                let worst = want.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-5, "new track {id}: {worst} from the parent's encoder");
            }
        }
    }
    assert_eq!(fresh, 50);
}

/// `adam_step` of a checkpoint file.
fn adam_step(checkpoint: &Path) -> u64 {
    let bytes = std::fs::read(checkpoint).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    header.metadata().as_ref().unwrap()["adam_step"].parse().unwrap()
}

/// The checkpoint of `epoch` of the run that published `version`.
fn checkpoint_of(dir: &Path, version: &Path, epoch: u64) -> PathBuf {
    let run = metadata(version)["run_id"].as_str().unwrap().to_string();
    dir.join(format!("content-based/runs/{run}/checkpoints/epoch-{epoch:04}.safetensors"))
}

/// `--warm-optimizer carried` through a refresh: the warm run's Adam continues the step count of the
/// epoch whose weights it starts from (the refresh's parent's best), which retention kept; `fresh`
/// starts it at zero.
#[test]
fn a_carried_optimizer_continues_the_adam_of_the_run_behind_the_parents_weights() {
    let dir = tempfile::tempdir().unwrap();
    let hybrid = ["--model-kind", "hybrid", "--warm-start", "auto"];
    train(dir.path(), &[&hybrid[..], &["--epochs", "3"]].concat());
    let trained = only_version(dir.path());
    let best = metadata(&trained)["best_epoch"].as_u64().unwrap();
    train(dir.path(), &[&hybrid[..], &["--refresh"]].concat());
    let refreshed = versions(dir.path()).pop().unwrap();
    assert_eq!(metadata(&refreshed)["lineage"]["mode"], "refresh");
    let parent_steps = adam_step(&checkpoint_of(dir.path(), &trained, best));
    assert!(parent_steps > 0);

    train(dir.path(), &[&hybrid[..], &["--epochs", "1", "--warm-optimizer", "carried"]].concat());
    let carried = versions(dir.path()).pop().unwrap();
    let lineage = &metadata(&carried)["lineage"];
    assert_eq!(lineage["parent_version"].as_str(), refreshed.file_name().unwrap().to_str());
    let run = metadata(&trained)["run_id"].as_str().unwrap().to_string();
    let name = trained.file_name().unwrap().to_str().unwrap();
    assert_eq!(lineage["optimizer_from"], format!("run {run}'s epoch {best} (version {name})"), "{lineage:#}");
    let card = std::fs::read_to_string(carried.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("Adam's moments and step counts carried over from run"), "{card}");
    // Read now: the next publish's retention deletes this run's checkpoints.
    let carried_steps = adam_step(&checkpoint_of(dir.path(), &carried, 1));

    train(dir.path(), &[&hybrid[..], &["--epochs", "1", "--warm-optimizer", "fresh"]].concat());
    let fresh = versions(dir.path()).pop().unwrap();
    assert!(metadata(&fresh)["lineage"].get("optimizer_from").is_none());
    let epoch_steps = adam_step(&checkpoint_of(dir.path(), &fresh, 1));
    assert!(epoch_steps > 0);
    assert_eq!(carried_steps, parent_steps + epoch_steps);

    // The checkpoint gone (deleted by hand): the warm run still trains, Adam fresh, and says why.
    let fresh_run = metadata(&fresh)["run_id"].as_str().unwrap().to_string();
    std::fs::remove_dir_all(dir.path().join(format!("content-based/runs/{fresh_run}/checkpoints"))).unwrap();
    let out = train(dir.path(), &[&hybrid[..], &["--epochs", "1", "--warm-optimizer", "carried"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is gone; Adam starts fresh"), "{stderr}");
    let last = versions(dir.path()).pop().unwrap();
    assert_eq!(metadata(&last)["lineage"]["mode"], "warm");
    assert!(metadata(&last)["lineage"].get("optimizer_from").is_none());
}
