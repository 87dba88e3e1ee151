#!/usr/bin/env bash
# Stops the Redis server started by scripts/redis-start.sh: exactly the PID in its pid
# file for REDIS_PORT (default 6380) (TERM, then KILL after 10 s). Never kills by name,
# and never signals a PID that is no longer a redis-server.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/pidfile.sh
source "$ROOT/scripts/lib/pidfile.sh"
PORT="${REDIS_PORT:-6380}"
PID_FILE="$ROOT/.tools/run/redis-$PORT.pid"

# With --save '' Redis writes nothing on SIGTERM and exits at once.
stop_pid_file redis-stop "$PID_FILE" redis-server 10 redis-server
