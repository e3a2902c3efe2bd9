"""Loads a .keras archive written by audotics-trainer with real Keras 3 and compares its predictions
with the embeddings the trainer computed.

    python keras_check.py MODEL.keras INPUTS.json
INPUTS.json: {"features": [[11 standardised features], ...], "embeddings": [[E floats], ...]}, or for a
model with named inputs {"inputs": {"features": [...], "artist_indices": [[...], ...], ...}, "embeddings": ...}
(every input but `features` is int32).
Prints the max abs difference; exits 1 above the tolerance (1e-5), 2 on a load failure.
"""
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

TOLERANCE = 1e-5


def main():
    model_path, inputs_path = sys.argv[1], sys.argv[2]
    with open(inputs_path) as f:
        data = json.load(f)
    try:
        model = keras.models.load_model(model_path, safe_mode=True)
    except Exception as e:  # a load failure is the finding, not a crash
        print(f"keras {keras.__version__} failed to load {model_path}: {e}")
        return 2
    if "inputs" in data:
        x = {name: np.asarray(v, dtype=np.float32 if name == "features" else np.int32) for name, v in data["inputs"].items()}
    else:
        x = np.asarray(data["features"], dtype=np.float32)
    expected = np.asarray(data["embeddings"], dtype=np.float32)
    got = model.predict(x, verbose=0)
    diff = float(np.max(np.abs(got - expected)))
    print(json.dumps({"keras": keras.__version__, "backend": keras.backend.backend(), "rows": len(expected), "max_abs_diff": diff}))
    return 0 if diff <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
