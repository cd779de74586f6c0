#!/usr/bin/env bash
# Builds redis_exporter, the metrics exporter the data pods run, from the Go module pinned in
# this folder's go.mod and go.sum (the version the controller's default image names), and prints
# the folder that holds the binary. Cached outside the clone, keyed by a hash of go.mod, go.sum
# and this script. Go comes from the machine, or from Debian (.ci/install-go.sh).
# VALKEY_EXPORTER_CACHE overrides where the binary is kept.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
key=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)
cache="${VALKEY_EXPORTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/valkey-operator/redis-exporter}"
out="$cache/$key"
if [ -x "$out/redis_exporter" ]; then
  echo "$out"
  exit 0
fi
if [ -x /usr/local/go/bin/go ]; then export PATH="/usr/local/go/bin:$PATH"; fi
if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo); fi
"${as_root[@]}" bash "$here/../../.ci/install-go.sh" >&2
export GOTOOLCHAIN=auto
mkdir -p "$out.tmp"
cd "$here"
go build -mod=readonly -trimpath -ldflags "-s -w" -o "$out.tmp/redis_exporter" github.com/oliver006/redis_exporter >&2
rm -rf "$out"
mv "$out.tmp" "$out"
find "$cache" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
echo "$out"
