#!/usr/bin/env bash
# Installs what the schema tests use: kubectl (for `kubectl kustomize deploy/`, from Debian's
# kubernetes-client) and kubernetes-validate (the Kubernetes OpenAPI schemas, from PyPI).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v kubectl >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq kubernetes-client >/dev/null
fi
if ! command -v kubernetes-validate >/dev/null; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq python3-pip >/dev/null
  fi
  # Debian's own Python refuses system-wide pip installs unless told otherwise.
  python3 -m pip install --quiet --root-user-action=ignore kubernetes-validate 2>/dev/null ||
    python3 -m pip install --quiet --root-user-action=ignore --break-system-packages kubernetes-validate
fi
kubectl version --client 2>/dev/null | head -n 1 || true
kubernetes-validate --version
