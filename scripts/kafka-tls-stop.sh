#!/usr/bin/env bash
# Stops what scripts/kafka-tls-start.sh started for KAFKA_TLS_PORT (default 19094) and
# KAFKA_TLS_BACKEND_PORT (default 19093): exactly the PIDs in its pid files, the TLS
# proxy (stunnel) first, then the private Tansu behind it (TERM, then KILL after 10 s),
# never by name; then deletes the listener's throwaway certificates and keys.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/pidfile.sh
source "$ROOT/scripts/lib/pidfile.sh"
TLS_PORT="${KAFKA_TLS_PORT:-19094}"
BACKEND_PORT="${KAFKA_TLS_BACKEND_PORT:-19093}"
RUN_DIR="$ROOT/.tools/run"

status=0
stop_pid_file kafka-tls-stop "$RUN_DIR/kafka-tls-$TLS_PORT.pid" stunnel 10 stunnel || status=1
stop_pid_file kafka-tls-stop "$RUN_DIR/kafka-tls-backend-$BACKEND_PORT.pid" Tansu 10 tansu || status=1
rm -rf "$RUN_DIR/kafka-tls-$TLS_PORT"
exit "$status"
