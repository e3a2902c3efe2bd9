#!/usr/bin/env bash
# Prints the cargo argument that builds the `cuda` feature against a copy of candle-core whose cudarc
# loads the CUDA libraries at run time (`dynamic-loading`) instead of linking them
# (`dynamic-linking`, candle-core's choice):
#
#   cargo build --release --features cuda --config "$(scripts/cuda/patch-candle.sh)"
#
# Why: a linked libcuda.so.1 is a load-time dependency, so candle's CUDA build cannot even start on a
# machine without the NVIDIA driver (exit 127 before main), and `--device auto` can never fall back
# to the CPU. With dynamic loading, the driver is opened on first use and src/system/device.rs asks
# for it first. cudarc's features cannot be overridden from downstream (its build script refuses both
# at once; candle issues #3900, #3208), hence the patched copy: the crates.io source of the locked
# version with that one feature changed, nothing else. Cargo records the patch in Cargo.lock;
# scripts/cuda/build.sh restores the file afterwards.
#
# Folder: $AUDOTICS_CUDA_CACHE [~/.cache/audotics-trainer/cuda]/candle-core-<version>-dynamic-loading.
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${AUDOTICS_CUDA_CACHE:-$HOME/.cache/audotics-trainer/cuda}
version=$(awk '/^name = "candle-core"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
[ -n "$version" ] || { echo "patch-candle: candle-core is not in Cargo.lock" >&2; exit 1; }
patched=$CACHE/candle-core-$version-dynamic-loading
if [ ! -f "$patched/Cargo.toml" ]; then
    cargo fetch --locked >&2
    registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
    source=$(ls -d "$registry"/*/"candle-core-$version" 2>/dev/null | head -n 1)
    [ -n "$source" ] || { echo "patch-candle: candle-core $version is not under $registry" >&2; exit 1; }
    rm -rf "$patched.partial"
    mkdir -p "$CACHE"
    cp -R "$source" "$patched.partial"
    chmod -R u+w "$patched.partial"
    # candle-core's normalised manifest lists cudarc's features one a line.
    sed -i 's/^    "dynamic-linking",$/    "dynamic-loading",/' "$patched.partial/Cargo.toml"
    grep -q '"dynamic-loading"' "$patched.partial/Cargo.toml" && ! grep -q '"dynamic-linking"' "$patched.partial/Cargo.toml" \
        || { echo "patch-candle: candle-core $version's manifest changed shape; see $patched.partial/Cargo.toml" >&2; exit 1; }
    mv "$patched.partial" "$patched"
fi
printf 'patch.crates-io.candle-core.path="%s"\n' "$patched"
