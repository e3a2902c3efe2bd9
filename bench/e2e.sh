#!/usr/bin/env bash
# End-to-end benchmark of the retrain worker: the wall time from publishing one `retrain` request
# (as a platform service does) to receiving its `model-ready` event, on the 100k-track / 10k-user /
# 2M-interaction dataset, with the real binary against real PostgreSQL, RabbitMQ and S3 (s3s-fs).
#
#   bench/e2e.sh                                        # minutes (early stopping decides), plus seeding once
#   EPOCHS=1 MAX_PAIRS_PER_EPOCH=200000 bench/e2e.sh    # a smoke run on the same data (~15 s of training)
#
# What it does:
#  1. starts PostgreSQL and RabbitMQ and installs s3s-fs where missing (scripts/services.sh);
#  2. builds the release binary and runs a COPY of it from a temporary folder (target/release may be
#     rebuilt meanwhile); seeds database $DB once with `seed` (skipped when the database's comment
#     says it holds this size and seed, else dropped and rebuilt; seeding 2M interactions takes
#     minutes) and drops the trainer's own schema `audotics_trainer` there, so that no run, lease
#     or pending request of an earlier benchmark is picked up (the worker migrates it afresh);
#  3. starts its own s3s-fs on a free loopback port (data under $OUT/s3, bucket `bench-e2e`, a new
#     prefix per run), a RabbitMQ vhost of its own (deleted on exit), and ONE `worker` process with
#     the deployment's settings (deploy/base/configmap.yaml: CPU, JSON logs, defaults otherwise)
#     except for the training budget below; waits for /readyz;
#  4. binds an exclusive recording queue to model-ready.* / model-rejected.* / model-failed.* on
#     audotics.events (bench/e2e/amqp_listen.py, a standard-library AMQP client), then publishes one
#     request with the binary's own `retrain` command (publisher confirms, the platform's JSON) and
#     times until the answer arrives;
#  5. reads the worker's peak RSS (VmHWM) and CPU time before stopping it with SIGTERM, its
#     /metrics, its JSON log and the run's row in audotics_trainer.training_runs, and reports the
#     total, the phases the worker's log marks (ingest, claim, load, pair-mining set-up,
#     baselines, training, final evaluation + export, upload, conclusion, announcement), rows
#     loaded per second, per-epoch times, the version and its manifest's s3:// URL
#     (bench/e2e/report.py);
#  6. appends the result as one JSON line to $OUT/e2e.jsonl, prints a summary, keeps the worker's
#     log as $OUT/worker-<run>.log. The worker, s3s-fs and the vhost are cleaned up on exit.
#
# The training budget. The benchmark runs a deployment's defaults (deploy/base/configmap.yaml sets no
# training variable): at most 50 epochs of every mined pair (~3.1M pairs an epoch at this size), with
# early stopping (patience 5: the run ends 5 epochs after its best validation Recall@10, whose weights
# are published), E 64, batch 64, contrastive τ 0.05 with logQ correction and centering, 5 partners
# per track, ≤ 500 pairs per user, 5,000 evaluation users, the time-ordered hold-out, auto CPU
# threads. Before early stopping a run trained all 50 epochs (~30 minutes here); EPOCHS=5 gives the
# old 5-epoch budget, MAX_PAIRS_PER_EPOCH=200000 EPOCHS=10 BENCHMARKS.md's capped epochs.
# The worker's auto CPU threads are 1 at batch ≤ 512 (as `train`'s): before that was so, it used
# both cores at batch 64 and trained the same bits ~3× slower (1 epoch: 30.5 s vs 10.5 s, with 19 s
# of system CPU in thread hand-offs).
#
# Parameters (environment variables, defaults in brackets): ADMIN_URL
# [postgres://postgres@127.0.0.1:5432/postgres] DB [bench_e2e] TRACKS [100000] USERS [10000]
# INTERACTIONS [2000000] SEED [42] EPOCHS [50] MAX_PAIRS_PER_EPOCH [0] (0 = every mined pair)
# BATCH_SIZE [64] CPU_THREADS [0] (AUDOTICS_CPU_THREADS; 0 = the worker's auto) TIMEOUT_S [3600]
# (the longest wait for the answer) OUT [target/bench-e2e] STORE_PREFIX [a new one per run: the
# store's prefix; bench/warm.sh reuses one so that a later request finds the earlier version]
# WARM_START [off] (AUDOTICS_WARM_START) WARM_OPTIMIZER [fresh] (AUDOTICS_WARM_OPTIMIZER) PARAMS
# [none] (the request's params JSON, e.g. '{"full": true}'). s3s-fs from S3S_FS_BIN, else
# ~/.cargo/bin. Drop the database by hand when done (`dropdb -h 127.0.0.1 -U postgres bench_e2e`),
# and $OUT/s3 (each run leaves its ~30 MB version there).
set -euo pipefail
cd "$(dirname "$0")/.."

ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=${DB:-bench_e2e}
TRACKS=${TRACKS:-100000}
USERS=${USERS:-10000}
INTERACTIONS=${INTERACTIONS:-2000000}
SEED=${SEED:-42}
EPOCHS=${EPOCHS:-50}
MAX_PAIRS_PER_EPOCH=${MAX_PAIRS_PER_EPOCH:-0}
BATCH_SIZE=${BATCH_SIZE:-64}
CPU_THREADS=${CPU_THREADS:-0}
TIMEOUT_S=${TIMEOUT_S:-3600}
OUT=${OUT:-target/bench-e2e}
WARM_START=${WARM_START:-off}
WARM_OPTIMIZER=${WARM_OPTIMIZER:-fresh}
PARAMS=${PARAMS:-}
MODEL=content-based
BUCKET=bench-e2e

