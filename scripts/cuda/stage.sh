#!/usr/bin/env bash
# Stages the CUDA binary for a lent GPU machine (issue 19): that machine has CUDA's libraries in
# its Python image but no Rust toolchain and no network, so the binary is built here
# (scripts/cuda/build.sh) and travels with the working tree, whose limit is 64 MiB. Strips it and
# compresses it into .device/audotics-trainer.gz (ignored by git; name `.device` in the call's
# `carry`), then scripts/cuda/device-check.sh runs there.
#
#   scripts/cuda/build.sh && scripts/cuda/stage.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${AUDOTICS_CUDA_CACHE:-$HOME/.cache/audotics-trainer/cuda}
BIN=${1:-$CACHE/target/release/audotics-trainer}
LIMIT_MIB=${STAGE_LIMIT_MIB:-56}
[ -x "$BIN" ] || { echo "stage: no CUDA binary at $BIN (run scripts/cuda/build.sh first)" >&2; exit 1; }
mkdir -p .device
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
cp "$BIN" "$tmp"
strip "$tmp"
gzip -9 -c "$tmp" > .device/audotics-trainer.gz.partial
mv .device/audotics-trainer.gz.partial .device/audotics-trainer.gz
size=$(stat -c %s .device/audotics-trainer.gz)
echo "stage: .device/audotics-trainer.gz: $((size >> 20)) MiB ($(stat -c %s "$tmp") bytes stripped) from $BIN" >&2
# The working tree travels too (a few MiB); leave it room.
[ $((size >> 20)) -lt "$LIMIT_MIB" ] || { echo "stage: over $LIMIT_MIB MiB: it will not travel" >&2; exit 1; }
