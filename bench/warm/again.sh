#!/usr/bin/env bash
# The warm request of bench/warm.sh again, alone, from the same parent: copies the first two
# versions of an earlier bench/warm.sh prefix (its full first version and the refresh, which is the
# warm run's parent) and its runs (the checkpoints a carried optimiser reads) into a new prefix with
# latest.json naming the refresh, grows the data (bench/warm/grow.sql), times one retrain request
# with warm starts on (bench/e2e.sh) per entry of WARM_OPTIMIZERS, each from its own copy, and
# shrinks the data back. Three minutes a request instead of bench/warm.sh's fifteen, for a change
# that affects only the warm run; its figure compares with that script's warm row.
#
#   FROM=warm-20261207T024535Z bench/warm/again.sh
#   FROM=warm-20261207T024535Z WARM_OPTIMIZERS="fresh carried fresh carried" bench/warm/again.sh
#
# Parameters: FROM (required: a prefix bench/warm.sh wrote under $OUT/s3/bench-e2e), WARM_OPTIMIZERS
# [fresh] (AUDOTICS_WARM_OPTIMIZER of each request, in order), and those of bench/e2e.sh (DB,
# ADMIN_URL, OUT, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${FROM:?FROM=<an earlier bench/warm.sh prefix>}"
ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=${DB:-bench_e2e}
OUT=${OUT:-target/bench-e2e}
URL=${ADMIN_URL%/*}/$DB
MODEL=content-based
SOURCE=$OUT/s3/bench-e2e/$FROM/$MODEL
WARM_OPTIMIZERS=${WARM_OPTIMIZERS:-fresh}
mapfile -t VERSIONS < <(ls "$SOURCE/versions" | sort | head -2)
[ "${#VERSIONS[@]}" -eq 2 ] || { echo "again: $SOURCE/versions holds fewer than two versions" >&2; exit 1; }
PARENT=${VERSIONS[1]}
# A new prefix holding the two versions and the runs, with latest.json naming the refresh.
copy_from() {
    local target=$OUT/s3/bench-e2e/$1/$MODEL
    mkdir -p "$target/versions"
    cp -a "$SOURCE/versions/${VERSIONS[0]}" "$SOURCE/versions/$PARENT" "$target/versions/"
    [ ! -d "$SOURCE/runs" ] || cp -a "$SOURCE/runs" "$target/"
    python3 - "$target" "$MODEL" "$PARENT" <<'PY'
import datetime, hashlib, json, sys
target, model, version = sys.argv[1:]
manifest = f"{model}/versions/{version}/manifest.json"
digest = hashlib.sha256(open(f"{target}/versions/{version}/manifest.json", "rb").read()).hexdigest()
now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
json.dump({"model": model, "version": version, "manifest": manifest, "manifest_sha256": digest, "updated_at": now},
          open(f"{target}/latest.json", "w"), indent=2)
PY
}
shrink() { psql "$URL" -Xq -f bench/warm/shrink.sql 2>/dev/null || true; }
trap shrink EXIT
psql "$URL" -X -f bench/warm/grow.sql
for optimizer in $WARM_OPTIMIZERS; do
    PREFIX=warm-again-$(date -u +%Y%m%dT%H%M%SZ)-$optimizer
    copy_from "$PREFIX"
    STORE_PREFIX=$PREFIX WARM_START=auto WARM_OPTIMIZER=$optimizer PARAMS='' OUT=$OUT bench/e2e.sh
done
