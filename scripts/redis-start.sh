#!/usr/bin/env bash
# Starts a local Redis server (for its Streams) for development and tests.
#
#   scripts/redis-start.sh             # port 6380, or REDIS_PORT (never the usual 6379,
#                                      # which a machine's own Redis may be using)
#   export REDIS_URL=redis://127.0.0.1:6380
#   scripts/redis-stop.sh              # same REDIS_PORT
#   REDIS_ACL_FILE=users.acl scripts/redis-start.sh
#                                      # users and passwords from an ACL file (the
#                                      # auth tests); the server then asks for them
#
# Installs Debian's redis-server package with apt-get if redis-server is missing (and
# fails clearly if it cannot). The server keeps everything in memory (no RDB snapshots,
# no AOF): a restart loses all streams and groups. Several servers on different ports can
# run side by side (the restart tests start private ones): each port has its own PID file
# and log in .tools/run/ (gitignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/pidfile.sh
source "$ROOT/scripts/lib/pidfile.sh"
PORT="${REDIS_PORT:-6380}"
HOST=127.0.0.1
RUN_DIR="$ROOT/.tools/run"
PID_FILE="$RUN_DIR/redis-$PORT.pid"
LOG_FILE="$RUN_DIR/redis-$PORT.log"
START_TIMEOUT_SECONDS=30

fail() {
    echo "redis-start: $*" >&2
    exit 1
}

[[ "$PORT" =~ ^[0-9]+$ ]] || fail "REDIS_PORT must be a number, got '$PORT'"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-start: redis-server not found; installing Debian's redis-server package" >&2
    if ! command -v apt-get >/dev/null 2>&1; then
        fail "redis-server is missing and apt-get is not available: install Redis 6.2 or newer"
    fi
    # The package's own service must not take the default port: do not start it.
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; } >&2 \
        || fail "could not install redis-server with apt-get (run as root, with the Debian package lists reachable)"
    command -v redis-server >/dev/null 2>&1 || fail "redis-server is still missing after apt-get install"
fi
REDIS_SERVER="$(command -v redis-server)"

mkdir -p "$RUN_DIR"

if old_pid="$(running_pid "$PID_FILE")"; then
    fail "a Redis started by this script is already running (PID $old_pid); run REDIS_PORT=$PORT scripts/redis-stop.sh first"
fi

if port_open "$HOST" "$PORT"; then
    fail "something already listens on $HOST:$PORT; stop it or set REDIS_PORT"
fi

answers_ping() {
    # PING in the inline protocol; Redis answers +PONG (-NOAUTH when it asks for a
    # password first: it answers all the same).
    local reply
    reply="$( { exec 3<>"/dev/tcp/$HOST/$PORT" && printf 'PING\r\n' >&3 && timeout 2 head -c 7 <&3; } 2>/dev/null )" || return 1
    [[ "$reply" == "+PONG"* || "$reply" == "-NOAUTH"* ]]
}

acl_args=()
if [[ -n "${REDIS_ACL_FILE:-}" ]]; then
    [[ -r "$REDIS_ACL_FILE" ]] || fail "REDIS_ACL_FILE '$REDIS_ACL_FILE' is not a readable file"
    acl_args=(--aclfile "$(cd "$(dirname "$REDIS_ACL_FILE")" && pwd)/$(basename "$REDIS_ACL_FILE")")
fi

# In the foreground of a background job (no --daemonize), so $! is redis-server itself.
# No persistence: nothing written to disk, nothing loaded at start.
nohup "$REDIS_SERVER" \
    --bind "$HOST" \
    --port "$PORT" \
    --save '' \
    --appendonly no \
    --dir "$RUN_DIR" \
    --dbfilename "redis-$PORT.rdb" \
    --protected-mode yes \
    --loglevel warning \
    "${acl_args[@]}" \
    >"$LOG_FILE" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PID_FILE"

# Ready once it answers PING.
wait_until_ready redis-start redis-server "$pid" "$PID_FILE" "$LOG_FILE" \
    "$START_TIMEOUT_SECONDS" 0.1 answers_ping || exit 1

echo "redis-start: redis-server (PID $pid) listening on $HOST:$PORT, log in $LOG_FILE" >&2
echo "REDIS_URL=redis://$HOST:$PORT"
