#!/usr/bin/env python3
"""Builds bench/e2e.sh's result from what the run left behind; standard library only.

    report.py --log WORKER_LOG --event EVENT_JSON --published-at T0 --confirmed-at T1 \
              --metrics METRICS_TXT --ledger LEDGER_JSON --request REQUEST_JSON --vmhwm-kib N \
              --config CONFIG_JSON --jsonl OUT_FILE

Appends one JSON line to OUT_FILE and prints a short human summary on stdout. Phases come from the
timestamps of the worker's own JSON log lines (its tracing events), the upload time from its
`audotics_publish_seconds` metric, and the run's row in `audotics_trainer.training_runs`.
"""

import argparse
import datetime as dt
import json
import re


def ts(line):
    return dt.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


def metric_sum(text, name):
    """Sum of a Prometheus series' values over all label sets (e.g. a histogram's _sum)."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M):
        total += float(m.group(1))
        found = True
    return total if found else None


def main():
    p = argparse.ArgumentParser()
    for flag in ("log", "event", "metrics", "ledger", "request", "config", "jsonl"):
        p.add_argument(f"--{flag}", required=True)
    p.add_argument("--published-at", type=float, required=True)
    p.add_argument("--confirmed-at", type=float, required=True)
    p.add_argument("--vmhwm-kib", type=int, required=True)
    a = p.parse_args()

    event = json.load(open(a.event))
    body = event["body"]
    config = json.load(open(a.config))
    metrics = open(a.metrics).read()
    ledger = json.loads(open(a.ledger).read() or "null") or {}
    request = json.loads(open(a.request).read() or "null") or {}
    run_id = body.get("run_id")

    lines = []
    for raw in open(a.log):
        try:
            lines.append(json.loads(raw))
        except ValueError:
            pass

    def in_run(line):
        span = line.get("span") or {}
        return run_id is None or span.get("run_id") in (None, run_id)

    def first(message):
        for line in lines:
            if line.get("fields", {}).get("message") == message and in_run(line):
                return line
        return None

    def last(message):
        found = [line for line in lines if line.get("fields", {}).get("message") == message and in_run(line)]
        return found[-1] if found else None

    t0 = a.published_at
    t_received = event["received_at"]
    marks = {
        "request recorded": first("retrain request recorded"),
        "run claimed": first("run claimed"),
        "run started": first("run started"),
        "platform data loaded": first("platform data loaded"),
        "data loaded": first("data loaded"),
        "data prepared": first("data prepared"),
        "baselines": first("baselines"),
        "last epoch": last("epoch finished"),
        "version published": first("version published"),
        "version written": first("version written"),
        "run ended": first("run ended"),
        "event published": first("event published"),
    }
    at = {k: (ts(v) if v else None) for k, v in marks.items()}
    epochs = [line["fields"] for line in lines if line.get("fields", {}).get("message") == "epoch finished"]
    upload_s = metric_sum(metrics, "audotics_publish_seconds_sum")

    def span(a_, b_):
        x = at[a_] if a_ != "publish" else t0
        y = at[b_] if b_ != "received" else t_received
        return None if x is None or y is None else round(y - x, 3)

    prepared = (marks["data prepared"] or {}).get("fields", {})
    pairs_per_epoch = prepared.get("pairs_per_epoch")
    train_only = [pairs_per_epoch / e["pairs_per_second"] for e in epochs if pairs_per_epoch and e.get("pairs_per_second")]
    epoch_s = [e["seconds"] for e in epochs]
    after_training = span("last epoch", "version published")
    phases = {
        # publish → the worker has the request in Postgres and acked it
        "ingest": span("publish", "request recorded"),
        "claim": span("request recorded", "run claimed"),
        # run.json to the store, ledger row, checkpoint listing
        "run_setup": span("run claimed", "run started"),
        # binary COPY of tracks ⟕ features and interactions, decoded and interned
        "load": span("run started", "platform data loaded"),
        # standardisation, per-user split, the pair-mining index, trainer set-up
        "pair_mining_prep": span("data loaded", "data prepared"),
        # random, popularity, raw-feature and item-CF Recall@10 over the evaluation users
        "baselines": span("data prepared", "baselines"),
        # every epoch: sample pairs, train, validation loss, embed all tracks, Recall@10, checkpoint
        "training": span("baselines", "last epoch"),
        # final embeddings and evaluation, serialising the artifacts (weights, embeddings, .keras,
        # TF.js, model card, metadata), quality gate
        "final_eval_export": None if after_training is None or upload_s is None else round(after_training - upload_s, 3),
        # artifacts, manifest and latest.json to S3 (the worker's audotics_publish_seconds)
        "upload": None if upload_s is None else round(upload_s, 3),
        # retention, the ledger's end row, the run's end and its outbox row in one transaction
        "retention_and_conclude": span("version published", "run ended"),
        # the outbox publishes model-ready (confirmed) and it reaches the recording queue; the
        # worker logs "event published" only after the confirm, usually after the delivery
        "announce": span("run ended", "received"),
    }
    loaded = (marks["platform data loaded"] or {}).get("fields", {})
    load_s = phases["load"]
    interactions = loaded.get("interactions")
    tracks = loaded.get("tracks")
    result = {
        "bench": "e2e",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "outcome": event["routing_key"].split(".")[0],
        "total_seconds": round(t_received - t0, 3),
        "publish_confirm_seconds": round(a.confirmed_at - t0, 3),
        "phases_seconds": phases,
        "epochs": {
            "count": len(epochs),
            "pairs_per_epoch": pairs_per_epoch,
            "seconds": [round(s, 2) for s in epoch_s],
            "train_only_seconds": [round(s, 2) for s in train_only],
            "eval_and_checkpoint_seconds": [round(s - t, 2) for s, t in zip(epoch_s, train_only)],
            "pairs_per_second": [e.get("pairs_per_second") for e in epochs],
            "recall_at_10": [round(e.get("recall_at_10", 0), 4) for e in epochs],
        },
        "data": {
            "tracks": tracks,
            "users": loaded.get("users"),
            "interactions": interactions,
            "interactions_per_second": round(interactions / load_s) if interactions and load_s else None,
            "rows_per_second": round((interactions + tracks) / load_s) if interactions and tracks and load_s else None,
            "training_user_tracks": prepared.get("training_user_tracks"),
            "heldout_user_tracks": prepared.get("heldout_user_tracks"),
        },
        "peak_rss_mib": round(a.vmhwm_kib / 1024, 1),
        "rss_mib_logged": {
            "after_load": (marks["data loaded"] or {}).get("fields", {}).get("rss_mib"),
            "after_prepare": prepared.get("rss_mib"),
            "peak_at_last_epoch": (marks["last epoch"] or {}).get("fields", {}).get("peak_rss_mib"),
        },
        "version": body.get("version"),
        "run_id": run_id,
        "manifest": (body.get("artifacts") or {}).get("manifest"),
        "metrics": body.get("metrics") or body.get("reason") or body.get("error"),
        "satisfies": body.get("satisfies"),
        "worker_run_seconds": (marks["run ended"] or {}).get("fields", {}).get("seconds"),
        "ledger": {
            "status": ledger.get("status"),
            "started_at": ledger.get("started_at"),
            "finished_at": ledger.get("finished_at"),
            "interaction_count": ledger.get("interaction_count"),
            "artifact_location": ledger.get("artifact_location"),
        },
        "request_row": {k: request.get(k) for k in ("received_at", "answered_at", "answer", "answered_version")},
    }
    with open(a.jsonl, "a") as f:
        f.write(json.dumps(result) + "\n")

    def fmt(v):
        return "—" if v is None else f"{v:.1f} s"

    print(f"request → {result['outcome']}: {result['total_seconds']:.1f} s "
          f"(version {result['version']}, {len(epochs)} epochs × {pairs_per_epoch} pairs)")
    for name, v in phases.items():
        print(f"  {name:<24} {fmt(v)}")
    d = result["data"]
    print(f"  load: {d['tracks']} tracks + {d['interactions']} interactions, "
          f"{d['rows_per_second'] or 0:,} rows/s ({d['interactions_per_second'] or 0:,} interactions/s)")
    if epoch_s:
        print(f"  epochs: {sum(epoch_s) / len(epoch_s):.1f} s each on average, of which training "
              f"{sum(train_only) / max(len(train_only), 1):.1f} s; final Recall@10 "
              f"{(body.get('metrics') or {}).get('recall_at_10')}")
    print(f"  worker peak RSS (VmHWM): {result['peak_rss_mib']} MiB; CPU {config.get('worker_cpu_user_seconds')} s user + "
          f"{config.get('worker_cpu_system_seconds')} s system, {config.get('worker_threads')} threads")
    print(f"  manifest: {result['manifest']}")


if __name__ == "__main__":
    main()
