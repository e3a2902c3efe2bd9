#!/usr/bin/env bash
# Refresh, warm start and full retrain, end to end (issue 18's acceptance): on the 100k-track /
# 2M-interaction dataset of bench/e2e.sh, with one store prefix for the four requests,
#  1. a full version (the first of the model: warm start on, nothing to start from);
#  2. the history grown by 2 % new interactions and the catalogue by 1 % new tracks
#     (bench/warm/grow.sql), then a request with params {"refresh": true} → version 1's weights
#     embed the 1,000 new tracks, no training;
#  3. a retrain request → a warm start from version 2 (version 1's weights);
#  4. a retrain request with params {"full": true} on the same grown data → a full retrain.
# 2, 3 and 4 score on the same data with the same time-ordered hold-out, so their Recall@10
# compare directly. Each request is timed from publication to its model-ready by bench/e2e.sh; the
# results are the last four lines of $OUT/e2e.jsonl, summarised at the end. The grown rows are
# removed afterwards (bench/warm/shrink.sql), leaving bench_e2e as seeded.
#
# Parameters: STOP_AFTER [4] (2: only the full version and the refresh — the parent
# bench/warm/again.sh starts from, with the checkpoints of the run that trained it still there), and
# those of bench/e2e.sh (TRACKS, USERS, INTERACTIONS, SEED, DB, ADMIN_URL, OUT, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=${DB:-bench_e2e}
OUT=${OUT:-target/bench-e2e}
URL=${ADMIN_URL%/*}/$DB
PREFIX=warm-$(date -u +%Y%m%dT%H%M%SZ)
export STORE_PREFIX=$PREFIX WARM_START=auto OUT

say() { echo "warm: $*" >&2; }
shrink() { psql "$URL" -Xq -f bench/warm/shrink.sql 2>/dev/null || true; }

say "1/4: the first (full) version"
PARAMS='' bench/e2e.sh
trap shrink EXIT
say "2/4: growing the data, then a refresh"
psql "$URL" -X -f bench/warm/grow.sql
PARAMS='{"refresh": true}' bench/e2e.sh
if [ "${STOP_AFTER:-4}" -le 2 ]; then
    say "stopped after the refresh: FROM=$PREFIX bench/warm/again.sh starts from it"
    exit 0
fi
say "3/4: a warm retrain"
PARAMS='' bench/e2e.sh
say "4/4: a full retrain of the same grown data"
PARAMS='{"full": true}' bench/e2e.sh
python3 - "$OUT/e2e.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][-4:]
for name, r in zip(["full (first)", "refresh (grown)", "warm (grown)", "full (grown)"], rows):
    m = r.get("metrics") or {}
    print(f"{name:<18} request → {r['outcome']}: {r['total_seconds']:.1f} s; "
          f"Recall@10 {m.get('recall_at_10')} ± {m.get('recall_at_10_se')}; "
          f"epochs {m.get('epochs_trained')} (best {m.get('best_epoch')}); version {r['version']}")
PY
