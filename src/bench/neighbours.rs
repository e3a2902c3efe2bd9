//! `audotics-trainer bench-neighbours`: how long the similar-tracks table takes for a catalogue of
//! a given size, on every core, with its peak memory; for the approximate (HNSW) table, also its
//! recall@10 and @K against the exact lists of a seeded sample of tracks.
//!
//! The embeddings are seeded uniform directions, or a published version's `embeddings.safetensors`
//! (`--embeddings`). The exact table's work (one `n × n × E` product and one pass over its `n²`
//! cosines) does not depend on what the rows are, only on their count and size; the approximate
//! table's recall does: uniform directions in many dimensions (nothing near anything) are its
//! hardest case, and trained embeddings, which gather by genre and artist, the real one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::system::procstat;
use crate::training::neighbours::{self, HnswSettings, IndexChoice, Method, approximate};

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
    /// `exact`, or `approximate` (HNSW, with its recall measured).
    #[arg(long, value_enum, default_value_t = IndexChoice::Exact)]
    pub index: IndexChoice,
    /// A version's `embeddings.safetensors` instead of uniform directions (`--tracks` and
    /// `--embedding-size` are then its shape).
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Tracks whose exact lists the approximate table is checked against.
    #[arg(long, default_value_t = 2_000)]
    pub recall_sample: usize,
    /// Where the exact table is built: `cpu` (every core), or `cuda` / `auto` for a GPU, where the
    /// products and the per-tile selection run on the device (as a GPU run's table does).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: crate::system::device::DeviceChoice,
}

pub async fn run(args: NeighbourBenchArgs) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || bench(&args)).await??;
    Ok(ExitCode::SUCCESS)
}

fn bench(args: &NeighbourBenchArgs) -> anyhow::Result<()> {
    let (z, n, dim) = match &args.embeddings {
        Some(path) => read_embeddings(path)?,
        None => (uniform_directions(args.tracks, args.embedding_size, args.seed)?, args.tracks, args.embedding_size),
    };
    let device = crate::system::device::select(args.device)?;
    // On the CPU the host rows go straight to the cores (no tensor to copy them back out of).
    let embeddings = (!device.is_cpu()).then(|| candle_core::Tensor::from_slice(&z, (n, dim), &device)).transpose()?;
    let started = Instant::now();
    let (table, method, on_device) = match &embeddings {
        Some(on_device) => neighbours::build(on_device, args.k, None, args.index)?,
        None => {
            let (table, method) = neighbours::build_on_all_cores(&z, dim, args.k, None, args.index);
            (table, method, false)
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut result = serde_json::json!({
        "tracks": n,
        "embedding_size": dim,
        "embeddings": args.embeddings.as_ref().map_or("uniform directions".to_string(), |p| p.display().to_string()),
        "k": args.k,
        "method": method,
        "on_device": on_device,
        "cores": crate::system::cores::cores(),
        "seconds": seconds,
        "cosines_per_second": (n as f64) * (n as f64) / seconds,
        // null where the platform does not report it.
        "peak_rss_mib": procstat::peak_rss_bytes().map(|b| b >> 20),
        "listed": table.num_tracks(),
    });
    if method == Method::Hnsw {
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5A3F);
        let sample: Vec<u32> =
            rand::seq::index::sample(&mut rng, n, args.recall_sample.min(n)).into_iter().map(|t| t as u32).collect();
        let truth = neighbours::exact_of_rows(&z, dim, args.k, &sample);
        result["hnsw"] = serde_json::json!(HnswSettings::DEFAULT);
        result["recall_sample"] = sample.len().into();
        result["recall_at_10"] = approximate::recall(&table, &truth, &sample, 10).into();
        result[format!("recall_at_{}", args.k)] = approximate::recall(&table, &truth, &sample, args.k).into();
    }
    println!("{result}");
    Ok(())
}

fn uniform_directions(n: usize, dim: usize, seed: u64) -> anyhow::Result<Vec<f32>> {
    anyhow::ensure!(n > 0 && dim > 0, "--tracks and --embedding-size must be at least 1");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut z: Vec<f32> = (0..n * dim).map(|_| StandardNormal.sample(&mut rng)).collect();
    for row in z.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    Ok(z)
}

/// The `embeddings` tensor of a version's `embeddings.safetensors`: its values, rows and width.
fn read_embeddings(path: &std::path::Path) -> anyhow::Result<(Vec<f32>, usize, usize)> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let e = tensors.get("embeddings").with_context(|| format!("{} has no `embeddings` tensor", path.display()))?;
    let (n, dim) = e.dims2()?;
    Ok((e.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?, n, dim))
}
