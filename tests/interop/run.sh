#!/usr/bin/env bash
# Interop tests: our binaries against Python peers written from the wire contract
# (proto/README.md). Called by scripts/test.sh while its brokers run; needs
# PUBSUB_EMULATOR_HOST, KAFKA_BOOTSTRAP_SERVERS and REDIS_URL (or INTEROP_BACKENDS
# naming fewer backends), and the debug binaries (cargo build --workspace --bins).
#
# Makes a virtualenv in .tools/interop-venv from tests/interop/requirements.txt (PyPI) and
# generates the protobuf classes from proto/proto/classifier.proto with grpcio-tools;
# the gateway's tests (test_gateway.py: Triton's and KServe's clients; test_page.py: its
# page in Debian's chromium, installed with apt-get when missing) run in
# .tools/oip-venv, from tests/interop/gateway-requirements.txt; test_prometheus.py has
# Debian's prometheus (installed when missing) scrape the server's token-protected /metrics.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

VENV=".tools/interop-venv"
STAMP="$VENV/.requirements"
if [[ ! -x "$VENV/bin/python" ]] || ! cmp -s tests/interop/requirements.txt "$STAMP"; then
    echo "interop: installing Python peers into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -r tests/interop/requirements.txt
    cp tests/interop/requirements.txt "$STAMP"
fi

GENERATED=".tools/interop-gen"
rm -rf "$GENERATED" && mkdir -p "$GENERATED"
"$VENV/bin/python" -m grpc_tools.protoc -I proto/proto --python_out="$GENERATED" proto/proto/classifier.proto
export INTEROP_GENERATED="$ROOT/$GENERATED"

# The gateway's clients (Triton's and KServe's) need an older protobuf: a venv of their own.
OIP_VENV=".tools/oip-venv"
OIP_STAMP="$OIP_VENV/.requirements"
if [[ ! -x "$OIP_VENV/bin/python" ]] || ! cmp -s tests/interop/gateway-requirements.txt "$OIP_STAMP"; then
    echo "interop: installing the inference protocol's clients into $OIP_VENV" >&2
    python3 -m venv "$OIP_VENV"
    "$OIP_VENV/bin/pip" install --quiet -r tests/interop/gateway-requirements.txt
    cp tests/interop/gateway-requirements.txt "$OIP_STAMP"
fi

if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null; then
    echo "interop: installing Debian's chromium for the page test" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends chromium; }; } >&2
fi

if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null; then
    echo "interop: installing Debian's prometheus for the scrape test" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends prometheus; }; } >&2
fi

cd tests/interop
status=0
"$ROOT/$VENV/bin/python" test_interop.py "$@" || status=$?
"$ROOT/$OIP_VENV/bin/python" test_gateway.py "$@" || status=$?
"$ROOT/$OIP_VENV/bin/python" test_page.py "$@" || status=$?
"$ROOT/$VENV/bin/python" test_prometheus.py "$@" || status=$?
exit "$status"
