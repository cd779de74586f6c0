#!/usr/bin/env bash
# The tests, on a fresh Debian machine or an equipped one: installs what they need when it is
# missing (valkey-server and valkey-sentinel from bookworm-backports, kubectl, kubernetes-validate,
# iproute2 for the partition tests, Go for the control plane, cargo-nextest), builds the cluster
# tests' control plane (kube-apiserver and etcd from Go modules, cached outside the clone: see
# tests/apiserver/build.sh) and the metrics exporter (tests/exporter/build.sh), starts the
# control plane for the whole run, then runs every test and stops it.
# Extra arguments go to `cargo nextest run`. The partition tests need root (network
# namespaces); without it they say so and pass.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v valkey-server >/dev/null && command -v valkey-sentinel >/dev/null || missing+=(valkey)
command -v kubectl >/dev/null || missing+=(kubectl)
command -v kubernetes-validate >/dev/null || missing+=(kubernetes-validate)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing what the tests need: ${missing[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null; then
    as_root=(sudo)
  else
    echo "missing ${missing[*]}, and installing them needs root: run 'bash .ci/install-valkey.sh && bash .ci/install-k8s-tools.sh && bash .ci/install-net-tools.sh' as root" >&2
    exit 1
  fi
  "${as_root[@]}" bash .ci/install-valkey.sh
  "${as_root[@]}" bash .ci/install-k8s-tools.sh
  "${as_root[@]}" bash .ci/install-net-tools.sh
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

# The control plane every cluster test shares (each test works in a namespace of its own).
VALKEY_CONTROL_PLANE_BIN="$(bash tests/apiserver/build.sh)"
export VALKEY_CONTROL_PLANE_BIN
# The metrics exporter the data pods run, for the exporter test (tests/exporter/build.sh).
VALKEY_TEST_EXPORTER_BIN="$(bash tests/exporter/build.sh)/redis_exporter"
export VALKEY_TEST_EXPORTER_BIN
cargo build --workspace --bins
plane="$(mktemp -u "${TMPDIR:-/tmp}/valkey-control-plane.XXXXXX")"
"${CARGO_TARGET_DIR:-target}/debug/control-plane" "$plane" &
plane_pid=$!
trap 'kill "$plane_pid" 2>/dev/null; wait "$plane_pid" 2>/dev/null' EXIT
for _ in $(seq 1 600); do
  [ -e "$plane" ] && break
  kill -0 "$plane_pid" 2>/dev/null || { echo "the control plane did not start" >&2; exit 1; }
  sleep 0.2
done
[ -e "$plane" ] || { echo "the control plane was not ready within 120 s" >&2; exit 1; }
export VALKEY_TEST_CONTROL_PLANE="$plane"
cargo nextest run --workspace --profile ci "$@"
