#!/usr/bin/env bash
# Installs iproute2 (`ip netns`, veth, bridges, blackhole routes) for the partition tests.
set -euo pipefail
if command -v ip >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq iproute2 >/dev/null
ip -V