say() { echo "e2e: $*" >&2; }
now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# 1. Services.
scripts/services.sh postgres rabbitmq s3
S3S_FS=${S3S_FS_BIN:-${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs}

# 2. The binary (a copy: target/release may be rebuilt while we run) and the data.
cargo build --release --quiet
WORK=$(mktemp -d /tmp/bench-e2e.XXXXXX)
RUN=$(date -u +%Y%m%dT%H%M%SZ)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
VHOST=bench-e2e-$RUN
WORKER_PID='' LISTENER_PID='' S3_PID='' VHOST_MADE=''
cleanup() {
    local rc=$?
    set +e
    [ -n "$LISTENER_PID" ] && kill "$LISTENER_PID" 2>/dev/null
    if [ -n "$WORKER_PID" ] && kill -0 "$WORKER_PID" 2>/dev/null; then
        kill -TERM "$WORKER_PID" 2>/dev/null
        for _ in $(seq 1 150); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$WORKER_PID" 2>/dev/null
    fi
    [ -n "$S3_PID" ] && kill "$S3_PID" 2>/dev/null
    [ -n "$VHOST_MADE" ] && rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cp target/release/audotics-trainer "$WORK/audotics-trainer"
BIN=$WORK/audotics-trainer
REV=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo -dirty)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
URL=${ADMIN_URL%/*}/$DB

SPEC="bench/e2e.sh seeded: tracks=$TRACKS users=$USERS interactions=$INTERACTIONS seed=$SEED"
SEED_SECONDS=null
if [ "$(psql "$ADMIN_URL" -XtAc "select shobj_description(oid, 'pg_database') from pg_database where datname = '$DB'")" != "$SPEC" ]; then
    # Anything else under this name (another size, an interrupted seeding) is rebuilt from scratch.
    psql "$ADMIN_URL" -Xq -c 'set client_min_messages = warning' -c "drop database if exists $DB" -c "create database $DB"
    say "seeding $DB: $TRACKS tracks, $USERS users, $INTERACTIONS interactions (minutes)..."
    t=$(now)
    env -i PATH="$PATH" "$BIN" --log-format json seed --database-url "$URL" --seed "$SEED" \
        --synthetic-tracks "$TRACKS" --synthetic-users "$USERS" --synthetic-interactions "$INTERACTIONS" \
        >"$OUT/seed.json" 2>"$OUT/seed.log"
    psql "$URL" -Xqc 'vacuum analyze'
    SEED_SECONDS=$(echo "$(now) - $t" | bc)
    psql "$ADMIN_URL" -Xqc "comment on database $DB is '$SPEC'"
    say "seeded in ${SEED_SECONDS}s: $(cat "$OUT/seed.json")"
fi
psql "$URL" -Xq -c 'set client_min_messages = warning' -c 'drop schema if exists audotics_trainer cascade'

# 3. A store, a vhost and one worker of this run's own.
mkdir -p "$OUT/s3/$BUCKET"
S3_PORT=$(free_port)
S3_KEY=bench-e2e S3_SECRET=bench-e2e-secret
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_KEY" --secret-key "$S3_SECRET" "$OUT/s3" \
    >"$WORK/s3s-fs.log" 2>&1 &
S3_PID=$!
for _ in $(seq 1 100); do port_open 127.0.0.1 "$S3_PORT" && break; sleep 0.2; done
port_open 127.0.0.1 "$S3_PORT" || { say "s3s-fs did not start:"; cat "$WORK/s3s-fs.log" >&2; exit 1; }

rabbitmqctl -q add_vhost "$VHOST" >/dev/null
VHOST_MADE=1
rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null
AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$VHOST
STORE_PREFIX=${STORE_PREFIX:-$RUN}
STORE=s3://$BUCKET/$STORE_PREFIX
HTTP_PORT=$(free_port)
LOG=$OUT/worker-$RUN.log
env -i PATH="$PATH" HOME="$HOME" \
    DATABASE_URL="$URL" AMQP_URL="$AMQP_URL" MODEL_STORE_URL="$STORE" \
    AWS_ENDPOINT="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" \
    WORKER_ID="bench-e2e-$RUN" WORKER_MODELS="$MODEL" WORKER_HTTP_ADDR="127.0.0.1:$HTTP_PORT" \
    AUDOTICS_DEVICE=cpu AUDOTICS_LOG_FORMAT=json RUST_LOG=info \
    AUDOTICS_EPOCHS="$EPOCHS" AUDOTICS_BATCH_SIZE="$BATCH_SIZE" AUDOTICS_MAX_PAIRS_PER_EPOCH="$MAX_PAIRS_PER_EPOCH" \
    AUDOTICS_CPU_THREADS="$CPU_THREADS" AUDOTICS_WARM_START="$WARM_START" \
    AUDOTICS_WARM_OPTIMIZER="$WARM_OPTIMIZER" "$BIN" worker 2>"$LOG" >/dev/null &
WORKER_PID=$!
say "worker $WORKER_PID (log $LOG), store $STORE, vhost $VHOST"
ready=''
for _ in $(seq 1 240); do
    kill -0 "$WORKER_PID" 2>/dev/null || { say "the worker exited before it was ready:"; tail -n 20 "$LOG" >&2; exit 1; }
    if curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.5
done
[ -n "$ready" ] || { say "the worker was not ready within 120 s:"; tail -n 20 "$LOG" >&2; exit 1; }

# 4. Record the answer, then publish the request.
python3 bench/e2e/amqp_listen.py --vhost "$VHOST" --queue bench.e2e.events --ready-file "$WORK/listening" \
    --timeout "$TIMEOUT_S" >"$WORK/event.json" 2>"$WORK/listen.err" &
LISTENER_PID=$!
for _ in $(seq 1 100); do [ -e "$WORK/listening" ] && break; kill -0 "$LISTENER_PID" 2>/dev/null || break; sleep 0.1; done
[ -e "$WORK/listening" ] || { say "the event listener did not bind its queue:"; cat "$WORK/listen.err" >&2; exit 1; }

say "publishing retrain.$MODEL ($EPOCHS epochs, max pairs per epoch $MAX_PAIRS_PER_EPOCH (0 = all), batch $BATCH_SIZE)"
T0=$(now)
EVENT_ID=$(env -i PATH="$PATH" AMQP_URL="$AMQP_URL" "$BIN" --log-format json retrain --model "$MODEL" \
    --reason "bench/e2e.sh $RUN" ${PARAMS:+--params "$PARAMS"} 2>"$WORK/retrain.log") \
    || { say "retrain failed:"; cat "$WORK/retrain.log" >&2; exit 1; }
T1=$(now)
while kill -0 "$LISTENER_PID" 2>/dev/null; do
    kill -0 "$WORKER_PID" 2>/dev/null || { say "the worker died mid-run:"; tail -n 20 "$LOG" >&2; exit 1; }
    sleep 0.2
done
wait "$LISTENER_PID" || { say "no answer:"; cat "$WORK/listen.err" >&2; exit 1; }
LISTENER_PID=''

# 5. What the worker says about it, before it stops.
VMHWM_KIB=$(awk '/^VmHWM:/ {print $2}' "/proc/$WORKER_PID/status")
THREADS=$(awk '/^Threads:/ {print $2}' "/proc/$WORKER_PID/status")
# utime and stime: fields 14 and 15 of /proc/<pid>/stat (after the parenthesised name), in ticks.
read -r UTIME STIME < <(sed 's/^.*) //' "/proc/$WORKER_PID/stat" | awk -v hz="$(getconf CLK_TCK)" '{print $12 / hz, $13 / hz}')
curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" >"$WORK/metrics.txt"
RUN_ID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["body"].get("run_id") or "")' "$WORK/event.json")
psql "$URL" -XtAc "select row_to_json(t) from audotics_trainer.training_runs t where id::text = '$RUN_ID'" >"$WORK/ledger.json"
psql "$URL" -XtAc "select row_to_json(r) from audotics_trainer.retrain_requests r where event_id = '$EVENT_ID'" >"$WORK/request.json"
kill -TERM "$WORKER_PID"
WORKER_EXIT=0
wait "$WORKER_PID" || WORKER_EXIT=$?
WORKER_PID=''
[ "$WORKER_EXIT" -eq 0 ] || say "warning: the worker exited with status $WORKER_EXIT on SIGTERM (expected 0)"

# 6. The result.
cat >"$WORK/config.json" <<EOF
{"run": "$RUN", "binary_rev": "$REV", "db": "$DB", "tracks": $TRACKS, "users": $USERS,
 "interactions_seeded": $INTERACTIONS, "seed": $SEED, "epochs": $EPOCHS, "batch_size": $BATCH_SIZE,
 "max_pairs_per_epoch": $MAX_PAIRS_PER_EPOCH, "cpu_threads": $CPU_THREADS, "device": "cpu",
 "warm_start": "$WARM_START", "warm_optimizer": "$WARM_OPTIMIZER", "params": ${PARAMS:-null},
 "seed_seconds": $SEED_SECONDS, "event_id": "$EVENT_ID", "store": "$STORE",
 "store_dir": "$OUT/s3/$BUCKET/$STORE_PREFIX", "worker_exit_on_sigterm": $WORKER_EXIT, "nproc": $(nproc),
 "worker_threads": $THREADS, "worker_cpu_user_seconds": $UTIME, "worker_cpu_system_seconds": $STIME}
EOF
python3 bench/e2e/report.py --log "$LOG" --event "$WORK/event.json" --published-at "$T0" --confirmed-at "$T1" \
    --metrics "$WORK/metrics.txt" --ledger "$WORK/ledger.json" --request "$WORK/request.json" \
    --vmhwm-kib "$VMHWM_KIB" --config "$WORK/config.json" --jsonl "$OUT/e2e.jsonl"
say "result appended to $OUT/e2e.jsonl"
python3 - "$WORK/event.json" "$EVENT_ID" <<'EOF'
import json, sys
e = json.load(open(sys.argv[1]))
kind, satisfies = e["routing_key"].split(".")[0], e["body"].get("satisfies") or []
if kind != "model-ready" or sys.argv[2] not in satisfies:
    sys.exit(f"e2e: expected a model-ready satisfying {sys.argv[2]}, got {kind} satisfying {satisfies}")
EOF
