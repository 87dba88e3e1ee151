#!/usr/bin/env bash
# Stops the broker started by scripts/kafka-start.sh: exactly the PID in its pid file
# for KAFKA_PORT (default 9092) (TERM, then KILL after 10 s). Never kills by name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${KAFKA_PORT:-9092}"
PID_FILE="$ROOT/.tools/run/kafka-$PORT.pid"

if [[ ! -f "$PID_FILE" ]]; then
    echo "kafka-stop: no pid file ($PID_FILE); nothing to stop" >&2
    exit 0
fi
pid="$(cat "$PID_FILE")"
if ! [[ "$pid" =~ ^[0-9]+$ ]]; then
    rm -f "$PID_FILE"
    echo "kafka-stop: pid file held '$pid', not a PID; removed it" >&2
    exit 1
fi

if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "kafka-stop: PID $pid ignored TERM for 10 s; sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "kafka-stop: stopped Tansu (PID $pid)" >&2
else
    echo "kafka-stop: PID $pid was not running" >&2
fi
rm -f "$PID_FILE"
