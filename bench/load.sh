#!/usr/bin/env bash
# Data-load benchmark (issue: load at the speed of COPY). For 1M and 10M interactions over 100k
# tracks: psql's \copy of the loader's queries to /dev/null (the ceiling), the trainer's loader,
# and a naive SELECT into owned strings. Each in its own process; peak memory per process.
#
#   bench/load.sh [admin-url]     default postgres://postgres@127.0.0.1:5432/postgres
#
# Seeds two databases (bench_load_1m, bench_load_10m) once and keeps them (seeding 10M rows takes
# minutes); drop them by hand when done.
set -euo pipefail
cd "$(dirname "$0")/.."
ADMIN=${1:-postgres://postgres@127.0.0.1:5432/postgres}
cargo build --release --quiet
BIN=target/release/audotics-trainer
db_url() { echo "${ADMIN%/*}/$1"; }

TRACKS_Q='SELECT t."id", f."id", f."acousticness", f."danceability", f."energy", f."instrumentalness", f."key"::float8, f."liveness", f."loudness", f."mode"::float8, f."speechiness", f."tempo", f."valence" FROM "Track" t LEFT JOIN "TrackFeatures" f ON f."trackId" = t."id" ORDER BY t."id" COLLATE "C"'
INTER_Q='SELECT "userId", "trackId", "type", "timestamp" FROM "TrackInteraction"'

for size in 1m 10m; do
    name=bench_load_$size
    interactions=$([ $size = 1m ] && echo 1000000 || echo 10000000)
    url=$(db_url $name)
    if ! psql "$ADMIN" -XtAc "select 1 from pg_database where datname = '$name'" | grep -q 1; then
        psql "$ADMIN" -Xqc "create database $name"
        echo "seeding $name ($interactions interactions over 100k tracks)..." >&2
        $BIN --log-format json seed --database-url "$url" --synthetic-tracks 100000 --synthetic-users 10000 \
            --synthetic-interactions "$interactions" 2>/dev/null
        psql "$url" -Xqc 'vacuum analyze'
    fi
    # Warm the cache once, then measure each three times and keep the median.
    psql "$url" -Xqc "\\copy ($INTER_Q) to '/dev/null'" >/dev/null
    ceiling=()
    for _ in 1 2 3; do
        t0=$(date +%s.%N)
        psql "$url" -Xqc "\\copy ($TRACKS_Q) to '/dev/null'" >/dev/null
        psql "$url" -Xqc "\\copy ($INTER_Q) to '/dev/null'" >/dev/null
        ceiling+=("$(echo "$(date +%s.%N) - $t0" | bc)")
    done
    median() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
    echo "{\"size\":\"$size\",\"mode\":\"psql-copy-ceiling\",\"seconds\":$(median "${ceiling[@]}"),\"interactions\":$interactions}"
    for mode in copy naive; do
        runs=()
        for _ in 1 2 3; do runs+=("$($BIN --log-format json bench-load --database-url "$url" --mode $mode 2>/dev/null)"); done
        printf '%s\n' "${runs[@]}" | python3 -c "
import sys, json
rs = sorted((json.loads(l) for l in sys.stdin), key=lambda r: r['seconds'])
r = rs[1]; r['size'] = '$size'; print(json.dumps(r))"
    done
done
