//! `audotics-trainer bench`: training throughput and peak memory on synthetic data of a given size.
//! Each configuration trains a few epochs; the figure is the median pairs/s of the epochs after the
//! first (the first pays for allocation warm-up). Evaluation time is excluded from pairs/s.
//!
//! Two additions serve the side-by-side comparison with a TensorFlow port of the platform's old
//! trainer (`bench/tf/`):
//!
//! - `--export-dir DIR` writes the exact inputs this configuration trains on — standardised features,
//!   each epoch's pairs in the order the trainer consumes them, `log q`, the evaluation set — plus the
//!   initial weights and reference values (losses, gradients and one Adam step on the first batch,
//!   Recall@10 of the raw features and of the initial model) that the port is checked against. It
//!   writes `.npy` files and `export.json`, then exits without training.
//! - `--time-budget-seconds S` trains until S seconds of training (batches only: per-epoch pair
//!   sampling and evaluation excluded) are spent, stops at that batch boundary, and reports the
//!   model's Recall@10 at that point with the pairs/s over the whole run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde::Serialize;
use serde_json::json;

use crate::data::synthetic::{self, SyntheticSpec};
use crate::device::{self, DeviceChoice};
use crate::features::NUM_FEATURES;
use crate::loss::{self, LossConfig, LossKind};
use crate::model::{self, DropoutMasks, EncoderConfig};
use crate::pairs::{DEFAULT_POSITIVE_KINDS, PairSampler, SamplingConfig};
use crate::procstat;
use crate::train::{Control, EpochMetrics, PreparedData, TrainConfig, TrainObserver, Trainer, TrainingState};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, env = "AUDOTICS_BENCH_TRACKS", default_value_t = 10_000)]
    pub tracks: usize,
    #[arg(long, env = "AUDOTICS_BENCH_USERS", default_value_t = 1_000)]
    pub users: usize,
    #[arg(long, env = "AUDOTICS_BENCH_INTERACTIONS", default_value_t = 100_000)]
    pub interactions: usize,
    /// Batch sizes to measure (comma-separated).
    #[arg(long, env = "AUDOTICS_BENCH_BATCH_SIZES", value_delimiter = ',', default_values_t = [64usize, 1024])]
    pub batch_sizes: Vec<usize>,
    /// Objectives to measure (comma-separated).
    #[arg(long, env = "AUDOTICS_BENCH_LOSSES", value_enum, value_delimiter = ',', default_values_t = [LossKind::Contrastive])]
    pub losses: Vec<LossKind>,
    /// Epochs per configuration (at least 2: the first is not counted). With --time-budget-seconds,
    /// the most epochs to train; with --export-dir, the epochs whose pairs are written.
    #[arg(long, env = "AUDOTICS_BENCH_EPOCHS", default_value_t = 3)]
    pub epochs: usize,
    /// Pairs per epoch at most (a uniform sample), so large datasets measure in minutes (0 = all).
    #[arg(long, env = "AUDOTICS_BENCH_MAX_PAIRS_PER_EPOCH", default_value_t = 200_000)]
    pub max_pairs_per_epoch: usize,
    #[arg(long, env = "AUDOTICS_BENCH_EMBEDDING_SIZE", default_value_t = 64)]
    pub embedding_size: usize,
    #[arg(long, env = "AUDOTICS_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    #[arg(long, env = "AUDOTICS_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Write this configuration's exact training inputs (features, every epoch's pairs, log q, the
    /// evaluation set, initial weights, reference values) as .npy files and export.json to DIR for
    /// bench/tf/old_trainer.py, then exit without training. One batch size and one loss only.
    #[arg(long, value_name = "DIR")]
    pub export_dir: Option<PathBuf>,
    /// Train until S seconds of training (batches only; pair sampling and per-epoch evaluation are
    /// not counted) are spent or --epochs are done, stop at that batch boundary, and add Recall@10
    /// of the model at that point and the pairs/s of the whole run to the result.
    #[arg(long, value_name = "S")]
    pub time_budget_seconds: Option<f64>,
}

