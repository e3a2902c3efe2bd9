#!/usr/bin/env bash
# Side-by-side training benchmark: our trainer (candle) against a TensorFlow 2 / Keras port of the
# platform's old trainer (bench/tf/old_trainer.py), on the same data in the same run.
#
#   bench/tf/run.sh                       # the BENCHMARKS.md size: 10k tracks, 1k users, 100k interactions
#   TRACKS=600 USERS=60 INTERACTIONS=4000 EPOCHS=2 BUDGET_SECONDS=3 EAGER_MAX_STEPS=10 bench/tf/run.sh   # smoke
#
# What it does:
#  1. builds the release binary and bench/.venv-tf (bench/tf/setup.sh: pinned tensorflow-cpu, numpy);
#  2. checks the port: the TF losses on hand-computed cases (--self-test), then per batch size the
#     TF model against our reference values on the exported data (--verify: first-batch losses,
#     gradients, one Adam step from our initial weights, Recall@10 of raw features, popularity and
#     the initial model); any mismatch stops the run;
#  3. exports the data once per (batch size, loss) with the `tf-export` example (bench/tf/export/):
#     standardised features, every epoch's pairs in our training order, log q, the evaluation set;
#  4. throughput: for each round, batch size and loss, ours, TF graph and TF eager, each in its own
#     process, one after the other (the order reverses every other round, so that machine noise hits
#     both sides). Both train the same pairs from the same initial weights and report the median
#     pairs/s of the epochs after the first, CPU seconds per million pairs over those epochs, peak RSS
#     and Recall@10 after the epochs. TF eager is slow: it trains only the first EAGER_MAX_STEPS
#     batches of each of EAGER_EPOCHS epochs (same pairs per epoch, fewer trained; its Recall@10 is
#     then not comparable);
#  5. quality at an equal budget: BUDGET_SECONDS of training each (batches only; per-epoch evaluation
#     and pair sampling excluded on both sides, TF's tf.function tracing too), ours and TF graph,
#     contrastive at batch BUDGET_BATCH: Recall@10 of the model where the budget ran out;
#  6. writes every JSON line to $OUT/results.jsonl and prints markdown tables ($OUT/table.md).
#
# Parameters (environment variables, defaults in brackets): TRACKS [10000] USERS [1000]
# INTERACTIONS [100000] SEED [42] MAX_PAIRS_PER_EPOCH [200000] EPOCHS [3] THREADS [1] (ours:
# AUDOTICS_CPU_THREADS; TF: intra- and inter-op threads; 0 = each side's default)
# BATCH_SIZES ["64 1024"] LOSSES ["contrastive cosine"] ROUNDS [1] EAGER_EPOCHS [2]
# EAGER_MAX_STEPS [200] BUDGET_SECONDS [60] (0 skips step 5) BUDGET_BATCH [64] BUDGET_EPOCHS [40]
# (the most epochs either side may train in the budget; all are exported) OUT [target/bench-tf].
set -euo pipefail
cd "$(dirname "$0")/../.."

TRACKS=${TRACKS:-10000}
USERS=${USERS:-1000}
INTERACTIONS=${INTERACTIONS:-100000}
SEED=${SEED:-42}
MAX_PAIRS_PER_EPOCH=${MAX_PAIRS_PER_EPOCH:-200000}
EPOCHS=${EPOCHS:-3}
THREADS=${THREADS:-1}
BATCH_SIZES=${BATCH_SIZES:-64 1024}
LOSSES=${LOSSES:-contrastive cosine}
ROUNDS=${ROUNDS:-1}
EAGER_EPOCHS=${EAGER_EPOCHS:-2}
EAGER_MAX_STEPS=${EAGER_MAX_STEPS:-200}
BUDGET_SECONDS=${BUDGET_SECONDS:-60}
BUDGET_BATCH=${BUDGET_BATCH:-64}
BUDGET_EPOCHS=${BUDGET_EPOCHS:-40}
OUT=${OUT:-target/bench-tf}

cargo build --release --quiet --bin audotics-trainer --example tf-export
BIN=target/release/audotics-trainer
PY=$(bench/tf/setup.sh | tail -n 1)
TF=bench/tf/old_trainer.py
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
LOG=$OUT/stderr.log
: >"$RESULTS"
: >"$LOG"
SIZES=(--tracks "$TRACKS" --users "$USERS" --interactions "$INTERACTIONS" --seed "$SEED"
    --max-pairs-per-epoch "$MAX_PAIRS_PER_EPOCH")

