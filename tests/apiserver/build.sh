#!/usr/bin/env bash
# Builds the cluster tests' control plane, the upstream kube-apiserver and etcd unmodified, from
# the Go modules pinned in this folder's go.mod and go.sum, and prints the folder that holds the
# two binaries. They are cached outside the clone, keyed by a hash of go.mod, go.sum and this
# script, so a second run reuses them; Go's module and build caches (~/go/pkg/mod,
# ~/.cache/go-build) make a rebuild after a pin change mostly a relink. Installs Go from Debian
# (.ci/install-go.sh) when the machine has none recent enough; Go's toolchain mechanism then
# fetches the release go.mod names.
# VALKEY_CONTROL_PLANE_CACHE overrides where the binaries are kept.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
key=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)
cache="${VALKEY_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/valkey-operator/control-plane}"
out="$cache/$key"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then
  echo "$out"
  exit 0
fi

# A Go unpacked into /usr/local/go may be missing from a non-login shell's PATH.
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
if ! command -v go >/dev/null || ! go version | grep -Eq 'go1\.(2[1-9]|[3-9][0-9])'; then
  echo "installing Go (the control plane is built from Go modules)" >&2
  if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo); fi
  "${as_root[@]}" bash "$here/../../.ci/install-go.sh" >&2
fi
# An older Go (1.21 and later) fetches the toolchain go.mod asks for through the module proxy.
export GOTOOLCHAIN=auto
mkdir -p "$out.tmp"
start=$(date +%s)
echo "building kube-apiserver and etcd into $out (a cold build takes about 6 minutes on 2 cores)" >&2
cd "$here"
# Never `go get -u`: the versions are the ones go.sum pins.
# The version the API server reports (/version), as Kubernetes' own build stamps it.
version=$(sed -n 's/^\tk8s.io\/kubernetes \(v[0-9.]*\).*$/\1/p' go.mod)
minor=$(echo "$version" | cut -d. -f2)
stamp="-X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1"
stamp="$stamp -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
go build -mod=readonly -trimpath -ldflags "-s -w $stamp" -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -mod=readonly -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3 >&2
rm -rf "$out"
mv "$out.tmp" "$out"
# Binaries of other pins are not needed any more.
find "$cache" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
echo "built the control plane in $(($(date +%s) - start)) s" >&2
echo "$out"
