#!/usr/bin/env bash
# The local failover demo: installs Valkey when it is missing, builds the two binaries, and runs
# a three-node instance (deploy/examples/failover-manual.yaml) until Ctrl-C.
# Extra arguments go to `valkey-controller local up` (e.g. --dir, -f another manifest).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valkey-server >/dev/null || ! command -v valkey-sentinel >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "valkey-server is missing: run 'sudo bash .ci/install-valkey.sh' first" >&2
    exit 1
  fi
  bash .ci/install-valkey.sh
fi
cargo build --release -p valkey-agent -p valkey-controller
manifest=deploy/examples/failover-manual.yaml
for arg in "$@"; do
  case "$arg" in -f|--file) manifest="" ;; esac
done
exec target/release/valkey-controller local up ${manifest:+-f "$manifest"} "$@"