# record PHASE IMPL ROUND EPOCHS: appends the last JSON line of stdin to results.jsonl, labelled.
record() { python3 bench/tf/record.py "$@" "$THREADS" "$RESULTS"; }

ours() { # ours PHASE ROUND BATCH LOSS EPOCHS BUDGET
    AUDOTICS_CPU_THREADS=$THREADS "$BIN" --log-format json bench "${SIZES[@]}" --batch-sizes "$3" \
        --losses "$4" --epochs "$5" --time-budget-seconds "$6" 2>>"$LOG" | record "$1" ours "$2" "$5"
}

tf_run() { # tf_run PHASE MODE ROUND EXPORT LOSS EPOCHS [extra flags...]
    local phase=$1 mode=$2 round=$3 export=$4 loss=$5 epochs=$6
    shift 6
    "$PY" "$TF" --export-dir "$export" --mode "$mode" --loss "$loss" --epochs "$epochs" \
        --threads "$THREADS" --seed "$SEED" "$@" 2>>"$LOG" | record "$phase" "$mode" "$round" "$epochs"
}

export_data() { # export_data DIR BATCH LOSS EPOCHS
    target/release/examples/tf-export "${SIZES[@]}" --batch-sizes "$2" --losses "$3" \
        --epochs "$4" --export-dir "$1" 2>>"$LOG" >/dev/null
}

echo "checking the TF port..." >&2
"$PY" "$TF" --self-test >"$OUT/self-test.json" 2>>"$LOG" || { cat "$OUT/self-test.json"; exit 1; }

echo "exporting the data..." >&2
for batch in $BATCH_SIZES; do
    for loss in $LOSSES; do
        export_data "$OUT/export/b$batch-$loss" "$batch" "$loss" "$EPOCHS"
    done
    # The reference values do not depend on the loss the export was made for (both are in it).
    first_loss=${LOSSES%% *}
    "$PY" "$TF" --export-dir "$OUT/export/b$batch-$first_loss" --verify >"$OUT/verify-b$batch.json" 2>>"$LOG" ||
        { echo "the TF port does not match ours at batch $batch: $OUT/verify-b$batch.json" >&2; exit 1; }
done

echo "throughput (ours, TF graph, TF eager; $ROUNDS round(s))..." >&2
for round in $(seq "$ROUNDS"); do
    for batch in $BATCH_SIZES; do
        for loss in $LOSSES; do
            export=$OUT/export/b$batch-$loss
            order="ours graph eager"
            [ $((round % 2)) -eq 0 ] && order="eager graph ours"
            for impl in $order; do
                case $impl in
                ours) ours throughput "$round" "$batch" "$loss" "$EPOCHS" 1000000000 ;;
                graph) tf_run throughput graph "$round" "$export" "$loss" "$EPOCHS" ;;
                eager) tf_run throughput eager "$round" "$export" "$loss" "$EAGER_EPOCHS" \
                    --max-steps-per-epoch "$EAGER_MAX_STEPS" ;;
                esac
            done
        done
    done
done

if [ "$BUDGET_SECONDS" != 0 ]; then
    echo "equal budget: ${BUDGET_SECONDS} s of training each (contrastive, batch $BUDGET_BATCH)..." >&2
    export=$OUT/export/budget-b$BUDGET_BATCH
    export_data "$export" "$BUDGET_BATCH" contrastive "$BUDGET_EPOCHS"
    for round in $(seq "$ROUNDS"); do
        order="ours graph"
        [ $((round % 2)) -eq 0 ] && order="graph ours"
        for impl in $order; do
            case $impl in
            ours) ours budget "$round" "$BUDGET_BATCH" contrastive "$BUDGET_EPOCHS" "$BUDGET_SECONDS" ;;
            graph) tf_run budget graph "$round" "$export" contrastive "$BUDGET_EPOCHS" \
                --time-budget-seconds "$BUDGET_SECONDS" ;;
            esac
        done
    done
fi

echo >&2
python3 bench/tf/table.py "$RESULTS" | tee "$OUT/table.md"
