#!/usr/bin/env bash
# CI's check of the `cuda` feature, on a machine with no GPU and no NVIDIA driver:
#  1. the CUDA compiler from PyPI (scripts/cuda/toolkit.sh) and candle patched to load the CUDA
#     libraries at run time (scripts/cuda/patch-candle.sh);
#  2. `cargo build --release --features cuda` of the binary;
#  3. `cargo clippy --release --features cuda --all-targets -- -D warnings`;
#  4. the library's unit tests under the feature (none needs a device; the device test checks the
#     fallback against this machine's driver, or its absence);
#  5. the CUDA binary run where no driver exists: it must not link any CUDA library, `--device auto`
#     must train on the CPU (exit 0) saying why in one log line, and `--device cuda` must exit
#     non-zero with one error line and no panic or backtrace.
# Prints the seconds of each step. The toolkit, the patched candle and the cuda target folder live
# in $AUDOTICS_CUDA_CACHE [~/.cache/audotics-trainer/cuda], outside the clone, so a second run on
# the same machine rebuilds only this crate (cold: ~30 min on 2 cores, most of it candle's kernels).
#
# CUDA_COMPUTE_CAP [80]: candle's kernels as compute-capability-8.0 PTX, which the driver JIT-compiles
# forward for H100/H200 (9.0) and newer GPUs; 90 would target sm_90a, which runs on Hopper only
# (Dockerfile.cuda builds the same way).
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${AUDOTICS_CUDA_CACHE:-$HOME/.cache/audotics-trainer/cuda}
export CARGO_TARGET_DIR=$CACHE/target CARGO_TERM_COLOR=never
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
say() { echo "cuda: $*" >&2; }
step() {
    local name=$1
    shift
    local t0=$SECONDS
    "$@"
    say "$name: $((SECONDS - t0)) s"
}

eval "$(scripts/cuda/toolkit.sh)"
PATCH=$(scripts/cuda/patch-candle.sh)
# Cargo writes the patch into Cargo.lock; the clone's lock file is put back whatever happens.
cp Cargo.lock "$CACHE/Cargo.lock.orig"
trap 'cp "$CACHE/Cargo.lock.orig" Cargo.lock' EXIT
cargo_cuda() { cargo "$1" --release --features cuda --config "$PATCH" "${@:2}"; }

step "build" cargo_cuda build --bin audotics-trainer
step "clippy" cargo_cuda clippy --all-targets -- -D warnings
step "unit tests" cargo_cuda test --lib -- --test-threads 2

BIN=$CARGO_TARGET_DIR/release/audotics-trainer
WORK=$(mktemp -d)
trap 'cp "$CACHE/Cargo.lock.orig" Cargo.lock; rm -rf "$WORK"' EXIT
if ldconfig -p | grep -q 'libcuda\.so\.1'; then
    say "this machine has an NVIDIA driver: the no-driver checks below need one without"
    exit 1
fi
linked=$(ldd "$BIN" | grep -Eo 'lib(cuda|cudart|cublas|cublasLt|curand|nvrtc)\.so[^ ]*' || true)
[ -z "$linked" ] || { say "the CUDA binary links CUDA libraries, so it cannot start without them: $linked"; exit 1; }
say "the CUDA binary links no CUDA library"

# The README's first command (the embedded synthetic default; a model good enough to publish, so
# exit 0), into a folder of its own.
small=(train --no-progress --output "$WORK/model")
if ! env -u DATABASE_URL "$BIN" "${small[@]}" --device auto >"$WORK/auto.out" 2>"$WORK/auto.err"; then
    say "--device auto failed without a driver:"
    tail -n 20 "$WORK/auto.err" >&2
    exit 1
fi
grep -q 'no usable CUDA device; training on the CPU.*the NVIDIA driver is not installed (libcuda.so.1: ' "$WORK/auto.err" \
    || { say "--device auto did not say why it trains on the CPU:"; cat "$WORK/auto.err" >&2; exit 1; }
grep -q 'device selected.*device=cpu\|"device":"cpu"' "$WORK/auto.err" \
    || { say "--device auto did not train on the CPU:"; cat "$WORK/auto.err" >&2; exit 1; }
say "--device auto without a driver: trained on the CPU and published (exit 0): $(grep -o '"reason":"the NVIDIA driver[^"]*"' "$WORK/auto.err")"

set +e
env -u DATABASE_URL RUST_BACKTRACE=1 "$BIN" "${small[@]}" --device cuda >"$WORK/cuda.out" 2>"$WORK/cuda.err"
code=$?
set -e
errors=$(grep -c '^error: ' "$WORK/cuda.err" || true)
if [ "$code" -eq 0 ] || [ "$errors" -ne 1 ] || grep -qiE 'panicked|stack backtrace' "$WORK/cuda.err"; then
    say "--device cuda without a driver: exit $code, $errors error lines; stderr:"
    cat "$WORK/cuda.err" >&2
    exit 1
fi
say "--device cuda without a driver: exit $code, $(grep '^error: ' "$WORK/cuda.err")"
