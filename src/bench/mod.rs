//! `audotics-trainer bench`: training throughput and peak memory on synthetic data of a given size.
//! Each configuration trains a few epochs; the figure is the median pairs/s of the epochs after the
//! first (the first pays for allocation warm-up). Evaluation time is excluded from pairs/s.
//!
//! For the side-by-side comparison with a TensorFlow port of the platform's old trainer (`bench/tf/`):
//! `--time-budget-seconds S` trains until S seconds of training (batches only: per-epoch pair
//!   sampling and evaluation excluded) are spent, stops at that batch boundary, and reports the
//!   model's Recall@10 at that point with the pairs/s over the whole run.
//! The exact inputs of a configuration, for that port, are written by the `tf-export` example
//! (`bench/tf/export/`), which is not part of the library.

pub mod ceiling;
pub mod load;
pub mod neighbours;
mod roofline;
pub mod spotify;

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::data::source::SyntheticSpec;
use crate::data::synthetic;
use crate::system::device::{self, DeviceChoice};
use crate::system::procstat;
use crate::training::loss::{LossConfig, LossKind};
use crate::training::model::tables::TableConfig;
use crate::training::model::{EncoderConfig, ModelKind};
use crate::training::pairs::{DEFAULT_POSITIVE_KINDS, SamplingConfig};
use crate::training::trainer::{
    Control, EpochMetrics, PreparedData, TrainConfig, TrainObserver, Trainer, TrainingState,
};

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
    /// Model kinds to measure (comma-separated): content, collaborative, hybrid.
    #[arg(long, env = "AUDOTICS_BENCH_MODEL_KINDS", value_enum, value_delimiter = ',', default_values_t = [ModelKind::ContentBased])]
    pub model_kinds: Vec<ModelKind>,
    /// Epochs per configuration (at least 2: the first is not counted). With --time-budget-seconds,
    /// the most epochs to train; with the `tf-export` example, the epochs whose pairs are written.
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
    /// Train until S seconds of training (batches only; pair sampling and per-epoch evaluation are
    /// not counted) are spent or --epochs are done, stop at that batch boundary, and add Recall@10
    /// of the model at that point and the pairs/s of the whole run to the result.
    #[arg(long, value_name = "S")]
    pub time_budget_seconds: Option<f64>,
    /// Train through candle's autograd on the CPU too, instead of the fused CPU step (to compare).
    #[arg(long)]
    pub autograd_step: bool,
    /// Instead of training: FLOPs per pair of each configuration, and the GFLOP/s this machine's
    /// matrix kernels reach on the training step's own products (an upper bound on pairs/s).
    #[arg(long)]
    pub roofline: bool,
}

fn content_kind() -> String {
    ModelKind::ContentBased.as_str().to_string()
}

