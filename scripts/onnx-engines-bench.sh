#!/usr/bin/env bash
# Our ONNX engines beside ONNX Runtime (Python, the PyPI wheel) on the same files, in the
# same run: images/s at batch 1, 8 and 32, model only, every engine on all cores
# (ONNX Runtime with as many intra-op threads), rounds interleaved so that other load
# on the machine hits every engine alike; prints medians and the ratios ours / ORT.
#
# Usage: scripts/onnx-engines-bench.sh [ROUNDS] [SECONDS] [MODEL.onnx...]
# Defaults: 3 rounds of 3 s per batch size, on the 224x224 ResNet-18 and MobileNetV3-Small
# made by `scripts/make-onnx-models.py full` (random weights; made here if missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${1:-3}"
SECS="${2:-3}"
shift $(( $# > 2 ? 2 : $# ))
MODELS=("$@")

LIB="$(scripts/onnxruntime-lib.sh)"
PY="${ORT_VENV:-$ROOT/.tools/ort-venv}/bin/python"
if [[ ${#MODELS[@]} -eq 0 ]]; then
    MODELS=(.tools/onnx-models/resnet18.onnx .tools/onnx-models/mobilenetv3-small.onnx)
    [[ -f ${MODELS[0]} && -f ${MODELS[1]} ]] || "$PY" scripts/make-onnx-models.py full >&2
fi
THREADS="$(nproc)"
cargo build --release --quiet -p classifier-inference --example onnx-bench
BENCH=target/release/examples/onnx-bench

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $THREADS threads"
echo "ONNX Runtime $("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)') from $LIB"
for model in "${MODELS[@]}"; do
    dir="$(mktemp -d)"
    ln -s "$(realpath "$model")" "$dir/model.onnx"
    out="$(mktemp)"
    for _ in $(seq "$ROUNDS"); do
        CLASSIFIER_ONNX_ENGINE=tract "$BENCH" "$dir" "$SECS" 1 8 32 \
            | sed -n 's/^batch *\([0-9]*\): *\([0-9.]*\) images.*/tract \1 \2/p' >>"$out"
        ORT_DYLIB_PATH="$LIB" CLASSIFIER_ONNX_ENGINE=onnxruntime "$BENCH" "$dir" "$SECS" 1 8 32 \
            | sed -n 's/^batch *\([0-9]*\): *\([0-9.]*\) images.*/ours-ort \1 \2/p' >>"$out"
        "$PY" scripts/ort-model-peer.py "$model" "$SECS" "$THREADS" 1 8 32 \
            | sed -n 's/^ort batch \([0-9]*\): \([0-9.]*\) images.*/python-ort \1 \2/p' >>"$out"
    done
    echo
    echo "$(basename "$model"): images/s, median of $ROUNDS rounds"
    "$PY" - "$out" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    engine, batch, ips = line.split()
    runs[(engine, int(batch))].append(float(ips))
print(f"{'batch':>5} {'tract':>9} {'ours on ORT':>12} {'ORT (Python)':>13} {'tract/ORT':>10} {'ours-ORT/ORT':>13}")
for batch in sorted({b for _, b in runs}):
    m = {e: statistics.median(runs[(e, batch)]) for e in ("tract", "ours-ort", "python-ort")}
    print(f"{batch:>5} {m['tract']:>9.1f} {m['ours-ort']:>12.1f} {m['python-ort']:>13.1f} "
          f"{m['tract'] / m['python-ort']:>9.2f}x {m['ours-ort'] / m['python-ort']:>12.2f}x")
PY
    rm -rf "$dir" "$out"
done
