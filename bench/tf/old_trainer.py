#!/usr/bin/env python3
"""The platform's old content-model trainer, in TensorFlow 2 / Keras, on the data
`cargo run --release --example tf-export -- --export-dir DIR` wrote: the benchmark's reference implementation (bench/tf/run.sh runs it).

It trains the model our trainer trains (src/model.rs), on the same standardised features, the same
pairs in the same order, with the same batch size, Adam settings and objective, and scores it with a
numpy port of our evaluation (src/eval.rs) on the same held-out set:

    Input(11) -> BatchNormalization(momentum 0.99, epsilon 1e-3) -> Dense(2E, relu) -> Dropout(0.2)
              -> Dense(E, relu) -> Dropout(0.2) -> Dense(E, tanh) -> L2 normalisation

Anchors and partners go through the encoder as one [2B, 11] batch (as ours does), so BatchNorm's
batch statistics cover both sides of each pair.

Modes:
  --mode graph   the train step (forward, loss, gradients, Adam) under tf.function: TF at its best.
  --mode eager   the same step run eagerly, op by op, in a Python GradientTape loop: how a hand-written
                 TF2 training loop runs without tf.function (the old trainer's eager loop). It is slow,
                 so --max-steps-per-epoch can cap it to the first N batches of each epoch (the epoch
                 still has the same pairs; only its first N batches are trained and timed).
Losses:
  --loss cosine       the old objective: mean negative cosine of the positive pairs.
  --loss contrastive  a port of ours (src/loss.rs, src/train.rs): symmetric in-batch softmax over
                      cos / temperature, accidental hits masked (-1e9), logQ correction, plus the
                      centering penalty weight * ||mean of the batch's 2B embeddings||^2.
Other modes:
  --verify     load our initial weights and check the port against the reference values in the
               export (first-batch losses, gradients, one Adam step, Recall@10 of raw features,
               popularity and the initial model); exit 1 on a mismatch.
  --self-test  the loss functions on the hand-computed cases of src/loss.rs's unit tests.

Prints one JSON line.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MASKED = -1e9
K = 10


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-dir", type=Path, help="what the tf-export example wrote")
    p.add_argument("--mode", choices=["graph", "eager"], default="graph")
    p.add_argument("--loss", choices=["contrastive", "cosine"], default="contrastive")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs to train; epoch e trains on the export's epoch ((e-1) mod exported)+1")
    p.add_argument("--time-budget-seconds", type=float, default=None,
                   help="stop once this much training time (batches only) is spent, at that batch")
    p.add_argument("--max-steps-per-epoch", type=int, default=0,
                   help="train only the first N batches of each epoch (0 = all); for the slow eager mode")
    p.add_argument("--threads", type=int, default=0,
                   help="TF intra- and inter-op threads (0 = TensorFlow's default: all cores)")
    p.add_argument("--init", choices=["ours", "keras"], default="ours",
                   help="start from our exported initial weights (default) or Keras' own initialisers "
                        "(the same Glorot-uniform distribution, other draws)")
    p.add_argument("--seed", type=int, default=42, help="Keras' seed (dropout, and --init keras)")
    p.add_argument("--verify", action="store_true", help="check the port against the export's reference values")
    p.add_argument("--self-test", action="store_true", help="check the losses on hand-computed cases")
    args = p.parse_args()
    if not args.self_test and args.export_dir is None:
        p.error("--export-dir is required (except with --self-test)")
    return args


args = parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if args.threads > 0:
    # Must happen before TensorFlow runs any op.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

import keras  # noqa: E402


# ------------------------------------------------------------------------------------------------
# The export


class Export:
    def __init__(self, d: Path):
        self.dir = d
        self.meta = json.loads((d / "export.json").read_text())
        self.features = np.load(d / "features.npy")
        self.logq = np.load(d / "logq.npy")
        self.track_counts = np.load(d / "track_counts.npy")
        self.epoch_files = sorted((d / "pairs").glob("epoch-*.npy"))
        if not self.epoch_files:
            raise SystemExit(f"{d}: no pairs/epoch-*.npy")
        self.eval_train = (np.load(d / "eval_train_offsets.npy"), np.load(d / "eval_train_tracks.npy"))
        self.eval_heldout = (np.load(d / "eval_heldout_offsets.npy"), np.load(d / "eval_heldout_tracks.npy"))
        self.model = self.meta["model"]
        self.training = self.meta["training"]

    def pairs(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s pairs (1-based), cycling through the exported epochs, as int32 [P, 2]."""
        return np.load(self.epoch_files[(epoch - 1) % len(self.epoch_files)]).astype(np.int32)

    def weights(self, prefix: str) -> dict:
        sub = "init" if prefix == "" else "check"
        return {name: np.load(self.dir / sub / f"{prefix}{name}.npy") for name in self.model["param_names"]}