/// One measured configuration.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct BenchResult {
    pub tracks: usize,
    pub users: usize,
    pub interactions: usize,
    pub loss: String,
    pub batch_size: usize,
    pub device: String,
    pub cpu_threads: usize,
    pub pairs_per_epoch: usize,
    /// Median over the completed epochs after the first; with a time budget that ended before two
    /// epochs completed, the rate of the whole run instead.
    pub median_pairs_per_second: f64,
    pub cpu_seconds_per_million_pairs: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// Present only with `--time-budget-seconds`.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetResult>,
}

/// What a run under `--time-budget-seconds` reached.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct BudgetResult {
    pub time_budget_seconds: f64,
    /// Seconds spent in training batches (the budgeted time).
    pub train_seconds: f64,
    pub trained_pairs: usize,
    /// `trained_pairs / train_seconds`.
    pub pairs_per_second: f64,
    /// Epochs completed; a stop inside an epoch counts that epoch as a fraction.
    pub epochs_trained: f64,
    pub recall_at_10: f64,
    pub ndcg_at_10: f64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = args.export_dir.clone() {
        anyhow::ensure!(
            args.batch_sizes.len() == 1 && args.losses.len() == 1,
            "--export-dir writes one configuration: give one --batch-sizes and one --losses"
        );
        anyhow::ensure!(args.epochs >= 1, "--epochs must be at least 1");
        let summary = tokio::task::spawn_blocking(move || export(&args, &dir)).await??;
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    match args.time_budget_seconds {
        Some(s) => anyhow::ensure!(s >= 0.0 && args.epochs >= 1, "a time budget needs S ≥ 0 and --epochs ≥ 1"),
        None => anyhow::ensure!(args.epochs >= 2, "--epochs must be at least 2 (the first epoch is warm-up)"),
    }
    // Peak memory is per process (and the allocator keeps freed pages), so each configuration runs
    // in a fresh child process of this binary; a single configuration runs here.
    let results = if args.batch_sizes.len() * args.losses.len() == 1 {
        tokio::task::spawn_blocking(move || measure(&args)).await??
    } else {
        let mut results = Vec::new();
        for &loss in &args.losses {
            for &batch in &args.batch_sizes {
                results.push(measure_in_child(&args, loss, batch).await?);
            }
        }
        results
    };
    print_table(results.iter());
    if results.iter().any(|r| r.budget.is_some()) {
        print_budget_table(results.iter());
    }
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure_in_child(args: &BenchArgs, loss: LossKind, batch: usize) -> anyhow::Result<BenchResult> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("bench")
        .args(["--tracks", &args.tracks.to_string(), "--users", &args.users.to_string()])
        .args(["--interactions", &args.interactions.to_string(), "--epochs", &args.epochs.to_string()])
        .args(["--batch-sizes", &batch.to_string(), "--losses", &loss.to_string()])
        .args(["--max-pairs-per-epoch", &args.max_pairs_per_epoch.to_string()])
        .args(["--embedding-size", &args.embedding_size.to_string(), "--seed", &args.seed.to_string()])
        .args(["--device", &format!("{:?}", args.device).to_lowercase()])
        .stderr(std::process::Stdio::inherit());
    if let Some(s) = args.time_budget_seconds {
        cmd.args(["--time-budget-seconds", &s.to_string()]);
    }
    let out = cmd.output().await?;
    anyhow::ensure!(out.status.success(), "benchmark of batch {batch} / {loss} failed");
    let stdout = String::from_utf8(out.stdout)?;
    let line =
        stdout.lines().find(|l| l.starts_with('{')).ok_or_else(|| anyhow::anyhow!("no result from the child"))?;
    Ok(serde_json::from_str(line)?)
}

fn print_table<'a>(results: impl Iterator<Item = &'a BenchResult>) {
    println!(
        "| tracks | users | interactions | loss | batch | device | threads | pairs/epoch | pairs/s (median) | CPU-s per 1M pairs | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |",
            r.tracks,
            r.users,
            r.interactions,
            r.loss,
            r.batch_size,
            r.device,
            r.cpu_threads,
            r.pairs_per_epoch,
            r.median_pairs_per_second,
            r.cpu_seconds_per_million_pairs.map_or("n/a".into(), |v| format!("{v:.1}")),
            r.peak_rss_mib.map_or("n/a".into(), |v| format!("{v:.0}")),
        );
    }
}

