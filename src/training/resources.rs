//! What a run will need, known before it trains: its peak memory estimated from the params and the
//! data's size, checked against the memory this process may use. A run that cannot fit is refused
//! with the estimate and the budget instead of aborting the process mid-epoch — an abort the worker
//! cannot report, and that a pod's restart only repeats.
//!
//! The estimate follows the allocations of the training path (see `cpu_step`, `loss::fused`, `eval`,
//! `export`): the terms are upper bounds of the buffers alive at each phase's peak, on top of what the
//! process already holds once the data is prepared. `BENCHMARKS.md` compares it with measured peaks.

use crate::data::features::NUM_FEATURES;
use crate::training::eval::USERS_PER_CHUNK;
use crate::training::neighbours::Method;
use crate::training::trainer::TrainConfig;

const F32: u64 = 4;
const MIB: u64 = 1 << 20;
/// Unaccounted allocator slack, thread stacks and small buffers.
const MARGIN: u64 = 64 * MIB;

/// The memory this process may use, and where that figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    pub bytes: u64,
    pub source: BudgetSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `WORKER_MEMORY_LIMIT` / `--memory-limit`.
    Configured,
    /// The cgroup's `memory.max` (v2) or `memory.limit_in_bytes` (v1): a pod's memory limit.
    Cgroup,
    /// `RLIMIT_AS` (`ulimit -v`, `prlimit --as`): counts address space, not resident memory.
    AddressSpaceLimit,
    /// The machine's physical memory (`MemTotal`), when nothing tighter applies.
    PhysicalMemory,
}

impl BudgetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetSource::Configured => "configured",
            BudgetSource::Cgroup => "cgroup",
            BudgetSource::AddressSpaceLimit => "rlimit_as",
            BudgetSource::PhysicalMemory => "physical_memory",
        }
    }
}

impl MemoryBudget {
    /// `configured`, else the tightest of the cgroup limit, `RLIMIT_AS` and physical memory (`None`
    /// where none can be read: the run is then not bounded beforehand).
    pub fn detect(configured: Option<u64>) -> Option<Self> {
        if let Some(bytes) = configured {
            return Some(Self { bytes, source: BudgetSource::Configured });
        }
        [
            cgroup_limit().map(|bytes| Self { bytes, source: BudgetSource::Cgroup }),
            address_space_limit().map(|bytes| Self { bytes, source: BudgetSource::AddressSpaceLimit }),
            physical_memory().map(|bytes| Self { bytes, source: BudgetSource::PhysicalMemory }),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|b| b.bytes)
    }

    /// What the process holds now, counted the way this budget is enforced: address space under
    /// `RLIMIT_AS`, resident memory otherwise.
    pub fn in_use_now(&self) -> u64 {
        match self.source {
            BudgetSource::AddressSpaceLimit => crate::system::procstat::virtual_bytes(),
            _ => crate::system::procstat::rss_bytes(),
        }
        .unwrap_or(0)
    }
}

/// The tightest memory limit of this process's cgroup and its ancestors: `memory.max` (v2) or
/// `memory.limit_in_bytes` (v1), found through `/proc/self/cgroup` (in a pod's cgroup namespace the
/// path is `/` and the mount's own files are the pod's).
fn cgroup_limit() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut limits = Vec::new();
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (mount, file) = match controllers {
            "" => ("/sys/fs/cgroup", "memory.max"),
            c if c.split(',').any(|c| c == "memory") => ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"),
            _ => continue,
        };
        let mut dir = std::path::PathBuf::from(mount).join(path.trim_start_matches('/'));
        loop {
            if let Some(bytes) = std::fs::read_to_string(dir.join(file)).ok().and_then(|s| s.trim().parse::<u64>().ok())
            {
                limits.push(bytes);
            }
            if dir.as_os_str().len() <= mount.len() || !dir.pop() {
                break;
            }
        }
    }
    // v1 spells "no limit" as a huge page-rounded number, v2 as "max" (which does not parse).
    limits.into_iter().filter(|&b| b < 1 << 60).min()
}

fn address_space_limit() -> Option<u64> {
    // "Max address space  <soft>  <hard>  bytes", soft limit first; "unlimited" when none.
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The sizes of the prepared data that the estimate depends on.
#[derive(Debug, Clone, Copy)]
pub struct DataSizes {
    pub tracks: usize,
    pub pairs_per_epoch: usize,
    pub validation_pairs: usize,
    /// Rows of the kind's embedding tables (identity + artist + album; 0 for the content kind):
    /// each is held with Adam's two moments and copied once more into a checkpoint.
    pub table_rows: usize,
}

/// A run's estimated peak memory, by phase (each phase's buffers are freed before the next).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryEstimate {
    /// What the process held when the estimate was made (data loaded and prepared).
    pub in_use_bytes: u64,
    /// One training step: the `[B, B]` logits and their gradient, the activations of `2B` rows,
    /// the parameters with Adam's moments.
    pub train_step_bytes: u64,
    /// The validation loss in inference mode: candle's `[B, B]` temporaries at the validation batch.
    pub validation_bytes: u64,
    /// Evaluation and export: the embedding table in its copies, and a chunk of user scores.
    pub evaluate_and_export_bytes: u64,
    /// `in_use_bytes` plus the largest phase, plus a fixed margin.
    pub peak_bytes: u64,
}

