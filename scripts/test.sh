#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests that run the real binary against real
# services on loopback (PostgreSQL, RabbitMQ, an S3-compatible server: scripts/services.sh) and load its
# artifacts in real Keras 3 and TensorFlow.js (scripts/consumers.sh); and the deployment files,
# validated by real validators (scripts/validate.sh).
# Release profile: the training tests run real epochs, and the README's first command shares the
# same build cache.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/consumers.sh
scripts/validate.sh              # deployment files, the AsyncAPI contract, .env.example (README: Deploy)
scripts/validate.sh --self-test  # …and each of those checks fails on a planted error
exec cargo test --release --all-targets "$@"
