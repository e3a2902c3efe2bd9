//! The `audotics-trainer` binary: parse flags, set up logging, run the command on a tokio runtime.

use std::process::ExitCode;

// glibc's malloc hands freed blocks back to the kernel and re-faults them on the next step: a
// training step allocates and frees the same few MB of tensors thousands of times, and with the
// system allocator page faults took more time than the maths (perf: 21% in clear_page).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match audotics_trainer::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let (Some(threads), None) = (cli.cpu_threads(), std::env::var_os("RAYON_NUM_THREADS")) {
        // SAFETY: no other thread exists yet (the runtime and candle's pools start below), so
        // nothing can read the environment concurrently. candle sizes its CPU pools from it.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    audotics_trainer::system::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(audotics_trainer::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // The chain as one line (`{:#}`): anyhow's Debug form appends a backtrace dump when
            // RUST_BACKTRACE is set, which the one error line a user reads should not carry.
            tracing::error!(error.message = %e, error.cause_chain = %format!("{e:#}"), "command failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Dropping the runtime would wait for every blocking task, and one may be mid-way through a
    // phase that does not look at the stop flag (evaluation, export): the command has decided to
    // exit — a worker past its grace period, say — so wait only briefly.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}
