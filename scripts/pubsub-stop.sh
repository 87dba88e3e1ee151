#!/usr/bin/env bash
# Stops the Pub/Sub emulator started by scripts/pubsub-start.sh: exactly the process
# whose PID it recorded for PUBSUB_PORT (default 8085), never by name, and only while
# that PID is still the emulator. TERM first, KILL if it does not exit within 15 s.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/pidfile.sh
source "$ROOT/scripts/lib/pidfile.sh"
PORT="${PUBSUB_PORT:-8085}"
PID_FILE="$ROOT/.tools/run/pubsub-$PORT.pid"

stop_pid_file pubsub-stop "$PID_FILE" "the emulator" 15 pubsub-emulator
# The emulator keeps nothing worth keeping: drop its data directory (the log stays).
rm -rf "$ROOT/.tools/run/pubsub-data-$PORT"
