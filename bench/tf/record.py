#!/usr/bin/env python3
"""Appends the last JSON line on stdin to results.jsonl with bench/tf/run.sh's labels, and prints a
one-line summary on stderr (standard library only).

    ... | python3 bench/tf/record.py PHASE IMPL ROUND EPOCHS THREADS RESULTS
"""

import json
import sys


def main(phase, impl, rnd, epochs, threads, out):
    lines = [line for line in sys.stdin.read().splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"no result line from {impl} ({phase}, round {rnd})")
    r = json.loads(lines[-1])
    r.update(phase=phase, impl_mode=impl, round=int(rnd), epochs_run=int(epochs), threads=int(threads))
    with open(out, "a") as f:
        f.write(json.dumps(r) + "\n")
    rate = r.get("median_pairs_per_second") or 0.0
    recall = r.get("recall_at_10", float("nan"))
    print(f"  {phase:10} {impl:5} {r['loss']:11} B{r['batch_size']:<5} {rate:9.0f} pairs/s  Recall@10 {recall:.4f}",
          file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
