#!/usr/bin/env bash
# Installs the real consumers the artifact tests load models with: Keras 3 (JAX CPU backend) in
# .venv-consumers, and @tensorflow/tfjs in tests/consumers/node_modules. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-consumers/bin/python ] || ! KERAS_BACKEND=jax .venv-consumers/bin/python -c 'import keras, jax' 2>/dev/null; then
    echo "consumers: creating .venv-consumers (keras, jax)" >&2
    python3 -m venv .venv-consumers
    .venv-consumers/bin/pip install --quiet --disable-pip-version-check -r tests/consumers/requirements.txt
fi
if [ ! -d tests/consumers/node_modules/@tensorflow/tfjs ]; then
    command -v npm >/dev/null || { echo "consumers: npm is required (Node.js 18+)" >&2; exit 1; }
    echo "consumers: npm ci (@tensorflow/tfjs)" >&2
    (cd tests/consumers && npm ci --no-audit --no-fund --loglevel=error)
fi