/// The estimate for `config` on data of `sizes`, with `in_use` bytes already held.
pub fn estimate(config: &TrainConfig, sizes: DataSizes, in_use: u64) -> MemoryEstimate {
    let e = config.encoder.embedding_size as u64;
    let f = NUM_FEATURES as u64;
    let batch = config.batch_size.min(sizes.pairs_per_epoch.max(2)) as u64;
    let validation_batch = config.batch_size.min(sizes.validation_pairs) as u64;
    let contrastive = config.loss.kind == crate::training::loss::LossKind::Contrastive;
    // f → 2e → e → e, each Dense with its bias; Adam keeps two moments; a checkpoint serialises all three.
    let parameters = f * 2 * e + 2 * e + 2 * e * e + e + e * e + e + 4 * f;
    let with_adam = 3 * parameters * F32 * 2;
    // Per row: the input, pre-activations, activations, dropout masks and derivatives of the three
    // layers, and their gradients: ≤ 3 copies of (f + 2e + e + e) forward, the same backward.
    let per_row = 6 * (f + 4 * e) * F32;
    let square = |b: u64| b * b * F32;
    let train_step = if contrastive { 2 * square(batch) } else { 0 } + 2 * batch * per_row + with_adam;
    // Candle's eval-mode loss: the logits, their scaled copy and the op's output buffers.
    let validation =
        if contrastive { 3 * square(validation_batch) } else { 0 } + 2 * validation_batch * per_row + with_adam;
    let tracks = sizes.tracks as u64;
    // Host copy, on-device copy and its transpose for evaluation; the export's npy, TF.js and Keras
    // buffers; per evaluating thread, one chunk of users' scores over every track and its stamps.
    let table = tracks * e * F32;
    let evaluation_scores = crate::system::cores::cores() as u64 * (USERS_PER_CHUNK as u64 + 1) * tracks * F32;
    let evaluate_and_export =
        6 * table + evaluation_scores + tracks * f * F32 + with_adam + neighbour_table_bytes(config, tracks);
    // The tables live through every phase: values and two moments, plus a checkpoint's copy of all three.
    let tables = 6 * sizes.table_rows as u64 * e * F32;
    let largest = train_step.max(validation).max(evaluate_and_export) + tables;
    MemoryEstimate {
        in_use_bytes: in_use,
        train_step_bytes: train_step,
        validation_bytes: validation,
        evaluate_and_export_bytes: evaluate_and_export,
        peak_bytes: in_use + largest + MARGIN,
    }
}

/// The similar-tracks table: this version's, its serialised copy and the parent's read back for
/// the comparison (K × (u32 + f32) per track each), plus one score tile per core.
fn neighbour_table_bytes(config: &TrainConfig, tracks: u64) -> u64 {
    if config.neighbours == 0 {
        return 0;
    }
    let cores = crate::system::cores::cores() as u64;
    let building = match config.neighbour_index.method(tracks as usize) {
        Method::Exact => cores * crate::training::neighbours::SCRATCH_BYTES_PER_THREAD,
        Method::Hnsw => tracks * HNSW_BYTES_PER_TRACK,
    };
    3 * tracks * config.neighbours as u64 * 8 + building
}

/// The HNSW graph's memory per track at the default settings (a copy of the row and ~2M links with
/// their allocations), from `bench-neighbours --index approximate`'s peak RSS (BENCHMARKS.md).
const HNSW_BYTES_PER_TRACK: u64 = 2_500;

/// What the requested batch alone needs in one training step, whatever the data: the contrastive
/// loss's `[B, B]` logits and gradient. The batch is smaller than asked only when the whole history
/// has fewer pairs than one batch, so a request whose batch alone exceeds the budget cannot run here.
pub fn batch_floor_bytes(batch_size: usize, contrastive: bool) -> u64 {
    let b = batch_size as u64;
    if contrastive { 2 * b * b * F32 } else { 0 }
}

/// Checkpoint bytes of one run's retained checkpoints (parameters, Adam's moments, BatchNorm's
/// statistics), and the version's artifacts (embeddings in three formats, the weights twice, the
/// neighbour table).
pub fn disk_estimate_bytes(config: &TrainConfig, tracks: usize, checkpoints_kept: usize) -> u64 {
    let e = config.encoder.embedding_size as u64;
    let f = NUM_FEATURES as u64;
    let parameters = f * 2 * e + 2 * e + 2 * e * e + e + e * e + e + 4 * f;
    let checkpoint = 3 * parameters * F32 + 4096;
    let neighbours = tracks as u64 * config.neighbours as u64 * 8;
    checkpoints_kept as u64 * checkpoint + 3 * tracks as u64 * e * F32 + 2 * parameters * F32 + neighbours
}