fn print_budget_table<'a>(results: impl Iterator<Item = &'a BenchResult>) {
    println!();
    println!("| loss | batch | budget s | trained s | pairs trained | epochs | pairs/s | Recall@10 | NDCG@10 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let Some(b) = &r.budget else { continue };
        println!(
            "| {} | {} | {} | {:.1} | {} | {:.2} | {:.0} | {:.4} | {:.4} |",
            r.loss,
            r.batch_size,
            b.time_budget_seconds,
            b.train_seconds,
            b.trained_pairs,
            b.epochs_trained,
            b.pairs_per_second,
            b.recall_at_10,
            b.ndcg_at_10
        );
    }
}

/// The training settings `bench` measures (the trainer's defaults, bar the sizes and the pair cap).
fn train_config(args: &BenchArgs, loss: LossKind, batch_size: usize) -> TrainConfig {
    TrainConfig {
        epochs: args.epochs,
        batch_size,
        validation_split: 0.2,
        learning_rate: 1e-3,
        encoder: EncoderConfig { embedding_size: args.embedding_size, dropout: 0.2 },
        loss: LossConfig { kind: loss, temperature: 0.05, logq_correction: true, centering_weight: 1.0 },
        sampling: SamplingConfig { max_pairs_per_epoch: args.max_pairs_per_epoch, ..SamplingConfig::default() },
        positive_kinds: DEFAULT_POSITIVE_KINDS.map(String::from).to_vec(),
        seed: args.seed,
        eval_users: 2_000,
        max_validation_pairs: 20_000,
    }
}

fn synthetic_dataset(args: &BenchArgs) -> crate::data::Dataset {
    let spec = SyntheticSpec {
        tracks: args.tracks,
        users: args.users,
        interactions: args.interactions,
        seed: args.seed,
        ..SyntheticSpec::default()
    };
    synthetic::generate(&spec)
}

/// Measures every configuration of `args` in this process.
fn measure(args: &BenchArgs) -> anyhow::Result<Vec<BenchResult>> {
    let device = device::select(args.device)?;
    let dataset = synthetic_dataset(args);
    let mut results = Vec::new();
    for &loss in &args.losses {
        for &batch_size in &args.batch_sizes {
            let config = train_config(args, loss, batch_size);
            let data = PreparedData::new(&dataset, &config, &device)?;
            let trainer = Trainer::new(&config, &data)?;
            let mut state = TrainingState::new(&config, &device)?;
            let mut recorder = Recorder { budget_seconds: args.time_budget_seconds, ..Recorder::default() };
            trainer.run(&mut state, &mut recorder)?;
            let budget = match args.time_budget_seconds {
                Some(seconds) => {
                    let ranking = trainer.evaluate(&state.encoder.embed(&data.features)?)?;
                    let train_seconds = recorder.clock.elapsed();
                    let pairs_per_epoch = trainer.pairs_per_epoch().max(1) as f64;
                    let partial = state.cursor.as_ref().map_or(0.0, |c| c.trained as f64 / pairs_per_epoch);
                    Some(BudgetResult {
                        time_budget_seconds: seconds,
                        train_seconds,
                        trained_pairs: recorder.clock.pairs,
                        pairs_per_second: recorder.clock.pairs as f64 / train_seconds.max(1e-9),
                        epochs_trained: state.epoch as f64 + partial,
                        recall_at_10: ranking.recall_at_10,
                        ndcg_at_10: ranking.ndcg_at_10,
                    })
                }
                None => None,
            };
            let later = recorder.epochs.get(1..).unwrap_or_default();
            let mut rates: Vec<f64> = later.iter().map(|m| m.pairs_per_second).collect();
            rates.sort_by(f64::total_cmp);
            let median_pairs_per_second = match (rates.get(rates.len() / 2), &budget) {
                (Some(&median), _) => median,
                (None, Some(b)) => b.pairs_per_second,
                (None, None) => anyhow::bail!("no epoch after the first was measured"),
            };
            let cpu: Option<f64> =
                if later.is_empty() { None } else { later.iter().map(|m| m.train_cpu_seconds).sum() };
            let pairs: usize = later.iter().map(|m| m.pairs).sum();
            let result = BenchResult {
                tracks: args.tracks,
                users: args.users,
                interactions: args.interactions,
                loss: loss.to_string(),
                batch_size,
                device: device::describe(&device),
                cpu_threads: candle_core::utils::get_num_threads(),
                pairs_per_epoch: trainer.pairs_per_epoch(),
                median_pairs_per_second,
                cpu_seconds_per_million_pairs: cpu.map(|c| c / pairs as f64 * 1e6),
                peak_rss_mib: procstat::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
                budget,
            };
            tracing::info!(?result, "configuration measured");
            results.push(result);
        }
    }
    Ok(results)
}

