#!/usr/bin/env bash
# The warm request of bench/warm.sh again, alone, from the same parent: copies the first two
# versions of an earlier bench/warm.sh prefix (its full first version and the refresh, which is the
# warm run's parent) into a new prefix with latest.json naming the refresh, grows the data
# (bench/warm/grow.sql), times one retrain request with warm starts on (bench/e2e.sh), and shrinks
# the data back. Three minutes instead of bench/warm.sh's fifteen, for a change that affects only
# the warm run; its figure compares with that script's warm row.
#
#   FROM=warm-20261207T024535Z bench/warm/again.sh
#
# Parameters: FROM (required: a prefix bench/warm.sh wrote under $OUT/s3/bench-e2e), and those of
# bench/e2e.sh (DB, ADMIN_URL, OUT, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${FROM:?FROM=<an earlier bench/warm.sh prefix>}"
ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=${DB:-bench_e2e}
OUT=${OUT:-target/bench-e2e}
URL=${ADMIN_URL%/*}/$DB
MODEL=content-based
SOURCE=$OUT/s3/bench-e2e/$FROM/$MODEL/versions
PREFIX=warm-again-$(date -u +%Y%m%dT%H%M%SZ)
TARGET=$OUT/s3/bench-e2e/$PREFIX/$MODEL
mapfile -t VERSIONS < <(ls "$SOURCE" | sort | head -2)
[ "${#VERSIONS[@]}" -eq 2 ] || { echo "again: $SOURCE holds fewer than two versions" >&2; exit 1; }
mkdir -p "$TARGET/versions"
cp -a "$SOURCE/${VERSIONS[0]}" "$SOURCE/${VERSIONS[1]}" "$TARGET/versions/"
PARENT=${VERSIONS[1]}
python3 - "$TARGET" "$MODEL" "$PARENT" <<'PY'
import datetime, hashlib, json, sys
target, model, version = sys.argv[1:]
manifest = f"{model}/versions/{version}/manifest.json"
digest = hashlib.sha256(open(f"{target}/versions/{version}/manifest.json", "rb").read()).hexdigest()
now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
json.dump({"model": model, "version": version, "manifest": manifest, "manifest_sha256": digest, "updated_at": now},
          open(f"{target}/latest.json", "w"), indent=2)
PY
shrink() { psql "$URL" -Xq -f bench/warm/shrink.sql 2>/dev/null || true; }
trap shrink EXIT
psql "$URL" -X -f bench/warm/grow.sql
STORE_PREFIX=$PREFIX WARM_START=auto PARAMS='' OUT=$OUT bench/e2e.sh