/// A configured memory limit in bytes; `None`: detect it (`auto`, or empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<u64>);

/// `auto` or empty → detect; otherwise [`parse_bytes`].
pub fn parse_limit(s: &str) -> Result<Limit, String> {
    match s.trim() {
        "" | "auto" => Ok(Limit(None)),
        other => parse_bytes(other).map(|b| Limit(Some(b))),
    }
}

/// `"3GiB"`, `"512MiB"`, `"2G"`, `"1500000000"` → bytes (binary and decimal suffixes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{s:?} is not a size (e.g. 3GiB, 512MiB, 2G)"))?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" | "k" | "kB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "Ti" | "TiB" => 1024f64.powi(4),
        other => return Err(format!("{s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB or K, M, G, T)")),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!("{s:?} must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deployed defaults (the `train` flags'), at `batch` and `embedding`.
    fn config(batch: usize, embedding: usize) -> TrainConfig {
        use crate::training::loss::{LossConfig, LossKind};
        use crate::training::model::EncoderConfig;
        use crate::training::pairs::{DEFAULT_POSITIVE_KINDS, SamplingConfig};
        TrainConfig {
            epochs: 50,
            batch_size: batch,
            validation_split: 0.2,
            learning_rate: 1e-3,
            encoder: EncoderConfig { embedding_size: embedding, dropout: 0.2 },
            loss: LossConfig {
                kind: LossKind::Contrastive,
                temperature: 0.05,
                logq_correction: true,
                centering_weight: 1.0,
            },
            sampling: SamplingConfig::default(),
            positive_kinds: DEFAULT_POSITIVE_KINDS.map(String::from).to_vec(),
            seed: 42,
            eval_users: 5000,
            max_validation_pairs: 20_000,
            holdout: crate::training::trainer::Holdout::Time,
            patience: 5,
            min_delta: 0.0,
            model_kind: Default::default(),
            tables: None,
            cold_tracks: 0.0,
            neighbours: crate::training::neighbours::DEFAULT_K,
            neighbour_index: crate::training::neighbours::IndexChoice::Auto,
        }
    }

    const SIZES: DataSizes =
        DataSizes { tracks: 100_000, pairs_per_epoch: 2_000_000, validation_pairs: 20_000, table_rows: 0 };

    #[test]
    fn the_batch_square_dominates_large_batches_and_is_clamped_by_the_data() {
        let big = estimate(&config(32_768, 64), SIZES, 0);
        assert_eq!(big.train_step_bytes / (1 << 30), 8, "two [32768, 32768] f32 buffers: {big:?}");
        let small_data = DataSizes { pairs_per_epoch: 1000, validation_pairs: 500, ..SIZES };
        let clamped = estimate(&config(32_768, 64), small_data, 0);
        assert!(clamped.train_step_bytes < 64 << 20, "a batch of 1000 pairs: {clamped:?}");
        let default = estimate(&config(64, 64), SIZES, 100 << 20);
        // 100k tracks, the neighbour table included, inside the base deployment's 1 GiB request.
        assert!(default.peak_bytes < 1 << 30, "the default run fits the pod's request: {default:?}");
        assert_eq!(default.peak_bytes, (100 << 20) + default.evaluate_and_export_bytes + MARGIN);
        // A hybrid's tables of 10M rows at E = 64: values, two moments and a checkpoint's copy.
        let tables = DataSizes { table_rows: 10_000_000, ..SIZES };
        let hybrid = estimate(&config(64, 64), tables, 100 << 20);
        assert_eq!(hybrid.peak_bytes - default.peak_bytes, 6 * 10_000_000 * 64 * 4);
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("3GiB"), Ok(3 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("1234"), Ok(1234));
        assert_eq!(parse_limit("auto"), Ok(Limit(None)));
        assert_eq!(parse_limit(""), Ok(Limit(None)));
        assert_eq!(parse_limit("1GiB"), Ok(Limit(Some(1 << 30))));
        assert!(parse_bytes("3 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("lots").unwrap_err().contains("not a size"));
        assert!(parse_bytes("0").is_err());
    }

    #[test]
    fn the_budget_is_the_configured_one_or_the_tightest_limit_in_force() {
        assert_eq!(
            MemoryBudget::detect(Some(1 << 30)),
            Some(MemoryBudget { bytes: 1 << 30, source: BudgetSource::Configured })
        );
        let detected = MemoryBudget::detect(None).expect("Linux shows at least MemTotal");
        assert!(detected.bytes <= physical_memory().unwrap());
        assert!(detected.in_use_now() > 0);
    }
}
