#!/usr/bin/env bash
# Creates bench/.venv-tf with a pinned CPU TensorFlow and numpy for bench/tf/old_trainer.py.
# Idempotent: does nothing when the pinned versions are already installed.
#
#   bench/tf/setup.sh            prints the venv's python path on its last line
set -euo pipefail
cd "$(dirname "$0")/.."
TF_VERSION=2.20.0
NUMPY_VERSION=2.2.6
VENV=.venv-tf
PY=$VENV/bin/python

installed() {
    [ -x "$PY" ] && "$PY" - "$TF_VERSION" "$NUMPY_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("tensorflow-cpu"), version("numpy")) == (sys.argv[1], sys.argv[2]) else 1)
PYEOF
}

if ! installed; then
    echo "setting up bench/$VENV (tensorflow-cpu $TF_VERSION, numpy $NUMPY_VERSION)..." >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "tensorflow-cpu==$TF_VERSION" "numpy==$NUMPY_VERSION" >&2
    installed || { echo "bench/tf/setup.sh: the install did not give the pinned versions" >&2; exit 1; }
fi
echo "$(pwd)/$PY"
