#!/usr/bin/env bash
# Trains with the trainer's defaults on two small folders that are not Fashion-MNIST
# (letters with mirror pairs, and shapes with mirror-image arrows: scripts/make-small-folders.py)
# and prints each one's held-out accuracy and per-class table. The check of issue 14: each
# should reach at least 97%.
#
# Usage: scripts/small-folders-check.sh [WORK_DIR]   (default: target/small-folders)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="${1:-target/small-folders}"
venv=.tools/data-venv
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet pillow
fi
if [[ ! -d "$work/glyphs" || ! -d "$work/shapes" ]]; then
    "$venv/bin/python" scripts/make-small-folders.py "$work" 600
fi
cargo build --release -p trainer --locked
for set in glyphs shapes; do
    echo "== $set: trainer train --image-folder $work/$set (defaults)"
    target/release/trainer train --image-folder "$work/$set" --name "$set" \
        --output "$work/model-$set" | tee "$work/$set.log"
done
