#!/usr/bin/env bash
# Stops the Pub/Sub emulator started by scripts/pubsub-start.sh: exactly the process
# whose PID it recorded for PUBSUB_PORT (default 8085), never by name. TERM first, KILL
# if it does not exit in time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${PUBSUB_PORT:-8085}"
PID_FILE="$ROOT/.tools/run/pubsub-$PORT.pid"
STOP_TIMEOUT_SECONDS=15

if [[ ! -f "$PID_FILE" ]]; then
    echo "pubsub-stop: no $PID_FILE; nothing to stop" >&2
    exit 0
fi
pid="$(cat "$PID_FILE")"
if [[ ! "$pid" =~ ^[0-9]+$ ]]; then
    echo "pubsub-stop: $PID_FILE does not hold a PID; removing it" >&2
    rm -f "$PID_FILE"
    exit 1
fi

# A stale PID file may name a PID the system has since given to another process:
# only signal it if it is still the emulator this script's partner started.
cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
if kill -0 "$pid" 2>/dev/null && [[ -n "$cmdline" && "$cmdline" != *pubsub-emulator* ]]; then
    echo "pubsub-stop: pid $pid is no longer the emulator; not signalling it" >&2
    rm -f "$PID_FILE"
    exit 0
fi

if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT_SECONDS))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "pubsub-stop: pid $pid still running after ${STOP_TIMEOUT_SECONDS}s; sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "pubsub-stop: stopped the emulator (pid $pid)" >&2
else
    echo "pubsub-stop: pid $pid is not running" >&2
fi
rm -f "$PID_FILE"
# The emulator keeps nothing worth keeping: drop its data directory (the log stays).
rm -rf "$ROOT/.tools/run/pubsub-data-$PORT"
