#!/usr/bin/env bash
# Starts Google's Pub/Sub emulator on 127.0.0.1 for tests and local runs.
#
#   scripts/pubsub-start.sh            # port 8085, or PUBSUB_PORT
#   export PUBSUB_EMULATOR_HOST=127.0.0.1:8085
#   scripts/pubsub-stop.sh             # same PUBSUB_PORT
#
# Several emulators on different ports can run side by side (the restart tests start
# private ones): each port has its own PID file, log and data directory.
# The emulator comes from the machine image (Debian package
# google-cloud-cli-pubsub-emulator, Java 17); it cannot be installed from the package
# registries reachable here. It keeps everything in memory: a restart loses all topics
# and messages. Runtime files live in .tools/run/ (gitignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/pidfile.sh
source "$ROOT/scripts/lib/pidfile.sh"
PORT="${PUBSUB_PORT:-8085}"
RUN_DIR="$ROOT/.tools/run"
PID_FILE="$RUN_DIR/pubsub-$PORT.pid"
LOG_FILE="$RUN_DIR/pubsub-$PORT.log"
DATA_DIR="$RUN_DIR/pubsub-data-$PORT"
HOST=127.0.0.1
EMULATOR=/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
START_TIMEOUT_SECONDS=60

missing=()
[[ -x "$EMULATOR" ]] || missing+=("the Pub/Sub emulator ($EMULATOR, Debian package google-cloud-cli-pubsub-emulator)")
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]] || command -v java >/dev/null 2>&1; then
    :
else
    missing+=("java (17 or newer)")
fi
if ((${#missing[@]})); then
    echo "pubsub-start: cannot start the Pub/Sub emulator; missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    echo "It is part of the machine image and cannot be installed from the package registries reachable here." >&2
    exit 1
fi

mkdir -p "$RUN_DIR"

# Already running (started by this script)?
if old_pid="$(running_pid "$PID_FILE")"; then
    echo "pubsub-start: the emulator is already running (pid $old_pid); stop it with PUBSUB_PORT=$PORT scripts/pubsub-stop.sh" >&2
    exit 1
fi

if port_open "$HOST" "$PORT"; then
    echo "pubsub-start: port $PORT on $HOST is already in use; set PUBSUB_PORT to a free port" >&2
    exit 1
fi

answers_http() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null --max-time 2 "http://$HOST:$PORT/"
    else
        port_open "$HOST" "$PORT"
    fi
}

rm -rf "$DATA_DIR"
mkdir -p "$DATA_DIR"
# The launcher script execs java, so $! is the JVM itself: stopping that PID stops it all.
nohup "$EMULATOR" --host="$HOST" --port="$PORT" --dir="$DATA_DIR" >"$LOG_FILE" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PID_FILE"

# Ready once it answers HTTP.
wait_until_ready pubsub-start "the emulator" "$pid" "$PID_FILE" "$LOG_FILE" \
    "$START_TIMEOUT_SECONDS" 0.5 answers_http || exit 1

echo "pubsub-start: emulator running (pid $pid, log $LOG_FILE)" >&2
echo "PUBSUB_EMULATOR_HOST=$HOST:$PORT"
