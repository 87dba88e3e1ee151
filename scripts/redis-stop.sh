#!/usr/bin/env bash
# Stops the Redis server started by scripts/redis-start.sh: exactly the PID in its pid
# file for REDIS_PORT (default 6380) (TERM, then KILL after 10 s). Never kills by name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${REDIS_PORT:-6380}"
PID_FILE="$ROOT/.tools/run/redis-$PORT.pid"

if [[ ! -f "$PID_FILE" ]]; then
    echo "redis-stop: no pid file ($PID_FILE); nothing to stop" >&2
    exit 0
fi
pid="$(cat "$PID_FILE")"
if ! [[ "$pid" =~ ^[0-9]+$ ]]; then
    rm -f "$PID_FILE"
    echo "redis-stop: pid file held '$pid', not a PID; removed it" >&2
    exit 1
fi

# A stale PID file may name a PID the system has since given to another process:
# only signal it if it is still a redis-server.
cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
if kill -0 "$pid" 2>/dev/null && [[ -n "$cmdline" && "$cmdline" != *redis-server* ]]; then
    echo "redis-stop: PID $pid is no longer a redis-server; not signalling it" >&2
    rm -f "$PID_FILE"
    exit 0
fi

if kill -0 "$pid" 2>/dev/null; then
    # With --save '' Redis writes nothing on SIGTERM and exits at once.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "redis-stop: PID $pid ignored TERM for 10 s; sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "redis-stop: stopped redis-server (PID $pid)" >&2
else
    echo "redis-stop: PID $pid was not running" >&2
fi
rm -f "$PID_FILE"
