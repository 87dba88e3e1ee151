#!/usr/bin/env bash
# Build-checks deploy/ without a container engine: runs the release build's steps of the
# Dockerfile in a clean directory and checks the result the way the image would run it;
# validates compose.yaml and the systemd unit. scripts/container-check.sh builds and runs
# the image itself (podman, the Dockerfile's `prebuilt` target) and compose.yaml.
#
#   scripts/deploy-check.sh                 # clean clone, fresh release build (~15 min)
#   scripts/deploy-check.sh --reuse-target  # reuse this checkout's target/ (fast)
#
# What it does, step by step, beside the Dockerfile line it stands for:
#   COPY . .                 git clone of the committed tree into an empty directory
#   RUN cargo build ...      the same command, in that clone
#   FROM debian:bookworm-slim  the binaries may link only libraries that image has
#   COPY ... /usr/local/bin, /opt/classifier/model, /etc/classifier  into a root dir
#   ENV, USER, ENTRYPOINT    run there as an unprivileged user with that environment:
#                            the client classifies the examples (embedded broker, so
#                            the server code runs too) and the server prints --help
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
reuse_target=""
[[ "${1:-}" == "--reuse-target" ]] && reuse_target=1

fail() { echo "deploy-check: $*" >&2; exit 1; }
step() { echo; echo "==> deploy-check: $*"; }

BUILD_COMMAND="cargo build --release --locked -p classifier-server -p client-app -p classifier-gateway"
grep -qF "RUN $BUILD_COMMAND" deploy/Dockerfile \
    || fail "deploy/Dockerfile no longer runs '$BUILD_COMMAND'; update this script with it"
for line in "COPY models/fashion-mnist/ /opt/classifier/model/" "COPY config/ /etc/classifier/" \
    "ENV CLASSIFIER_MODEL_DIR=/opt/classifier/model" "USER classifier" \
    'ENTRYPOINT ["/usr/local/bin/classifier-server"]' "CLASSIFIER_METRICS_ADDR=0.0.0.0:9464" \
    'HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["/usr/local/bin/classifier-server", "healthcheck"]'; do
    grep -qF "$line" deploy/Dockerfile || fail "deploy/Dockerfile lost '$line'; update this script"
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

step "COPY . . (a clean clone of HEAD)"
git clone --quiet "$ROOT" "$work/src"

step "RUN $BUILD_COMMAND"
if [[ -n "$reuse_target" ]]; then
    export CARGO_TARGET_DIR="$ROOT/target"
else
    export CARGO_TARGET_DIR="$work/src/target"
fi
(cd "$work/src" && $BUILD_COMMAND)

step "the runtime stage: only libraries Debian slim has"
rootfs="$work/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/opt/classifier/model" "$rootfs/etc/classifier"
cp "$CARGO_TARGET_DIR/release/classifier-server" "$CARGO_TARGET_DIR/release/client-app" \
    "$CARGO_TARGET_DIR/release/classifier-gateway" \
    "$rootfs/usr/local/bin/"
cp -r "$work/src/models/fashion-mnist/." "$rootfs/opt/classifier/model/"
cp -r "$work/src/config/." "$rootfs/etc/classifier/"
# What debian:bookworm-slim ships of these: libc6, libgcc-s1 and zlib1g (dpkg needs
# it; librdkafka links it), plus the vDSO.
allowed='^(linux-vdso\.so\.1|libz\.so\.1|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|/lib64/ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1)$'
for binary in "$rootfs"/usr/local/bin/*; do
    libs="$(ldd "$binary" | awk '{print $1}')"
    extra="$(grep -Ev "$allowed" <<<"$libs" || true)"
    [[ -z "$extra" ]] || fail "$(basename "$binary") links libraries the runtime image lacks: $extra"
    echo "$(basename "$binary"): links only $(tr '\n' ' ' <<<"$libs")"
done

step "ENV, USER, ENTRYPOINT: run as an unprivileged user"
run_dir="$work/run"
mkdir -p "$run_dir" && chmod 777 "$run_dir"
cp -r "$work/src/examples" "$run_dir/examples"
chmod -R a+rX "$work"
as_user() {
    env -i PATH=/usr/bin:/bin HOME="$run_dir" NO_COLOR=1 \
        CLASSIFIER_MODEL_DIR="$rootfs/opt/classifier/model" RUST_LOG=warn \
        setpriv --reuid=10001 --regid=10001 --clear-groups "$@"
}
(cd "$run_dir" && as_user "$rootfs/usr/local/bin/classifier-server" --help >/dev/null) \
    || fail "classifier-server --help failed as user 10001"
summary="$(cd "$run_dir" && as_user "$rootfs/usr/local/bin/client-app" classify examples --quiet)" \
    || fail "client-app classify failed as user 10001"
grep -E "files: 200 +classified: 200" <<<"$summary" >/dev/null \
    || fail "expected 200 of 200 examples classified, got: $summary"
(cd "$run_dir" && printf 'a key' | as_user "$rootfs/usr/local/bin/classifier-gateway" hash-key >/dev/null) \
    || fail "classifier-gateway hash-key failed as user 10001"
echo "$summary" | head -3

step "compose.yaml: valid YAML, every service defined, every path there"
python3 - "$ROOT/deploy/compose.yaml" <<'PY'
import os, sys, yaml
path = sys.argv[1]
base = os.path.dirname(path)
doc = yaml.safe_load(open(path))
services = doc["services"]
assert {"kafka", "server-1", "server-2", "gateway", "client"} <= services.keys(), services.keys()
for name, service in services.items():
    build = service.get("build")
    if build:
        context = os.path.join(base, build["context"])
        assert os.path.isfile(os.path.join(context, build["dockerfile"])), (name, build)
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        assert os.path.isdir(os.path.join(base, source)), (name, volume)
    for dependency in service.get("depends_on", []):
        assert dependency in services, (name, dependency)
print("compose.yaml: services", ", ".join(services))
PY

for service in classifier-server classifier-gateway; do
    step "$service.service: systemd-analyze verify"
    if ! command -v systemd-analyze >/dev/null; then
        echo "systemd-analyze not found: unit not verified"
        continue
    fi
    unit="$work/$service.service"
    # The unit names the installed path; point it at the binary just built.
    sed "s|/usr/local/bin/$service|$rootfs/usr/local/bin/$service|" \
        "deploy/$service.service" >"$unit"
    if ! output="$(systemd-analyze verify "$unit" 2>&1)"; then
        fail "systemd-analyze verify: $output"
    fi
    [[ -z "$output" ]] || echo "$output"
    echo "$service.service: verified"
done

echo
echo "deploy-check: OK"
