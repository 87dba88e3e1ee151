#!/usr/bin/env bash
# Validates deploy/kubernetes/ offline, with no cluster (see deploy/kubernetes/README.md,
# "Validation"):
#
#   scripts/kubernetes-check.sh
#
# - every manifest, and every variant `kubectl kustomize` renders (the default and one
#   per scaling/ component; skipped with a note when kubectl is missing), against the
#   Kubernetes 1.33 and 1.35 OpenAPI schemas, strict: an unknown field is an error
#   (schemas from the PyPI package kubernetes-validate, pinned below);
# - ScaledObject and TriggerAuthentication against KEDA v2.20.2's CRD schemas, strict,
#   with their CEL rules, and each trigger's metadata against what its scaler reads
#   (deploy/kubernetes/schemas/, regenerated from KEDA's repository by regenerate.py);
# - each variant as a whole: the autoscaler's topic, group, partitions and thresholds
#   agree with the server's config, the grace period exceeds the drain, the probes hit
#   the server's port; the server.toml files hold only settings the server knows;
# - deploy/kubernetes/tests/broken/*.yaml must each be rejected, for the reason its
#   `# expect:` line states.
#
# Tools: a venv in .tools/kubernetes-venv with the packages pinned below, made on the
# first run (about 25 MB from PyPI, ~10 s) and remade when the pins change; then a run
# takes about 1 s. It writes nothing else but a temporary directory (removed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.tools/kubernetes-venv"
STAMP="$VENV/kubernetes-check-packages.txt"
# kubernetes-validate 1.37.0 ships the strict JSON schemas of Kubernetes 1.25 to 1.37;
# the rest are its dependencies, pinned too.
PACKAGES=(
    kubernetes-validate==1.37.0
    jsonschema==4.26.0
    jsonschema-specifications==2025.9.1
    referencing==0.37.0
    rpds-py==2026.9.1
    attrs==26.1.0
    PyYAML==6.0.4
    packaging==26.4
    importlib_resources==7.1.0
    typing_extensions==4.16.0
)

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "kubernetes-check: needs Python 3.11 or newer (tomllib) as python3" >&2; exit 1; }

if [[ "$(cat "$STAMP" 2>/dev/null)" != "${PACKAGES[*]}" ]]; then
    echo "kubernetes-check: installing ${PACKAGES[0]} and its dependencies into $VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet "${PACKAGES[@]}"
    printf '%s' "${PACKAGES[*]}" >"$STAMP"
fi

kubectl_args=()
if command -v kubectl >/dev/null; then
    kubectl_args=(--kubectl "$(command -v kubectl)")
    echo "kubernetes-check: rendering with $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
fi
PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" deploy/kubernetes/tests/validate.py \
    deploy/kubernetes "${kubectl_args[@]}"
