#!/usr/bin/env bash
# The local demo: installs Valkey if missing, builds, and runs what the product has today.
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
exec cargo run --release -q -p valkey-controller -- local up -f deploy/examples/failover.yaml "$@"
