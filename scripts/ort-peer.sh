#!/usr/bin/env bash
# The peer for `trainer bench --peer`: ONNX Runtime on the same CNN shape as ours, timed
# by ../shared/tools/ort-peer.py (2 intra-op threads, medians of 5 runs per batch size).
#
# Usage: scripts/ort-peer.sh [BATCHES]   e.g. scripts/ort-peer.sh 1,32,512
# Prints one line per batch: "ort batch B: N images/s".
#
# Installs onnx, onnxruntime and numpy from PyPI into a venv under .tools/ort-venv the
# first time (nothing is installed if it is already there). Environment:
#   ORT_PEER_SCRIPT  the peer script (default: ../shared/tools/ort-peer.py beside the repo)
#   ORT_VENV         the venv folder (default: .tools/ort-venv in the repo)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="${ORT_PEER_SCRIPT:-$ROOT/../shared/tools/ort-peer.py}"
VENV="${ORT_VENV:-$ROOT/.tools/ort-venv}"

if [[ ! -f "$SCRIPT" ]]; then
    echo "ort-peer.sh: peer script not found at $SCRIPT (set ORT_PEER_SCRIPT)" >&2
    exit 2
fi

# The venv (installed the first time) is the one the ONNX engine's library comes from.
ORT_VENV="$VENV" "$ROOT/scripts/onnxruntime-lib.sh" >/dev/null

# Older OpenBLAS workarounds slow numpy down; ONNX Runtime does not use OpenBLAS, but
# keep the peer's process free of them all the same (this command only).
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$VENV/bin/python" "$SCRIPT" "${1:-1,32,128,512}"
