#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (issue 19, item 5), fitted to its limits: one call
# of at most 10 minutes, 15 minutes of device time in all, start included; at most 8 files back
# from $OUT. It builds nothing: that machine has no Rust toolchain and no network. Here, first:
#
#   scripts/cuda/build.sh && scripts/cuda/stage.sh     # .device/audotics-trainer.gz, for `carry`
#
# then, through the device tool: command `scripts/cuda/device-check.sh`, carry [".device"],
# timeout_s 480 (the steps' limits add up to 445 s; a normal run takes far less, which leaves device
# time for a second call). Back in $OUT: log.txt (each step's exit status, seconds and output), smi.txt
# (the GPU and driver) and gpu-util.txt (`nvidia-smi dmon`, one line a second, beside the steps).
#
# CUDA's libraries: the binary opens cuBLAS, cuRAND and NVRTC at run time
# (scripts/cuda/patch-candle.sh); the machine's image has CUDA 13's in its Python wheels (the
# ones PyTorch uses), which this script links into one folder on LD_LIBRARY_PATH under both
# their versioned and unversioned names. The driver is the machine's own.
#
# Sizes and limits come from the environment, so that the same script can be tried on the CPU here
# (`DEVICE=cpu BIN=target/release/audotics-trainer OUT=/tmp/device-out BENCH_TRACKS=20000
# BENCH_INTERACTIONS=200000 BENCH_BATCHES=1024 NEIGHBOUR_TRACKS=20000 scripts/cuda/device-check.sh`).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to the folder that comes back}
DEVICE=${DEVICE:-cuda}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-3}
NEIGHBOUR_TRACKS=${NEIGHBOUR_TRACKS:-100000}
BENCH_TRACKS=${BENCH_TRACKS:-100000}
BENCH_USERS=${BENCH_USERS:-10000}
BENCH_INTERACTIONS=${BENCH_INTERACTIONS:-2000000}
BENCH_PAIRS=${BENCH_PAIRS:-1000000}
BENCH_BATCHES=${BENCH_BATCHES:-1024,8192,32768}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
say() { echo "$*" | tee -a "$LOG" >&2; }

if [ -z "${BIN:-}" ]; then
    [ -f .device/audotics-trainer.gz ] || { say "no .device/audotics-trainer.gz: run scripts/cuda/stage.sh here and carry .device"; exit 1; }
    BIN=/tmp/audotics-trainer
    gunzip -c .device/audotics-trainer.gz > "$BIN" && chmod +x "$BIN" || { say "cannot unpack the binary"; exit 1; }
fi

libs=/tmp/audotics-cuda-libs
mkdir -p "$libs"
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
for name in cublas cublasLt curand nvrtc nvrtc-builtins; do
    found=$( { [ -n "$site" ] && find "$site/nvidia" -name "lib$name.so*" 2>/dev/null; } | sort | head -n 1)
    if [ -n "$found" ]; then
        ln -sf "$found" "$libs/lib$name.so"
        ln -sf "$found" "$libs/$(basename "$found")"
        say "lib$name: $found"
    else
        say "lib$name: not found under ${site:-the Python site-packages}/nvidia"
    fi
done
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

if command -v nvidia-smi >/dev/null; then
    nvidia-smi > "$OUT/smi.txt" 2>&1
    nvidia-smi dmon -s u -d 1 > "$OUT/gpu-util.txt" 2>&1 &
    DMON=$!
    trap 'kill $DMON 2>/dev/null' EXIT
fi

# One step: its limit in seconds, then the command; the output goes to the log, under a header.
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name ($(date -u +%H:%M:%S)): $*" >> "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    say "$name: exit $rc in $((SECONDS - t0)) s"
}

step version 20 "$BIN" --version
# Each kind trains and publishes through the device path (masks on the device, deferred loss
# reads, the neighbour table on the device); the first also JIT-compiles candle's kernels.
limit=75
for kind in content collaborative hybrid; do
    step "train-$kind" $limit "$BIN" train --device "$DEVICE" --model-kind "$kind" --epochs "$TRAIN_EPOCHS" \
        --no-progress --log-format json --output "/tmp/device-models-$kind"
    limit=45
done
# The exact neighbour table on the device beside every core of the machine.
step neighbours-device 40 "$BIN" bench-neighbours --device "$DEVICE" --tracks "$NEIGHBOUR_TRACKS"
step neighbours-cpu 40 "$BIN" bench-neighbours --device cpu --tracks "$NEIGHBOUR_TRACKS"
# Throughput of each kind at the issue's batch sizes (the first epoch of each is not counted), a
# step per kind, so that one past its limit loses only its own figures (bench prints at the end).
for kind in content collaborative hybrid; do
    step "bench-$kind" 60 "$BIN" bench --device "$DEVICE" --tracks "$BENCH_TRACKS" --users "$BENCH_USERS" \
        --interactions "$BENCH_INTERACTIONS" --max-pairs-per-epoch "$BENCH_PAIRS" --epochs 2 \
        --model-kinds "$kind" --batch-sizes "$BENCH_BATCHES"
done
say "done"