/// Seconds spent in training batches: from each epoch's start (its pairs sampled) to its last
/// finished batch, summed over epochs. Evaluation after an epoch is not counted.
#[derive(Default)]
struct TrainClock {
    closed_seconds: f64,
    epoch_started: Option<Instant>,
    last_batch: Option<Instant>,
    pairs: usize,
}

impl TrainClock {
    fn elapsed(&self) -> f64 {
        let open = match (self.epoch_started, self.last_batch) {
            (Some(start), Some(last)) => last.duration_since(start).as_secs_f64(),
            _ => 0.0,
        };
        self.closed_seconds + open
    }
}

#[derive(Default)]
struct Recorder {
    epochs: Vec<EpochMetrics>,
    /// Stop once the training clock reaches this.
    budget_seconds: Option<f64>,
    clock: TrainClock,
}

impl Recorder {
    fn over_budget(&self) -> bool {
        self.budget_seconds.is_some_and(|b| self.clock.elapsed() >= b)
    }
}

impl TrainObserver for Recorder {
    fn epoch_started(&mut self, _epoch: usize, _pairs: usize) {
        let now = Instant::now();
        self.clock.epoch_started = Some(now);
        self.clock.last_batch = Some(now);
    }

    fn batch_finished(&mut self, pairs: usize) -> Control {
        self.clock.pairs += pairs;
        self.clock.last_batch = Some(Instant::now());
        if self.over_budget() { Control::Stop } else { Control::Continue }
    }

    fn epoch_finished(&mut self, _state: &TrainingState, metrics: &EpochMetrics) -> anyhow::Result<Control> {
        self.clock.closed_seconds = self.clock.elapsed();
        self.clock.epoch_started = None;
        self.epochs.push(metrics.clone());
        Ok(if self.over_budget() { Control::Stop } else { Control::Continue })
    }
}

// ---------------------------------------------------------------------------------------------
// Export for the TensorFlow comparison (bench/tf/old_trainer.py reads it).

