//! The machine's cores, for the work that scales across them whatever the training's thread count.
//!
//! Training batches of at most 512 pairs runs fastest on one thread, so the process's global rayon
//! pool is then sized to 1 (`--cpu-threads` auto). The evaluation of every epoch, the baselines and
//! the similar-tracks table are large, independent products and scans that do scale: they run on
//! [`on_all_cores`], a pool of all cores made once.

use std::sync::OnceLock;

use tracing::warn;

/// The cores this process may use: its CPU affinity and cgroup quota, as the standard library
/// reads them.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `work` on a pool of [`cores`] threads (made on first use). Where that pool cannot be made
/// (no threads can be spawned), on the caller's pool, with one warning.
pub fn on_all_cores<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores())
            .thread_name(|i| format!("all-cores-{i}"))
            .build()
            .inspect_err(|e| warn!(error.message = %e, "cannot start a pool of all cores; using the current pool"))
            .ok()
    });
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}
