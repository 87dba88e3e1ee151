#!/usr/bin/env bash
# Renders the client's HTML report (`client-app classify --report`) in a real headless
# browser (Debian's chromium, installed with apt-get if missing), checks what the browser
# parsed, and writes a screenshot (default docs/report.png, the README's picture).
#
#   scripts/report-check.sh [SCREENSHOT.png]
#
# The report comes from classifying examples/ plus a few bad files on the embedded
# broker with the shipped model, so it shows every section.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SHOT="${1:-docs/report.png}"

if ! command -v chromium >/dev/null; then
    echo "report-check: installing Debian's chromium"
    if ! (apt-get install -y chromium >/dev/null 2>&1 || sudo apt-get install -y chromium >/dev/null 2>&1); then
        echo "report-check: chromium is missing and could not be installed" >&2
        exit 1
    fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r examples "$work/images"
printf 'not an image\n' > "$work/images/notes.txt"
head -c 300 examples/bag/00018.png > "$work/images/truncated.png"

# The workspace's feature set, as the test command builds it (a `-p client-app` build
# would compile client-app again with fewer features).
cargo build --quiet --workspace --bins
status=0
target/debug/client-app classify "$work/images" --quiet --report "$work/report.html" >/dev/null || status=$?
# 2 = some files were answered with errors (the two bad ones): expected.
if [[ "$status" != 2 ]]; then
    echo "report-check: client-app exited $status (expected 2: two bad files)" >&2
    exit 1
fi

browser=(chromium --headless --no-sandbox --disable-gpu --hide-scrollbars)
"${browser[@]}" --dump-dom "file://$work/report.html" > "$work/dom.html" 2>/dev/null
for needle in "Confusion matrix" "Per class" "Least confident predictions" \
              "Errors and unanswered (2)" "data:image/png;base64," "UNSUPPORTED_FORMAT"; do
    if ! grep -qF "$needle" "$work/dom.html"; then
        echo "report-check: the browser's DOM lacks \"$needle\"" >&2
        exit 1
    fi
done
# The matrix has a row per class: 10 rows of cells plus the header.
rows=$(grep -o '<tr>' "$work/dom.html" | wc -l)
if (( rows < 11 )); then
    echo "report-check: only $rows table rows in the DOM" >&2
    exit 1
fi

mkdir -p "$(dirname "$SHOT")"
"${browser[@]}" --window-size=1280,2200 --screenshot="$work/shot.png" \
    "file://$work/report.html" >/dev/null 2>&1
if [[ ! -s "$work/shot.png" ]]; then
    echo "report-check: chromium wrote no screenshot" >&2
    exit 1
fi
cp "$work/shot.png" "$SHOT"
echo "report-check: OK (the browser parsed every section; screenshot in $SHOT)"
