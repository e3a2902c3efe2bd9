#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests that run the real binary.
# Release profile: the training tests run real epochs, and the README's first command shares the
# same build cache.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release --all-targets "$@"
