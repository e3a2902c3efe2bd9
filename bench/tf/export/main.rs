//! `tf-export`: writes the exact inputs one `bench` configuration trains on — standardised features,
//! each epoch's pairs in the order the trainer consumes them, `log q`, the evaluation set — plus the
//! initial weights and reference values (losses, gradients and one Adam step on the first batch,
//! Recall@10 of the raw features and of the initial model) that the TensorFlow port of the old
//! trainer (`bench/tf/old_trainer.py`) is checked against. `.npy` files and `export.json`, no training.
//!
//! It sits with the bench, outside the library: only `bench/tf/run.sh` uses it.
//!
//! `cargo run --release --example tf-export -- --batch-sizes 64 --losses contrastive --export-dir DIR`
//! (every `bench` flag sets the configuration; one batch size and one loss).

mod export;
mod npy;

use std::path::PathBuf;

use audotics_trainer::bench::BenchArgs;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "tf-export", about = "Writes one bench configuration's training inputs for bench/tf")]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
    /// Where the `.npy` files and `export.json` go.
    #[arg(long, value_name = "DIR")]
    export_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = &cli.bench;
    anyhow::ensure!(
        args.batch_sizes.len() == 1 && args.losses.len() == 1,
        "one configuration at a time: give one --batch-sizes and one --losses"
    );
    anyhow::ensure!(args.epochs >= 1, "--epochs must be at least 1");
    let summary = export::export(args, &cli.export_dir)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration small enough for a unit test, through the same flags `bench/tf/run.sh` gives.
    pub(crate) fn tiny_args(batch: usize) -> BenchArgs {
        let batch = batch.to_string();
        let flags = ["tf-export", "--tracks", "300", "--users", "40", "--interactions", "2000", "--epochs", "3"];
        let more = ["--max-pairs-per-epoch", "0", "--embedding-size", "8", "--device", "cpu", "--seed", "9"];
        let argv = flags.iter().chain(&more).copied().chain(["--batch-sizes", &batch, "--export-dir", "unused"]);
        Cli::try_parse_from(argv).expect("valid flags").bench
    }
}
