#!/usr/bin/env bash
# Installs valkey-server and valkey-sentinel from Debian bookworm-backports.
set -euo pipefail
if command -v valkey-server >/dev/null && command -v valkey-sentinel >/dev/null; then
  exit 0
fi
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -t bookworm-backports valkey-server valkey-sentinel valkey-tools >/dev/null
# The packages start system services; tests run their own processes.
systemctl stop valkey-server valkey-sentinel 2>/dev/null || true
pkill -x valkey-server 2>/dev/null || true
pkill -x valkey-sentinel 2>/dev/null || true
valkey-server --version
