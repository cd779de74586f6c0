#!/usr/bin/env bash
# Installs a Go that can build the cluster tests' control plane (tests/apiserver/): Go 1.21 or
# later, from Debian bookworm-backports, when the machine has none that recent. Go's toolchain
# mechanism (GOTOOLCHAIN=auto) then fetches the release tests/apiserver/go.mod names.
set -euo pipefail
if command -v go >/dev/null && go version | grep -Eq 'go1\.(2[1-9]|[3-9][0-9])'; then
  exit 0
fi
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -t bookworm-backports golang-go >/dev/null
go version