/// Calls `f(epoch, pairs)` for epochs `1..=epochs` with exactly the pairs [`Trainer::run`] trains
/// on from a fresh [`TrainingState`], without training: the training generator drives both pair
/// sampling and dropout, so its dropout draws are replayed (the same masks, in the same order, for
/// the same batches, skipped batches included) to reach each epoch's generator state.
fn for_each_epoch_pairs(
    config: &TrainConfig,
    data: &PreparedData,
    mut f: impl FnMut(usize, &[[u32; 2]]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let mut rng = TrainingState::new(config, &device)?.rng;
    let sampler = PairSampler::new(config.sampling.clone(), &data.train, data.num_tracks());
    for epoch in 1..=config.epochs {
        let pairs = sampler.sample_epoch(&data.train, &mut rng);
        f(epoch, &pairs)?;
        for start in (0..pairs.len()).step_by(config.batch_size) {
            let len = config.batch_size.min(pairs.len() - start);
            if len < 2 && config.loss.kind == LossKind::Contrastive {
                continue; // the trainer skips it without drawing masks
            }
            DropoutMasks::sample(&config.encoder, 2 * len, &mut rng, &device, DType::F32)?;
        }
    }
    Ok(())
}

/// What `--export-dir` wrote (printed as one JSON line).
#[derive(Debug, Serialize)]
struct ExportSummary {
    export_dir: PathBuf,
    tracks: usize,
    epochs: usize,
    pairs_per_epoch: Vec<usize>,
    eval_users: usize,
    eval_heldout: usize,
}

fn export(args: &BenchArgs, dir: &Path) -> anyhow::Result<ExportSummary> {
    let (loss_kind, batch_size) = (args.losses[0], args.batch_sizes[0]);
    let config = train_config(args, loss_kind, batch_size);
    let device = Device::Cpu;
    let dataset = synthetic_dataset(args);
    let data = PreparedData::new(&dataset, &config, &device)?;
    let trainer = Trainer::new(&config, &data)?;
    std::fs::create_dir_all(dir.join("pairs"))?;
    std::fs::create_dir_all(dir.join("init"))?;
    std::fs::create_dir_all(dir.join("check"))?;
    let n = data.num_tracks();

    let features: Vec<f32> = data.features.flatten_all()?.to_vec1()?;
    write_npy(&dir.join("features.npy"), &[n, NUM_FEATURES], &features)?;
    let logq = loss::log_sampling_probability(&data.track_counts);
    write_npy(&dir.join("logq.npy"), &[n], &logq)?;
    write_npy(&dir.join("track_counts.npy"), &[n], &data.track_counts)?;

    // The evaluation set exactly as EvalSet holds it: the evaluated users, each one's training
    // tracks (the query) and held-out tracks (the targets); both are excluded from the candidates.
    let eval = trainer.eval_set();
    let users: Vec<u32> = eval.users.iter().map(|&u| u as u32).collect();
    write_npy(&dir.join("eval_users.npy"), &[users.len()], &users)?;
    write_csr(dir, "eval_train", eval.users.iter().map(|&u| eval.train.user(u)))?;
    let eval_heldout = write_csr(dir, "eval_heldout", eval.users.iter().map(|&u| eval.heldout.user(u)))?;

    let mut pairs_per_epoch = Vec::with_capacity(config.epochs);
    let mut first_batch: Vec<[u32; 2]> = Vec::new();
    for_each_epoch_pairs(&config, &data, |epoch, pairs| {
        if epoch == 1 {
            first_batch = pairs[..batch_size.min(pairs.len())].to_vec();
        }
        pairs_per_epoch.push(pairs.len());
        let flat: Vec<u32> = pairs.iter().flatten().copied().collect();
        write_npy(&dir.join(format!("pairs/epoch-{epoch:04}.npy")), &[pairs.len(), 2], &flat)
    })?;

    let state = TrainingState::new(&config, &device)?;
    write_tensors(&dir.join("init"), &state.encoder.named_tensors())?;
    let reference = reference_values(&config, &data, &trainer, &first_batch, dir)?;

    let e = config.encoder.embedding_size;
    // The rate is an f32 (0.2 would print as 0.20000000298…).
    let dropout: f64 = config.encoder.dropout.to_string().parse()?;
    let meta = json!({
        "format": "audotics-trainer bench export, version 1",
        "files": {
            "features": "features.npy: f32 [N, 11], z-score standardised (population std, std 0 → 1), the platform's feature order",
            "pairs": "pairs/epoch-NNNN.npy: u32 [P, 2] (anchor, partner) track indices, epoch NNNN (1-based), in training order",
            "logq": "logq.npy: f32 [N], log of each track's add-one-smoothed share of training (user, track) entries",
            "track_counts": "track_counts.npy: u32 [N], training users per track (popularity)",
            "eval": "eval_users.npy u32 [U]; eval_train_{offsets,tracks}.npy and eval_heldout_{offsets,tracks}.npy: per evaluated user (CSR, offsets i64 [U+1]) the training tracks (query = their summed embeddings) and the held-out targets; both are excluded from the ranked candidates; ties broken by lower track index; K = 10",
            "init": "init/<name>.npy: the initial weights (Keras layouts: kernels [in, out])",
            "check": "check/*.npy: gradients of the first batch's loss (no dropout) and weights after one Adam step from init",
        },
        "data": {
            "tracks": args.tracks, "users": args.users, "interactions": args.interactions, "seed": args.seed,
            "num_tracks": n, "eval_users": users.len(), "eval_heldout": eval_heldout,
        },
        "model": {
            "inputs": NUM_FEATURES,
            "embedding_size": e,
            "layers": [
                {"type": "batch_normalization", "momentum": model::BN_MOMENTUM, "epsilon": model::BN_EPSILON},
                {"type": "dense", "units": 2 * e, "activation": "relu"},
                {"type": "dropout", "rate": dropout},
                {"type": "dense", "units": e, "activation": "relu"},
                {"type": "dropout", "rate": dropout},
                {"type": "dense", "units": e, "activation": "tanh"},
                {"type": "l2_normalize", "epsilon_on_squared_norm": 1e-24},
            ],
            "init": "glorot_uniform kernels, zero biases, gamma 1, beta 0, moving mean 0, moving variance 1",
            "param_names": model::PARAM_NAMES,
            "siamese": "anchors and partners go through the encoder as one [2B, 11] batch (BatchNorm statistics over both)",
        },
        "training": {
            "batch_size": batch_size,
            "epochs": config.epochs,
            "pairs_per_epoch": pairs_per_epoch,
            "learning_rate": config.learning_rate,
            "optimizer": {"name": "adam", "beta_1": crate::optim::BETA1, "beta_2": crate::optim::BETA2, "epsilon": crate::optim::EPSILON},
            "loss": loss_kind.to_string(),
            "temperature": config.loss.temperature,
            "logq_correction": config.loss.logq_correction,
            "centering_weight": config.loss.centering_weight,
            "centering": "contrastive only: + weight·‖mean over the 2B embeddings‖²",
            "contrastive_skips_batches_below": 2,
            "masked_logit_bias": -1e9,
        },
        "reference": reference,
    });
    std::fs::write(dir.join("export.json"), serde_json::to_string_pretty(&meta)?)?;
    tracing::info!(dir = %dir.display(), epochs = config.epochs, "bench inputs exported");
    Ok(ExportSummary {
        export_dir: dir.to_path_buf(),
        tracks: n,
        epochs: config.epochs,
        pairs_per_epoch,
        eval_users: users.len(),
        eval_heldout,
    })
}

/// Reference values the TensorFlow port must reproduce from the initial weights: the loss of the
/// first batch without dropout (BatchNorm on batch statistics) for both objectives, the contrastive
/// loss's gradients, the weights after one Adam step with them (moving statistics updated), and
/// Recall@10 of the raw features, of popularity and of the initial model.
fn reference_values(
    config: &TrainConfig,
    data: &PreparedData,
    trainer: &Trainer,
    batch: &[[u32; 2]],
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let device = Device::Cpu;
    let (ta, tb): (Vec<u32>, Vec<u32>) = batch.iter().map(|p| (p[0], p[1])).unzip();
    let ta = loss::track_tensor(&ta, &device)?;
    let tb = loss::track_tensor(&tb, &device)?;
    let logq = Tensor::from_vec(loss::log_sampling_probability(&data.track_counts), data.num_tracks(), &device)?;
    let mut losses = serde_json::Map::new();
    for kind in [LossKind::Contrastive, LossKind::Cosine] {
        let state = TrainingState::new(config, &device)?;
        let loss_config = LossConfig { kind, ..config.loss.clone() };
        let lq = (kind == LossKind::Contrastive && config.loss.logq_correction).then_some(&logq);
        let (loss, stats) = crate::train::training_loss(
            &state.encoder,
            &data.features,
            &ta,
            &tb,
            &DropoutMasks::none(),
            &loss_config,
            lq,
        )?;
        losses.insert(kind.to_string(), json!(loss.to_scalar::<f32>()?));
        if kind == LossKind::Contrastive {
            let grads = loss.backward()?;
            let mut named = Vec::new();
            for (name, var) in model::TRAINABLE_NAMES.iter().zip(state.encoder.trainable()) {
                let g = grads.get(var.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?;
                named.push((format!("grad.{name}"), g.clone()));
            }
            let named: Vec<(&str, Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            write_tensors(&dir.join("check"), &named)?;
            let mut state = state;
            state.optimizer.step(&grads)?;
            state.encoder.update_moving_stats(&stats)?;
            let after: Vec<(String, Tensor)> =
                state.encoder.named_tensors().into_iter().map(|(n, t)| (format!("after_step.{n}"), t)).collect();
            let after: Vec<(&str, Tensor)> = after.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            write_tensors(&dir.join("check"), &after)?;
        }
    }
    let baselines = trainer.baselines()?;
    let initial = TrainingState::new(config, &device)?;
    let initial_ranking = trainer.evaluate(&initial.encoder.embed(&data.features)?)?;
    Ok(json!({
        "first_batch_pairs": batch.len(),
        "first_batch_loss_without_dropout": losses,
        "raw_features": baselines.raw_features,
        "popularity": baselines.popularity,
        "initial_model": initial_ranking,
    }))
}

/// Writes one user-list family as `<stem>_offsets.npy` (i64 `[U+1]`) and `<stem>_tracks.npy`
/// (u32); returns the number of tracks.
fn write_csr<'a>(dir: &Path, stem: &str, lists: impl Iterator<Item = &'a [u32]>) -> anyhow::Result<usize> {
    let mut offsets: Vec<i64> = vec![0];
    let mut tracks: Vec<u32> = Vec::new();
    for list in lists {
        tracks.extend_from_slice(list);
        offsets.push(tracks.len() as i64);
    }
    write_npy(&dir.join(format!("{stem}_offsets.npy")), &[offsets.len()], &offsets)?;
    write_npy(&dir.join(format!("{stem}_tracks.npy")), &[tracks.len()], &tracks)?;
    Ok(tracks.len())
}

/// Writes each `(name, tensor)` as `<dir>/<name>.npy` in f32.
fn write_tensors(dir: &Path, tensors: &[(&str, Tensor)]) -> anyhow::Result<()> {
    for (name, t) in tensors {
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        write_npy(&dir.join(format!("{name}.npy")), t.dims(), &values)?;
    }
    Ok(())
}

/// An element type of an `.npy` file: its NumPy type string and little-endian bytes.
trait NpyElement: Copy {
    const DESCR: &'static str;
    fn put(self, out: &mut Vec<u8>);
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for u32 {
    const DESCR: &'static str = "<u4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for i64 {
    const DESCR: &'static str = "<i8";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// An `.npy` (format version 1.0) file: the magic string, the version, a little-endian u16 header
/// length, a Python-literal header dict padded with spaces and ended by `\n` so that the data starts
/// at a multiple of 64 bytes, then the data in C order.
fn npy_bytes<T: NpyElement>(shape: &[usize], data: &[T]) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(shape.iter().product::<usize>() == data.len(), "shape {shape:?} does not hold {}", data.len());
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}", T::DESCR);
    let unpadded = 10 + header.len() + 1;
    header.extend(std::iter::repeat_n(' ', unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let header_len = u16::try_from(header.len())?;
    let mut out = Vec::with_capacity(10 + header.len() + std::mem::size_of_val(data));
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in data {
        v.put(&mut out);
    }
    Ok(out)
}

fn write_npy<T: NpyElement>(path: &Path, shape: &[usize], data: &[T]) -> anyhow::Result<()> {
    let bytes = npy_bytes(shape, data)?;
    let mut file = std::fs::File::create(path)?;
    file.write_all(&bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::TrainingState;

    #[test]
    fn npy_header_is_version_1_and_aligned() {
        let bytes = npy_bytes(&[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(&bytes[10 + header_len..10 + header_len + 4], &1.0f32.to_le_bytes());
        assert_eq!(bytes.len(), 10 + header_len + 24);
        let one_d = npy_bytes(&[3], &[1u32, 2, 3]).unwrap();
        let h = u16::from_le_bytes([one_d[8], one_d[9]]) as usize;
        assert!(
            std::str::from_utf8(&one_d[10..10 + h])
                .unwrap()
                .starts_with("{'descr': '<u4', 'fortran_order': False, 'shape': (3,), }")
        );
        assert!(npy_bytes(&[2, 2], &[1.0f32]).is_err());
    }

    /// Stops at the first batch of every epoch, so that the epoch's starting generator (in the
    /// cursor) can be read, then lets the run continue from there.
    #[derive(Default)]
    struct EpochStarts {
        /// The latest epoch seen starting (a resumed epoch starts again: it is not stopped twice).
        seen: usize,
        stop_next_batch: bool,
        rngs: Vec<rand_chacha::ChaCha8Rng>,
    }

    impl TrainObserver for EpochStarts {
        fn epoch_started(&mut self, epoch: usize, _pairs: usize) {
            if epoch > self.seen {
                self.seen = epoch;
                self.stop_next_batch = true;
            }
        }
        fn batch_finished(&mut self, _pairs: usize) -> Control {
            if std::mem::take(&mut self.stop_next_batch) { Control::Stop } else { Control::Continue }
        }
        fn epoch_finished(&mut self, _: &TrainingState, _: &EpochMetrics) -> anyhow::Result<Control> {
            Ok(Control::Continue)
        }
        fn interrupted(&mut self, state: &TrainingState) -> anyhow::Result<()> {
            self.rngs.push(state.cursor.as_ref().expect("a cursor").rng_at_start.clone());
            Ok(())
        }
    }

    fn tiny_args(batch: usize) -> BenchArgs {
        BenchArgs {
            tracks: 300,
            users: 40,
            interactions: 2_000,
            batch_sizes: vec![batch],
            losses: vec![LossKind::Contrastive],
            epochs: 3,
            max_pairs_per_epoch: 0,
            embedding_size: 8,
            device: DeviceChoice::Cpu,
            seed: 9,
            export_dir: None,
            time_budget_seconds: None,
        }
    }

    /// The exported pairs are the trainer's own: each epoch's pairs re-sampled from the generator the
    /// trainer started that epoch with (a batch size that leaves a last batch of one pair, which the
    /// contrastive loss skips, included).
    #[test]
    fn exported_pairs_are_the_pairs_the_trainer_consumes() {
        let args = tiny_args(16);
        let dataset = synthetic_dataset(&args);
        let data = PreparedData::new(&dataset, &train_config(&args, LossKind::Contrastive, 16), &Device::Cpu).unwrap();
        let pairs = PairSampler::new(SamplingConfig::default(), &data.train, data.num_tracks()).max_pairs(&data.train);
        // 16, and a batch size whose epochs end with a batch of one pair, which the contrastive loss
        // skips without drawing dropout masks.
        let odd = (17..64).find(|b| pairs % b == 1).expect("a batch size leaving one pair");
        for batch in [16, odd] {
            let config = train_config(&args, LossKind::Contrastive, batch);
            let trainer = Trainer::new(&config, &data).unwrap();
            let mut state = TrainingState::new(&config, &Device::Cpu).unwrap();
            let mut observer = EpochStarts::default();
            while !trainer.run(&mut state, &mut observer).unwrap() {}
            assert_eq!(observer.rngs.len(), config.epochs);
            let sampler = PairSampler::new(config.sampling.clone(), &data.train, data.num_tracks());
            let mut exported = Vec::new();
            for_each_epoch_pairs(&config, &data, |_, pairs| {
                exported.push(pairs.to_vec());
                Ok(())
            })
            .unwrap();
            for (epoch, rng) in observer.rngs.iter().enumerate() {
                let trained = sampler.sample_epoch(&data.train, &mut rng.clone());
                assert_eq!(exported[epoch], trained, "batch {batch}, epoch {}", epoch + 1);
            }
            assert_ne!(exported[0], exported[1]);
        }
    }

    #[test]
    fn a_time_budget_stops_early_and_reports_quality() {
        let mut args = tiny_args(16);
        args.epochs = 50;
        args.time_budget_seconds = Some(0.0);
        let results = measure(&args).unwrap();
        let budget = results[0].budget.as_ref().expect("budget fields");
        assert_eq!(budget.trained_pairs, 16, "a zero budget stops after the first batch");
        assert!(budget.epochs_trained < 1.0);
        assert!((0.0..=1.0).contains(&budget.recall_at_10));
        let line = serde_json::to_value(&results[0]).unwrap();
        assert!(line.get("recall_at_10").is_some() && line.get("time_budget_seconds").is_some());
        // Without a budget the result line keeps its old fields only.
        args.time_budget_seconds = None;
        args.epochs = 2;
        let plain = serde_json::to_value(&measure(&args).unwrap()[0]).unwrap();
        assert!(plain.get("recall_at_10").is_none() && plain.get("budget").is_none());
        // Children's lines parse back, with and without the budget fields.
        let parsed: BenchResult = serde_json::from_value(plain).unwrap();
        assert!(parsed.budget.is_none());
        let parsed: BenchResult = serde_json::from_value(line).unwrap();
        assert_eq!(parsed.budget.unwrap().trained_pairs, 16);
    }
}
