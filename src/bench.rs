//! `audotics-trainer bench`: training throughput and peak memory on synthetic data of a given size.
//! Each configuration trains a few epochs; the figure is the median pairs/s of the epochs after the
//! first (the first pays for allocation warm-up). Evaluation time is excluded from pairs/s.

use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use crate::data::synthetic::{self, SyntheticSpec};
use crate::device::{self, DeviceChoice};
use crate::loss::{LossConfig, LossKind};
use crate::model::EncoderConfig;
use crate::pairs::{DEFAULT_POSITIVE_KINDS, SamplingConfig};
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
    /// Epochs per configuration (at least 2: the first is not counted).
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
    pub median_pairs_per_second: f64,
    pub cpu_seconds_per_million_pairs: Option<f64>,
    pub peak_rss_mib: Option<f64>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.epochs >= 2, "--epochs must be at least 2 (the first epoch is warm-up)");
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

/// Measures every configuration of `args` in this process.
fn measure(args: &BenchArgs) -> anyhow::Result<Vec<BenchResult>> {
    let device = device::select(args.device)?;
    let spec = SyntheticSpec {
        tracks: args.tracks,
        users: args.users,
        interactions: args.interactions,
        seed: args.seed,
        ..SyntheticSpec::default()
    };
    let dataset = synthetic::generate(&spec);
    let mut results = Vec::new();
    for &loss in &args.losses {
        for &batch_size in &args.batch_sizes {
            let config = TrainConfig {
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
            };
            let data = PreparedData::new(&dataset, &config, &device)?;
            let trainer = Trainer::new(&config, &data)?;
            let mut state = TrainingState::new(&config, &device)?;
            let mut recorder = Recorder::default();
            trainer.run(&mut state, &mut recorder)?;
            let later = &recorder.epochs[1..];
            let mut rates: Vec<f64> = later.iter().map(|m| m.pairs_per_second).collect();
            rates.sort_by(f64::total_cmp);
            let cpu: Option<f64> = later.iter().map(|m| m.train_cpu_seconds).sum();
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
                median_pairs_per_second: rates[rates.len() / 2],
                cpu_seconds_per_million_pairs: cpu.map(|c| c / pairs as f64 * 1e6),
                peak_rss_mib: procstat::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
            };
            tracing::info!(?result, "configuration measured");
            results.push(result);
        }
    }
    Ok(results)
}

#[derive(Default)]
struct Recorder {
    epochs: Vec<EpochMetrics>,
}

impl TrainObserver for Recorder {
    fn epoch_finished(&mut self, _state: &TrainingState, metrics: &EpochMetrics) -> anyhow::Result<Control> {
        self.epochs.push(metrics.clone());
        Ok(Control::Continue)
    }
}
