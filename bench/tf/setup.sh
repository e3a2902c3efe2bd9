#!/usr/bin/env bash
# Creates bench/.venv-tf with a pinned CPU TensorFlow (and the Keras 3 and numpy it runs with here)
# for bench/tf/old_trainer.py.
# Idempotent: does nothing when the pinned versions are already installed.
#
#   bench/tf/setup.sh            prints the venv's python path on its last line
set -euo pipefail
cd "$(dirname "$0")/.."
TF_VERSION=2.20.0
NUMPY_VERSION=2.2.6
KERAS_VERSION=3.15.1
VENV=.venv-tf
PY=$VENV/bin/python

installed() {
    [ -x "$PY" ] && "$PY" - "$TF_VERSION" "$NUMPY_VERSION" "$KERAS_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if [version(p) for p in ("tensorflow-cpu", "numpy", "keras")] == sys.argv[1:] else 1)
PYEOF
}

if ! installed; then
    echo "setting up bench/$VENV (tensorflow-cpu $TF_VERSION, keras $KERAS_VERSION, numpy $NUMPY_VERSION)..." >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "tensorflow-cpu==$TF_VERSION" \
        "keras==$KERAS_VERSION" "numpy==$NUMPY_VERSION" >&2
    installed || { echo "bench/tf/setup.sh: the install did not give the pinned versions" >&2; exit 1; }
fi
echo "$(pwd)/$PY"
