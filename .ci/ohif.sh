#!/usr/bin/env bash
# The OHIF viewer the browser test (tests/test_viewer.py) and the compose `ohif` service (docker/ohif) serve: the
# built `@ohif/app` package from the npm registry, pinned by version AND by the registry's integrity hash, which is
# checked here on the downloaded tarball before anything is unpacked. Its dist/ lands in DEST (argument 1, else
# $CTSEG_OHIF_DIST, else ~/.cache/ctseg/ohif/dist); a DEST that already holds this exact tarball is kept as it is.
# Usage: bash .ci/ohif.sh [DEST]      e.g. bash .ci/ohif.sh docker/ohif/dist   (before `docker compose build ohif`)
set -euo pipefail
OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
dest=${1:-${CTSEG_OHIF_DIST:-${XDG_CACHE_HOME:-$HOME/.cache}/ctseg/ohif/dist}}
stamp="$dest/.ctseg-ohif-integrity"
if [ -f "$dest/index.html" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$OHIF_INTEGRITY" ]; then
  echo "ohif: @ohif/app@$OHIF_VERSION already in $dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if command -v npm >/dev/null; then
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
else  # the same tarball straight from the registry
  curl -fsSL -o "$tmp/ohif-app-$OHIF_VERSION.tgz" "https://registry.npmjs.org/@ohif/app/-/app-$OHIF_VERSION.tgz"
fi
tarball="$tmp/ohif-app-$OHIF_VERSION.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$got" != "$OHIF_INTEGRITY" ]; then
  echo "ohif: integrity mismatch for @ohif/app@$OHIF_VERSION: got $got, pinned $OHIF_INTEGRITY" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$tmp" package/dist
[ -f "$tmp/package/dist/index.html" ] || { echo "ohif: the tarball holds no built dist/index.html" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp/package/dist" "$dest"
echo "$OHIF_INTEGRITY" >"$stamp"
echo "ohif: @ohif/app@$OHIF_VERSION ($OHIF_INTEGRITY) unpacked in $dest"
