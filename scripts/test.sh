#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests that run the real binary against real
# services on loopback (PostgreSQL, RabbitMQ, an S3-compatible server: scripts/services.sh) and load
# its artifacts in real Keras 3 and TensorFlow.js (scripts/consumers.sh); and the deployment files,
# validated by real validators (scripts/validate.sh, then its --self-test: each check fails on a
# planted error). Release profile: the training tests run real epochs, and the README's first
# command shares the same build cache.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
mkdir -p target
# The consumers' and validators' tools download while the tests compile (network and disk vs CPU).
scripts/consumers.sh > target/consumers.log 2>&1 &
consumers=$!
(scripts/validate.sh && scripts/validate.sh --self-test) > target/validate.log 2>&1 &
validate=$!
cargo test --release --all-targets --no-run
for job in "consumers:$consumers" "validate:$validate"; do
    name=${job%%:*}
    status=0
    wait "${job#*:}" || status=$?
    cat "target/$name.log"
    if [ "$status" -ne 0 ]; then
        echo "test.sh: scripts/$name.sh failed (exit $status); its output is above" >&2
        exit "$status"
    fi
done
exec cargo test --release --all-targets "$@"