/// One measured configuration.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct BenchResult {
    pub tracks: usize,
    pub users: usize,
    pub interactions: usize,
    pub loss: String,
    /// `content-based`, `collaborative` or `hybrid` (results before the kinds existed: content).
    #[serde(default = "content_kind")]
    pub model_kind: String,
    pub batch_size: usize,
    pub device: String,
    pub cpu_threads: usize,
    /// `fused` (the hand-written CPU step) or `autograd` (candle's, on any device).
    #[serde(default)]
    pub step: String,
    pub pairs_per_epoch: usize,
    /// Multiply-add work per trained pair (`bench --roofline` explains the count), MFLOP.
    #[serde(default)]
    pub mflop_per_pair: f64,
    /// `median_pairs_per_second × mflop_per_pair`, GFLOP/s.
    #[serde(default)]
    pub achieved_gflops: f64,
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
    if args.roofline {
        println!(
            "| loss | batch | threads | MFLOP per pair | step's products GFLOP/s | products-only pairs/s | 1024³ GFLOP/s |"
        );
        println!("|---|---|---|---|---|---|---|");
        for &loss in &args.losses {
            for &batch in &args.batch_sizes {
                let r = roofline::measure(args.embedding_size, batch, loss);
                println!(
                    "| {} | {} | {} | {:.3} | {:.1} | {:.0} | {:.1} |",
                    r.loss,
                    r.batch_size,
                    r.threads,
                    r.mflop_per_pair,
                    r.step_products_gflops,
                    r.products_only_pairs_per_second,
                    r.square_1024_gflops
                );
                eprintln!("{}", serde_json::to_string(&r)?);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    match args.time_budget_seconds {
        Some(s) => anyhow::ensure!(s >= 0.0 && args.epochs >= 1, "a time budget needs S ≥ 0 and --epochs ≥ 1"),
        None => anyhow::ensure!(args.epochs >= 2, "--epochs must be at least 2 (the first epoch is warm-up)"),
    }
    // Peak memory is per process (and the allocator keeps freed pages), so each configuration runs
    // in a fresh child process of this binary; a single configuration runs here.
    let results = if args.batch_sizes.len() * args.losses.len() * args.model_kinds.len() == 1 {
        tokio::task::spawn_blocking(move || measure(&args)).await??
    } else {
        let mut results = Vec::new();
        for &kind in &args.model_kinds {
            for &loss in &args.losses {
                for &batch in &args.batch_sizes {
                    results.push(measure_in_child(&args, kind, loss, batch).await?);
                }
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

async fn measure_in_child(
    args: &BenchArgs,
    kind: ModelKind,
    loss: LossKind,
    batch: usize,
) -> anyhow::Result<BenchResult> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("bench")
        .args(["--tracks", &args.tracks.to_string(), "--users", &args.users.to_string()])
        .args(["--interactions", &args.interactions.to_string(), "--epochs", &args.epochs.to_string()])
        .args(["--batch-sizes", &batch.to_string(), "--losses", &loss.to_string()])
        .args(["--model-kinds", clap::ValueEnum::to_possible_value(&kind).expect("named").get_name()])
        .args(["--max-pairs-per-epoch", &args.max_pairs_per_epoch.to_string()])
        .args(["--embedding-size", &args.embedding_size.to_string(), "--seed", &args.seed.to_string()])
        .args(["--device", &format!("{:?}", args.device).to_lowercase()])
        .stderr(std::process::Stdio::inherit());
    if let Some(s) = args.time_budget_seconds {
        cmd.args(["--time-budget-seconds", &s.to_string()]);
    }
    if args.autograd_step {
        cmd.arg("--autograd-step");
    }
    let out = cmd.output().await?;
    anyhow::ensure!(out.status.success(), "benchmark of {} / batch {batch} / {loss} failed", kind.as_str());
    let stdout = String::from_utf8(out.stdout)?;
    let line =
        stdout.lines().find(|l| l.starts_with('{')).ok_or_else(|| anyhow::anyhow!("no result from the child"))?;
    Ok(serde_json::from_str(line)?)
}

fn print_table<'a>(results: impl Iterator<Item = &'a BenchResult>) {
    println!(
        "| tracks | users | interactions | kind | loss | batch | device | step | threads | pairs/epoch | pairs/s (median) | GFLOP/s | CPU-s per 1M pairs | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {} | {} |",
            r.tracks,
            r.users,
            r.interactions,
            r.model_kind,
            r.loss,
            r.batch_size,
            r.device,
            r.step,
            r.cpu_threads,
            r.pairs_per_epoch,
            r.median_pairs_per_second,
            r.achieved_gflops,
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
pub fn train_config(args: &BenchArgs, kind: ModelKind, loss: LossKind, batch_size: usize) -> TrainConfig {
    let centering_weight = kind.default_centering_weight();
    TrainConfig {
        epochs: args.epochs,
        batch_size,
        validation_split: 0.2,
        learning_rate: 1e-3,
        encoder: EncoderConfig { embedding_size: args.embedding_size, dropout: 0.2 },
        loss: LossConfig { kind: loss, temperature: 0.05, logq_correction: true, centering_weight },
        sampling: SamplingConfig { max_pairs_per_epoch: args.max_pairs_per_epoch, ..SamplingConfig::default() },
        positive_kinds: DEFAULT_POSITIVE_KINDS.map(String::from).to_vec(),
        seed: args.seed,
        eval_users: 2_000,
        max_validation_pairs: 20_000,
        holdout: crate::training::trainer::Holdout::Random,
        patience: 0,
        min_delta: 0.0,
        model_kind: kind,
        tables: (!kind.is_content()).then(TableConfig::default),
        cold_tracks: 0.0,
        neighbours: crate::training::neighbours::DEFAULT_K,
        neighbour_index: crate::training::neighbours::IndexChoice::Auto,
    }
}

pub fn synthetic_dataset(args: &BenchArgs) -> crate::data::Dataset {
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
    for (&kind, &loss, &batch_size) in args
        .model_kinds
        .iter()
        .flat_map(|k| args.losses.iter().flat_map(move |l| args.batch_sizes.iter().map(move |b| (k, l, b))))
    {
        {
            let config = train_config(args, kind, loss, batch_size);
            let data = PreparedData::new(&dataset, &config, &device)?;
            let trainer = Trainer::new(&config, &data)?;
            let trainer = if args.autograd_step { trainer.use_autograd() } else { trainer };
            let mut state = trainer.fresh_state(&device)?;
            let mut recorder = Recorder { budget_seconds: args.time_budget_seconds, ..Recorder::default() };
            trainer.run(&mut state, &mut recorder)?;
            let budget = match args.time_budget_seconds {
                Some(seconds) => {
                    let ranking = trainer.evaluate(&trainer.embed(&state)?)?;
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
            // The dense products of the content encoder and the loss; the tables' gathers and
            // scatters are memory traffic, not counted (the collaborative kind: the loss's alone).
            let flops_per_pair = match kind.has_content() {
                true => roofline::flops_per_pair(args.embedding_size, batch_size, loss),
                false => roofline::loss_flops_per_pair(args.embedding_size, batch_size, loss),
            };
            let result = BenchResult {
                tracks: args.tracks,
                users: args.users,
                interactions: args.interactions,
                loss: loss.to_string(),
                model_kind: kind.as_str().to_string(),
                batch_size,
                device: device::describe(&device),
                cpu_threads: candle_core::utils::get_num_threads(),
                step: trainer.step_name().to_string(),
                pairs_per_epoch: trainer.pairs_per_epoch(),
                mflop_per_pair: flops_per_pair / 1e6,
                achieved_gflops: median_pairs_per_second * flops_per_pair / 1e9,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration small enough for a unit test.
    pub(super) fn tiny_args(batch: usize) -> BenchArgs {
        BenchArgs {
            tracks: 300,
            users: 40,
            interactions: 2_000,
            batch_sizes: vec![batch],
            losses: vec![LossKind::Contrastive],
            model_kinds: vec![ModelKind::ContentBased],
            epochs: 3,
            max_pairs_per_epoch: 0,
            embedding_size: 8,
            device: DeviceChoice::Cpu,
            seed: 9,
            time_budget_seconds: None,
            autograd_step: false,
            roofline: false,
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
