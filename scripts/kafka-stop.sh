#!/usr/bin/env bash
# Stops the broker started by scripts/kafka-start.sh: exactly the PID in its pid file
# for KAFKA_PORT (default 9092) (TERM, then KILL after 10 s). Never kills by name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/pidfile.sh
source "$ROOT/scripts/lib/pidfile.sh"
PORT="${KAFKA_PORT:-9092}"
PID_FILE="$ROOT/.tools/run/kafka-$PORT.pid"

stop_pid_file kafka-stop "$PID_FILE" Tansu 10
