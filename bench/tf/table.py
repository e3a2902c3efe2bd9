#!/usr/bin/env python3
"""Markdown tables from bench/tf/run.sh's results.jsonl (standard library only).

    python3 bench/tf/table.py target/bench-tf/results.jsonl

Throughput runs ("phase": "throughput") are grouped by (implementation, loss, batch); with several
rounds each figure is the median over the rounds. Budget runs ("phase": "budget") are listed as they
are. "vs ours" is the implementation's pairs/s over ours for the same loss and batch.
"""

import json
import statistics
import sys
from collections import defaultdict

LABEL = {"ours": "ours (candle)", "graph": "TF graph (tf.function)", "eager": "TF eager (GradientTape loop)"}
ORDER = {"ours": 0, "graph": 1, "eager": 2}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    throughput = [r for r in rows if r.get("phase") == "throughput"]
    budget = [r for r in rows if r.get("phase") == "budget"]
    if throughput:
        r0 = throughput[0]
        groups = defaultdict(list)
        for r in throughput:
            groups[(r["loss"], r["batch_size"], r["impl_mode"])].append(r)
        ours_rate = {(k[0], k[1]): median(r["median_pairs_per_second"] for r in v)
                     for k, v in groups.items() if k[2] == "ours"}
        print(f"Throughput: {r0['tracks']:,} tracks, {r0['users']:,} users, {r0['interactions']:,} interactions, "
              f"{r0['epochs_run']} epochs per run (TF eager: see its pairs column), {r0['threads']} thread(s), "
              f"rounds: {max(r['round'] for r in throughput)}")
        print()
        print("| implementation | loss | batch | pairs/epoch | pairs/s | vs ours | CPU-s per 1M pairs "
              "| peak RSS MiB | Recall@10 | pairs trained per epoch |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for key in sorted(groups, key=lambda k: (k[0], k[1], ORDER[k[2]])):
            loss, batch, impl = key
            g = groups[key]
            rate = median(r["median_pairs_per_second"] for r in g)
            ours = ours_rate.get((loss, batch))
            ratio = f"{rate / ours:.2f}×" if rate and ours else "n/a"
            trained = g[0].get("epoch_pairs", [g[0]["pairs_per_epoch"]])[-1]
            print(f"| {LABEL[impl]} | {loss} | {batch} | {g[0]['pairs_per_epoch']:,} | **{fmt(rate, ',.0f')}** "
                  f"| {ratio} | {fmt(median(r['cpu_seconds_per_million_pairs'] for r in g), '.1f')} "
                  f"| {fmt(median(r['peak_rss_mib'] for r in g), '.0f')} "
                  f"| {fmt(median(r.get('recall_at_10') for r in g), '.4f')} | {trained:,} |")
    if budget:
        print()
        b0 = budget[0]
        print(f"Equal training-time budget: {b0['time_budget_seconds']:g} s of training each, loss {b0['loss']}, "
              f"batch {b0['batch_size']}, {b0['threads']} thread(s)")
        print()
        print("| implementation | pairs trained | epochs | pairs/s | Recall@10 | NDCG@10 |")
        print("|---|---|---|---|---|---|")
        for r in sorted(budget, key=lambda r: (r["round"], ORDER[r["impl_mode"]])):
            print(f"| {LABEL[r['impl_mode']]} | {r['trained_pairs']:,} | {r['epochs_trained']:.2f} "
                  f"| {r['pairs_per_second']:,.0f} | **{r['recall_at_10']:.4f}** | {r['ndcg_at_10']:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/bench-tf/results.jsonl")
