#!/usr/bin/env bash
# ONNX Runtime from PyPI, for the ONNX engine and the Python peers: installs onnx,
# onnxruntime and numpy into a venv under .tools/ort-venv the first time (nothing is
# installed when they are there), then prints the path of the wheel's shared library,
# the file the server loads through ORT_DYLIB_PATH:
#
#     export ORT_DYLIB_PATH="$(scripts/onnxruntime-lib.sh)"
#
# Environment: ORT_VENV, the venv folder (default .tools/ort-venv in the repo).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ORT_VENV:-$ROOT/.tools/ort-venv}"

if ! "$VENV/bin/python" -c 'import onnx, onnxruntime, numpy' >/dev/null 2>&1; then
    echo "onnxruntime-lib.sh: installing onnx onnxruntime numpy into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check onnx onnxruntime numpy >&2
fi

"$VENV/bin/python" - <<'PY'
import glob, os, sys
import onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
if not libs:
    sys.exit("onnxruntime-lib.sh: the onnxruntime wheel holds no libonnxruntime.so")
print(libs[0])
PY
