//! `audotics-trainer bench-neighbours`: how long the exact similar-tracks table takes for a
//! catalogue of a given size, on every core, with its peak memory.
//!
//! The embeddings are seeded uniform directions: the table's work (one `n × n × E` product and one
//! pass over its `n²` cosines) does not depend on what the rows are, only on their count and size.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::system::procstat;
use crate::training::neighbours;

#[derive(Debug, Args)]
pub struct NeighbourBenchArgs {
    #[arg(long, default_value_t = 100_000)]
    pub tracks: usize,
    #[arg(long, default_value_t = 64)]
    pub embedding_size: usize,
    #[arg(long, default_value_t = neighbours::DEFAULT_K)]
    pub k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub async fn run(args: NeighbourBenchArgs) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || bench(&args)).await??;
    Ok(ExitCode::SUCCESS)
}

fn bench(args: &NeighbourBenchArgs) -> anyhow::Result<()> {
    let (n, dim) = (args.tracks, args.embedding_size);
    anyhow::ensure!(n > 0 && dim > 0, "--tracks and --embedding-size must be at least 1");
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut z: Vec<f32> = (0..n * dim).map(|_| StandardNormal.sample(&mut rng)).collect();
    for row in z.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    let started = Instant::now();
    let table = neighbours::exact_on_all_cores(&z, dim, args.k, None)?;
    let seconds = started.elapsed().as_secs_f64();
    let result = serde_json::json!({
        "tracks": n,
        "embedding_size": dim,
        "k": args.k,
        "cores": neighbours::cores(),
        "seconds": seconds,
        "cosines_per_second": (n as f64) * (n as f64) / seconds,
        // null where the platform does not report it.
        "peak_rss_mib": procstat::peak_rss_bytes().map(|b| b >> 20),
        "listed": table.num_tracks(),
    });
    println!("{result}");
    Ok(())
}
