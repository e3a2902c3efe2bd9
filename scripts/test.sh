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
finish() { # waits for a background job, shows its log, stops here if it failed
    local status=0
    wait "$2" || status=$?
    cat "target/$1.log"
    if [ "$status" -ne 0 ]; then
        echo "test.sh: scripts/$1.sh failed (exit $status); its output is above" >&2
        exit "$status"
    fi
}
if [ "$#" -gt 0 ]; then
    cargo test --release --all-targets --no-run
    finish consumers "$consumers"
    finish validate "$validate"
    exec cargo test --release --all-targets "$@"
fi
# The worker suite (real worker processes, a broker restart, the fault suite) is the longest and
# spends most of its time waiting on clocks and processes: it is built first and started at once,
# its test binary directly (a second `cargo test` would wait for the first's lock), while the other
# targets compile and then run beside it.
worker_bin=$(cargo test --release --test worker --no-run --message-format=json-render-diagnostics | python3 -c '
import json, sys
print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "worker"][-1])')
finish consumers "$consumers" # the worker suite loads a published model in Keras
"$worker_bin" > target/worker-tests.log 2>&1 &
worker=$!
cargo test --release --all-targets --no-run
finish validate "$validate"
targets=(--lib --bins)
for t in tests/*.rs tests/*/main.rs; do
    name=$(basename "${t%/main.rs}" .rs)
    [ "$name" = worker ] || targets+=(--test "$name")
done
status=0
cargo test --release "${targets[@]}" || status=$?
worker_status=0
wait "$worker" || worker_status=$?
echo "== worker suite (tests/worker, run alongside the above)"
cat target/worker-tests.log
if [ "$status" -ne 0 ] || [ "$worker_status" -ne 0 ]; then
    echo "test.sh: failed (other targets: exit $status, worker suite: exit $worker_status)" >&2
    exit 1
fi