# ------------------------------------------------------------------------------------------------
# Model


def build_encoder(embedding_size: int, dropout: float, bn_momentum=0.99, bn_epsilon=1e-3) -> keras.Model:
    e = embedding_size
    inputs = keras.Input((11,), name="features")
    x = keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, name="batch_normalization")(inputs)
    x = keras.layers.Dense(2 * e, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(e, activation="relu", name="dense_1")(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(e, activation="tanh", name="dense_2")(x)
    return keras.Model(inputs, x, name="track_encoder")


def load_weights(model: keras.Model, w: dict, prefix: str = ""):
    bn = model.get_layer("batch_normalization")
    bn.set_weights([w[f"{prefix}batch_normalization.{k}"] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
    for name in ("dense", "dense_1", "dense_2"):
        model.get_layer(name).set_weights([w[f"{prefix}{name}.kernel"], w[f"{prefix}{name}.bias"]])


def model_weights(model: keras.Model) -> dict:
    out = {}
    g, b, mm, mv = model.get_layer("batch_normalization").get_weights()
    out.update({"batch_normalization.gamma": g, "batch_normalization.beta": b,
                "batch_normalization.moving_mean": mm, "batch_normalization.moving_variance": mv})
    for name in ("dense", "dense_1", "dense_2"):
        k, bias = model.get_layer(name).get_weights()
        out[f"{name}.kernel"], out[f"{name}.bias"] = k, bias
    return out


def l2_normalize(x):
    """x / sqrt(max(sum x^2, 1e-24)), as src/model.rs (Keras' UnitNormalization up to rounding)."""
    return x / tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(x), axis=1, keepdims=True), 1e-24))


# ------------------------------------------------------------------------------------------------
# Losses (src/loss.rs and pair_loss in src/train.rs)


def softmax_ce_diagonal(logits, query_tracks, cand_tracks, cand_logq):
    """Mean over rows i of -log softmax(logits_i)[i], with off-diagonal candidates whose track is the
    target's track or the query's own track masked, and -log q of each candidate added."""
    b = tf.shape(logits)[0]
    eye = tf.eye(b, dtype=logits.dtype)
    same_as_target = tf.cast(tf.equal(cand_tracks[:, None], cand_tracks[None, :]), logits.dtype)
    same_as_query = tf.cast(tf.equal(query_tracks[:, None], cand_tracks[None, :]), logits.dtype)
    hits = tf.nn.relu(tf.maximum(same_as_target, same_as_query) - eye)
    logits = logits + hits * MASKED
    if cand_logq is not None:
        logits = logits - cand_logq[None, :]
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_mean(tf.linalg.diag_part(log_probs))


def contrastive_objective(za, zb, ta, tb, logq_a, logq_b, temperature):
    logits = tf.matmul(za, zb, transpose_b=True) / temperature
    forward = softmax_ce_diagonal(logits, ta, tb, logq_b)
    backward = softmax_ce_diagonal(tf.transpose(logits), tb, ta, logq_a)
    return (forward + backward) / 2.0


def cosine_objective(za, zb):
    return -tf.reduce_mean(tf.reduce_sum(za * zb, axis=1))


def make_pair_loss(kind, temperature, logq, centering_weight):
    """loss(z [2B, E] normalised, ta [B], tb [B]) as pair_loss in src/train.rs."""

    def pair_loss(z, ta, tb):
        b = tf.shape(ta)[0]
        za, zb = z[:b], z[b:]
        if kind == "cosine":
            return cosine_objective(za, zb)  # no centering: the old objective exactly
        lq_a = None if logq is None else tf.gather(logq, ta)
        lq_b = None if logq is None else tf.gather(logq, tb)
        objective = contrastive_objective(za, zb, ta, tb, lq_a, lq_b, temperature)
        if centering_weight > 0:
            objective = objective + centering_weight * tf.reduce_sum(tf.square(tf.reduce_mean(z, axis=0)))
        return objective

    return pair_loss


# ------------------------------------------------------------------------------------------------
# Evaluation (numpy port of src/eval.rs)


def evaluate(embeddings: np.ndarray, ex: Export, global_scores: np.ndarray = None) -> dict:
    """Recall@10 and NDCG@10: per evaluated user, the query is the sum (= the mean's direction) of the
    user's training tracks' embeddings; every track is scored by dot product with it (cosine: the
    embeddings are unit vectors), the user's training and held-out tracks are excluded, and each
    held-out track's rank is the number of remaining candidates with a higher score, or the same
    score and a lower index. With `global_scores`, every user ranks by those instead."""
    (to, tt), (ho, ht) = ex.eval_train, ex.eval_heldout
    if global_scores is None:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        n = emb.shape[0]
    else:
        n = len(global_scores)
    idx = np.arange(n)
    hits, gains, total = 0, 0.0, 0
    users = len(to) - 1
    chunk = 64
    for c0 in range(0, users, chunk):
        c1 = min(users, c0 + chunk)
        if global_scores is None:
            q = np.stack([emb[tt[to[u]:to[u + 1]]].sum(axis=0) for u in range(c0, c1)])
            scores = q @ emb.T
        else:
            scores = np.broadcast_to(global_scores.astype(np.float32), (c1 - c0, n))
        for row, u in enumerate(range(c0, c1)):
            train, held = tt[to[u]:to[u + 1]], ht[ho[u]:ho[u + 1]]
            if len(held) == 0:
                continue
            s = scores[row]
            candidate = np.ones(n, dtype=bool)
            candidate[train] = False
            candidate[held] = False
            sh = s[held][:, None]
            beats = (s[None, :] > sh) | ((s[None, :] == sh) & (idx[None, :] < held[:, None].astype(np.int64)))
            rank = np.count_nonzero(beats & candidate[None, :], axis=1)
            top = rank < K
            hits += int(np.count_nonzero(top))
            gains += float(np.sum(1.0 / np.log2(rank[top] + 2.0)))
            total += len(held)
    total = max(total, 1)
    return {"recall_at_10": hits / total, "ndcg_at_10": gains / total, "heldout": total}


def embed_all(model, features: np.ndarray) -> np.ndarray:
    out = []
    for s in range(0, len(features), 8192):
        out.append(l2_normalize(model(features[s:s + 8192], training=False)).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


# ------------------------------------------------------------------------------------------------
# Training


def make_train_step(model, optimizer, features, pair_loss):
    def train_step(ta, tb):
        x = tf.gather(features, tf.concat([ta, tb], axis=0))
        with tf.GradientTape() as tape:
            z = l2_normalize(model(x, training=True))
            loss = pair_loss(z, ta, tb)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_step


def new_optimizer(training: dict):
    o = training["optimizer"]
    return keras.optimizers.Adam(learning_rate=training["learning_rate"], beta_1=o["beta_1"], beta_2=o["beta_2"],
                                 epsilon=o["epsilon"])


def loss_settings(ex: Export, kind: str):
    t = ex.training
    logq = tf.constant(ex.logq) if kind == "contrastive" and t["logq_correction"] else None
    return make_pair_loss(kind, t["temperature"], logq, t["centering_weight"])


def train(ex: Export):
    keras.utils.set_random_seed(args.seed)
    e = ex.model["embedding_size"]
    dropout = next(layer["rate"] for layer in ex.model["layers"] if layer["type"] == "dropout")
    model = build_encoder(e, dropout)
    if args.init == "ours":
        load_weights(model, ex.weights(""))
    optimizer = new_optimizer(ex.training)
    features = tf.constant(ex.features)
    step = make_train_step(model, optimizer, features, loss_settings(ex, args.loss))
    trace_seconds = 0.0
    if args.mode == "graph":
        spec = tf.TensorSpec([None], tf.int32)
        step = tf.function(step, input_signature=[spec, spec])
        # Trace (compile) the step before the clock starts: a one-off cost, reported apart.
        t0 = time.perf_counter()
        step.get_concrete_function()
        trace_seconds = time.perf_counter() - t0
    batch = ex.training["batch_size"]
    min_batch = 2 if args.loss == "contrastive" else 1

    epochs = []  # per epoch: pairs trained, seconds, cpu seconds, mean loss
    closed_seconds, stopped = 0.0, False
    for epoch in range(1, args.epochs + 1):
        pairs = ex.pairs(epoch)
        steps = math.ceil(len(pairs) / batch)
        if args.max_steps_per_epoch > 0:
            steps = min(steps, args.max_steps_per_epoch)
        trained, loss_sum, batches = 0, 0.0, 0
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(steps):
            chunk = pairs[s * batch:(s + 1) * batch]
            if len(chunk) < min_batch:
                continue  # as ours: a single pair has no in-batch negatives
            loss = step(tf.constant(chunk[:, 0]), tf.constant(chunk[:, 1]))
            loss_sum += float(loss)  # ours reads every step's loss back too
            batches += 1
            trained += len(chunk)
            if args.time_budget_seconds is not None and \
                    closed_seconds + time.perf_counter() - t0 >= args.time_budget_seconds:
                stopped = True
                break
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        closed_seconds += seconds
        epochs.append({"pairs": trained, "seconds": seconds, "cpu": cpu, "loss": loss_sum / max(batches, 1),
                       "complete": not stopped})
        print(f"epoch {epoch}: {trained} pairs in {seconds:.2f} s ({trained / max(seconds, 1e-9):.0f} pairs/s), "
              f"loss {loss_sum / max(batches, 1):.4f}", file=sys.stderr)
        if stopped:
            break

    # The throughput figures: complete epochs after the first (it pays for tracing and warm-up); with
    # fewer than two complete epochs, every epoch.
    later = [m for m in epochs[1:] if m["complete"]] or epochs
    rates = sorted(m["pairs"] / max(m["seconds"], 1e-9) for m in later)
    counted_pairs = sum(m["pairs"] for m in later)
    ranking = evaluate(embed_all(model, ex.features), ex)
    total_pairs = sum(m["pairs"] for m in epochs)
    pairs_per_epoch = len(ex.pairs(1))
    return {
        "impl": "tensorflow",
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
        "mode": args.mode,
        "loss": args.loss,
        "tracks": ex.meta["data"]["tracks"],
        "users": ex.meta["data"]["users"],
        "interactions": ex.meta["data"]["interactions"],
        "batch_size": batch,
        "threads": args.threads,
        "init": args.init,
        "pairs_per_epoch": pairs_per_epoch,
        "exported_epochs": len(ex.epoch_files),
        "export_loss": ex.training["loss"],
        "trace_seconds": trace_seconds,
        "max_steps_per_epoch": args.max_steps_per_epoch or None,
        "epochs": len(epochs),
        "epoch_pairs": [m["pairs"] for m in epochs],
        "epoch_pairs_per_second": [round(m["pairs"] / max(m["seconds"], 1e-9), 1) for m in epochs],
        "epoch_loss": [round(m["loss"], 6) for m in epochs],
        "median_pairs_per_second": rates[len(rates) // 2] if rates else None,
        "cpu_seconds_per_million_pairs": sum(m["cpu"] for m in later) / max(counted_pairs, 1) * 1e6,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "time_budget_seconds": args.time_budget_seconds,
        "train_seconds": closed_seconds,
        "trained_pairs": total_pairs,
        "pairs_per_second": total_pairs / max(closed_seconds, 1e-9),
        "epochs_trained": sum(m["pairs"] for m in epochs) / pairs_per_epoch,
        "recall_at_10": ranking["recall_at_10"],
        "ndcg_at_10": ranking["ndcg_at_10"],
    }


# ------------------------------------------------------------------------------------------------
# Checks


def close(got, want, rtol, atol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return err <= atol + rtol * scale, err, scale


def verify(ex: Export) -> dict:
    """The port against the export's reference values (computed by our trainer from the same initial
    weights on the same first batch, without dropout)."""
    ref = ex.meta["reference"]
    e = ex.model["embedding_size"]
    checks = []

    def check(name, got, want, rtol=1e-5, atol=1e-6):
        ok, err, scale = close(got, want, rtol, atol)
        checks.append({"check": name, "ok": ok, "max_abs_error": err, "scale": scale})

    # Rankings: raw features, popularity (numpy eval only) and the initial model (forward + eval).
    for name, got in [
        ("raw_features", evaluate(l2_normalize(tf.constant(ex.features)).numpy(), ex)),
        ("popularity", evaluate(None, ex, global_scores=ex.track_counts.astype(np.float32))),
    ]:
        check(f"recall_at_10.{name}", got["recall_at_10"], ref[name]["recall_at_10"], 0, 1e-9)
        check(f"ndcg_at_10.{name}", got["ndcg_at_10"], ref[name]["ndcg_at_10"], 0, 1e-9)
    model = build_encoder(e, 0.0)
    load_weights(model, ex.weights(""))
    got = evaluate(embed_all(model, ex.features), ex)
    # One near-tie resolved differently (different float summation order) moves Recall@10 by
    # 1/heldout; allow two of them.
    tol = 2.0 / max(ref["initial_model"]["heldout"], 1) + 1e-9
    check("recall_at_10.initial_model", got["recall_at_10"], ref["initial_model"]["recall_at_10"], 0, tol)

    # The first batch of epoch 1, dropout off, BatchNorm on batch statistics.
    first = ex.pairs(1)[:ref["first_batch_pairs"]]
    ta, tb = tf.constant(first[:, 0]), tf.constant(first[:, 1])
    features = tf.constant(ex.features)
    x = tf.gather(features, tf.concat([ta, tb], axis=0))
    for kind in ("contrastive", "cosine"):
        model = build_encoder(e, 0.0)
        load_weights(model, ex.weights(""))
        optimizer = new_optimizer(ex.training)
        pair_loss = loss_settings(ex, kind)
        with tf.GradientTape() as tape:
            loss = pair_loss(l2_normalize(model(x, training=True)), ta, tb)
        check(f"first_batch_loss.{kind}", float(loss), ref["first_batch_loss_without_dropout"][kind], 1e-5, 1e-6)
        if kind != "contrastive":
            continue
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        by_name = dict(zip([v.path.replace("/", ".") for v in variables], grads))
        for name in ex.model["param_names"][:8]:
            want = np.load(ex.dir / "check" / f"grad.{name}.npy")
            check(f"gradient.{name}", by_name[name].numpy(), want, 1e-3, 1e-6)
        optimizer.apply_gradients(zip(grads, variables))
        after = model_weights(model)
        for name in ex.model["param_names"]:
            want = np.load(ex.dir / "check" / f"after_step.{name}.npy")
            check(f"after_one_adam_step.{name}", after[name], want, 1e-4, 1e-6)
    return {"verify": str(ex.dir), "tf_version": tf.__version__, "keras_version": keras.__version__,
            "ok": all(c["ok"] for c in checks), "checks": checks}


def self_test() -> dict:
    """The hand-computed cases of src/loss.rs's unit tests (tau 0.5, no logQ, no centering)."""
    def unit(rows):
        return l2_normalize(tf.constant(rows, tf.float64))

    def loss(za, zb, ta, tb, logq=None, kind="contrastive", centering=0.0):
        z = tf.concat([unit(za), unit(zb)], axis=0)
        lq = None if logq is None else tf.constant(logq, tf.float64)
        f = make_pair_loss(kind, 0.5, lq, centering)
        return float(f(z, tf.constant(ta, tf.int32), tf.constant(tb, tf.int32)))

    l1p, l1m = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))
    cases = [
        ("contrastive_matches_hand_computation",
         loss([[1, 0], [0, 1]], [[1, 0], [0, 1]], [0, 1], [2, 3]), l1p),
        ("accidental_hits_are_masked",
         loss([[1, 0], [0, 1]], [[1, 0], [1, 0]], [0, 1], [7, 7]), 0.5 * (0.0 + 0.5 * (l1p + l1m))),
        ("anchor_track_as_negative_is_masked",
         loss([[1, 0], [0, 1]], [[0, 1], [1, 0]], [0, 5], [4, 0]), 0.5 * (0.5 * (0 + l1m) + 0.5 * (l1m + 0))),
        ("cosine_loss_is_minus_mean_cosine",
         loss([[1, 0], [1, 1]], [[1, 0], [1, 0]], [0, 1], [2, 3], kind="cosine"), -(1 + math.sqrt(0.5)) / 2),
        # logQ: tracks 0..3 with log q = [-1, -2, -3, -4]; all four embeddings orthogonal-ish.
        # Forward row 0 (a0=(1,0)): candidates b0=(1,0) (track 2), b1=(0,1) (track 3): logits
        # [2 + 3, 0 + 4] -> CE = log(1 + e^(4-5)); row 1 (a1=(0,1)): [0 + 3, 2 + 4] -> log(1 + e^(3-6)).
        # Backward row 0 (b0=(1,0)): a0 (track 0) 2 + 1, a1 (track 1) 0 + 2 -> log(1 + e^(2-3));
        # row 1 (b1=(0,1)): [0 + 1, 2 + 2] -> log(1 + e^(1-4)).
        ("logq_correction_by_hand",
         loss([[1, 0], [0, 1]], [[1, 0], [0, 1]], [0, 1], [2, 3], logq=[-1.0, -2.0, -3.0, -4.0]),
         0.5 * (0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3)))
                + 0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))))),
        # Centering: z = a0, a1, b0, b1 = (1,0), (0,1), (1,0), (0,1): mean (0.5, 0.5), ||.||^2 = 0.5.
        ("centering_penalty_by_hand",
         loss([[1, 0], [0, 1]], [[1, 0], [0, 1]], [0, 1], [2, 3], centering=2.0), l1p + 2.0 * 0.5),
    ]
    results = [{"case": name, "got": got, "want": want, "ok": abs(got - want) < 1e-12} for name, got, want in cases]
    return {"self_test": True, "ok": all(r["ok"] for r in results), "cases": results}


def main():
    if args.self_test:
        out = self_test()
    else:
        ex = Export(args.export_dir)
        out = verify(ex) if args.verify else train(ex)
    print(json.dumps(out))
    if "ok" in out and not out["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
