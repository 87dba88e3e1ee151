#!/usr/bin/env bash
# Fuzzes the path that turns a raw broker message into a model input (see fuzz/README.md).
#
#   scripts/fuzz.sh                      # every target, FUZZ_SECONDS each
#   scripts/fuzz.sh decode_image         # one target
#   FUZZ_SECONDS=60 scripts/fuzz.sh
#
# Environment:
#   FUZZ_SECONDS     seconds per target (default 300)
#   FUZZ_SANITIZER   address (default) or none (faster, finds panics/timeouts/OOMs only)
#   FUZZ_KEEP_GOING  1: keep fuzzing after a crash (libFuzzer fork mode, one child at a time)
#   FUZZ_TIMEOUT     seconds one input may take before it counts as a hang (default 10)
#   FUZZ_RSS_MB      memory limit of the fuzzer process in MB (default 2048)
#   FUZZ_MALLOC_MB   largest single allocation in MB (default 512; ASan builds only). The
#                    targets' decode limits allow about 32 MB, so more is a limit bypass.
#   FUZZ_ABORT_ON_ANY_PANIC  1: also stop on decoder panics that decode_image catches
#
# Only the stable toolchain is needed: cargo-fuzz's nightly flags are enabled with
# RUSTC_BOOTSTRAP=1. One fuzzing process at a time; it runs at a lower priority.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR="$ROOT/fuzz"
FUZZ_SECONDS=${FUZZ_SECONDS:-300}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
FUZZ_KEEP_GOING=${FUZZ_KEEP_GOING:-0}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
FUZZ_MALLOC_MB=${FUZZ_MALLOC_MB:-512}
ALL_TARGETS=(request_to_input decode_image)
if [[ $# -gt 0 ]]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

export RUSTC_BOOTSTRAP=1
# Release build with debug assertions (cargo-fuzz's default); 16 codegen units keep the
# build of the large dependency tree (candle, image decoders, librdkafka) reasonable.
BUILD_ARGS=(--sanitizer "$FUZZ_SANITIZER" --codegen-units 16)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$FUZZ_DIR"
echo "== building the fuzz targets (${BUILD_ARGS[*]})"
nice -n 10 cargo fuzz build "${BUILD_ARGS[@]}"

if [[ ! -d seeds/request_to_input || ! -d seeds/decode_image ]]; then
    echo "== writing the seed corpus to fuzz/seeds"
    FUZZ_MAKE_SEEDS="$FUZZ_DIR/seeds" \
        "target/x86_64-unknown-linux-gnu/release/request_to_input"
fi

LIBFUZZER_ARGS=(
    -max_total_time="$FUZZ_SECONDS"
    -timeout="$FUZZ_TIMEOUT"
    -rss_limit_mb="$FUZZ_RSS_MB"
    -malloc_limit_mb="$FUZZ_MALLOC_MB"
    -max_len=65536
    -print_final_stats=1
)
if [[ "$FUZZ_KEEP_GOING" == 1 ]]; then
    LIBFUZZER_ARGS+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
fi

summary=()
status=0
for target in "${TARGETS[@]}"; do
    corpus="$FUZZ_DIR/corpus/$target"
    artifacts="$FUZZ_DIR/artifacts/$target"
    log="$FUZZ_DIR/artifacts/$target.log"
    mkdir -p "$corpus" "$artifacts"
    before=$(find "$artifacts" -type f | sort)
    echo "== fuzzing $target for ${FUZZ_SECONDS}s (log: ${log#"$ROOT"/})"
    started=$(date +%s)
    # New inputs go to fuzz/corpus/TARGET (gitignored); fuzz/seeds/TARGET is read only.
    set +e
    nice -n 10 cargo fuzz run "${BUILD_ARGS[@]}" "$target" "$corpus" "$FUZZ_DIR/seeds/$target" \
        -- "${LIBFUZZER_ARGS[@]}" 2>&1 | tee "$log" | grep --line-buffered -E \
        '^(INFO: (seed corpus|-max_len)|#[0-9]+.*(INITED|pulse|DONE)|#[0-9]+: cov:|==[0-9]+==|SUMMARY|.*panicked at|fuzz: |Test unit written|Done [0-9]+ runs)'
    rc=${PIPESTATUS[0]}
    set -e
    elapsed=$(( $(date +%s) - started ))
    runs=$({ grep -Eo 'stat::number_of_executed_units: [0-9]+' "$log" || true; } | awk '{s += $2} END {print s + 0}')
    if [[ "$runs" == 0 ]]; then
        # Fork mode and early stops print no final stats: use the last progress line.
        runs=$({ grep -Eo '^#[0-9]+' "$log" || true; } | tail -1 | tr -d '#')
        runs=${runs:-0}
    fi
    found=$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort) | grep -v '^$' || true)
    line="$target: $runs executions in ${elapsed}s, corpus $(find "$corpus" -type f | wc -l) inputs"
    if [[ -n "$found" ]]; then
        line+=", FOUND: $(echo "$found" | wc -l) input(s)"
        status=1
    elif [[ $rc -ne 0 ]]; then
        line+=", cargo fuzz exited with $rc (see the log)"
        status=1
    else
        line+=", nothing found"
    fi
    summary+=("$line")
    if [[ -n "$found" ]]; then
        echo "== $target found:"
        while read -r file; do
            echo "   ${file#"$ROOT"/} ($(wc -c <"$file") bytes)"
        done <<<"$found"
        echo "   reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${BUILD_ARGS[*]} $target FILE)"
        echo "   minimize:  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin ${BUILD_ARGS[*]} $target FILE)"
    fi
done

echo "== summary"
printf '   %s\n' "${summary[@]}"
exit "$status"
