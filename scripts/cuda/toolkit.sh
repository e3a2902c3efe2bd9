#!/usr/bin/env bash
# Installs the CUDA compiler this project builds its `cuda` feature with, from PyPI wheels, into a
# folder of its own outside the clone, and prints the environment a build needs (source it:
# `eval "$(scripts/cuda/toolkit.sh)"`). Idempotent: a second call only prints.
#
# Why wheels: the machines CI runs on have no GPU and no CUDA; Debian's nvidia-cuda-toolkit is 12.x
# and older than candle needs. The CUDA 12 wheels ship no nvcc (only ptxas, libnvvm and headers);
# the CUDA 13.0 wheels do, and cudarc 0.19 accepts CUDA 13.0–13.4 (not 13.5, the newest on PyPI):
# versions are pinned to 13.0. The build this project makes loads libcuda, cuBLAS, cuRAND and NVRTC
# at run time (scripts/cuda/patch-candle.sh), so nothing links them and no driver stub is needed.
# The one library linked is the CUDA runtime, which candle's MoE kernels (libmoe.a) call: linked
# statically (`static-lib/libcudart.a`, the wheel's libcudart_static.a, is the only libcudart on
# LIBRARY_PATH), so the binary needs no CUDA library to start; cudart opens the driver itself, on
# first use.
#
# Folder: $AUDOTICS_CUDA_CACHE [~/.cache/audotics-trainer/cuda]/toolkit-13.0 (~1 GB).
set -euo pipefail
CACHE=${AUDOTICS_CUDA_CACHE:-$HOME/.cache/audotics-trainer/cuda}
VERSION=13.0
HOME_DIR=$CACHE/toolkit-$VERSION
WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)
say() { echo "cuda-toolkit: $*" >&2; }

if [ ! -e "$HOME_DIR/static-lib/libcudart.a" ]; then
    say "installing CUDA $VERSION's compiler from PyPI into $HOME_DIR"
    rm -rf "$HOME_DIR" "$CACHE/venv-$VERSION"
    mkdir -p "$CACHE"
    python3 -m venv "$CACHE/venv-$VERSION"
    "$CACHE/venv-$VERSION/bin/pip" install --quiet --disable-pip-version-check "${WHEELS[@]}"
    site=$("$CACHE/venv-$VERSION/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    wheel_root=$site/nvidia/cu13
    [ -x "$wheel_root/bin/nvcc" ] || { say "no nvcc under $wheel_root after installing"; exit 1; }
    # The layout nvcc and cudaforge expect of a toolkit: bin, include, nvvm, and lib64 with the
    # unversioned library names (the wheels ship lib/ with versioned names only).
    staging=$HOME_DIR.partial
    rm -rf "$staging"
    mkdir -p "$staging/lib64"
    for d in bin include nvvm; do ln -s "$wheel_root/$d" "$staging/$d"; done
    for lib in "$wheel_root"/lib/*.so*; do
        name=$(basename "$lib")
        ln -s "$lib" "$staging/lib64/$name"
        ln -sf "$lib" "$staging/lib64/${name%%.so*}.so"
    done
    for lib in "$wheel_root"/lib/*.a; do [ -e "$lib" ] && ln -s "$lib" "$staging/lib64/"; done
    mkdir -p "$staging/static-lib"
    ln -s "$wheel_root/lib/libcudart_static.a" "$staging/static-lib/libcudart.a"
    "$staging/bin/nvcc" --version >/dev/null
    mv "$staging" "$HOME_DIR"
    say "installed: $("$HOME_DIR/bin/nvcc" --version | tail -n 2 | head -n 1)"
fi

cat <<ENV
export CUDA_HOME='$HOME_DIR' CUDA_PATH='$HOME_DIR' CUDA_ROOT='$HOME_DIR'
export PATH='$HOME_DIR/bin':"\$PATH"
export LIBRARY_PATH='$HOME_DIR/static-lib'
ENV
