#!/usr/bin/env bash
# Interop tests: our binaries against Python peers written from the wire contract
# (proto/README.md). Called by scripts/test.sh while its brokers run; needs
# PUBSUB_EMULATOR_HOST and KAFKA_BOOTSTRAP_SERVERS (or INTEROP_BACKENDS naming fewer
# backends), and the debug binaries (cargo build --workspace --bins).
#
# Makes a virtualenv in .tools/interop-venv from tests/interop/requirements.txt (PyPI) and
# generates the protobuf classes from proto/proto/classifier.proto with grpcio-tools.
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

cd tests/interop
exec "$ROOT/$VENV/bin/python" test_interop.py "$@"
