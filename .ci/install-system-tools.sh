#!/usr/bin/env bash
# System tools the tests check against where present (DICOM validators). Best effort: a test that needs a
# missing tool skips and says so; CI installs them so the checks run there. (Orthanc comes with the PACS
# integration tests; Debian's package would start a server listening on every interface.)
set -uo pipefail
need=()
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v storescu >/dev/null || need+=(dcmtk)
if ((${#need[@]})) && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "ci: installing ${need[*]}"
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || echo "ci: could not install ${need[*]}; the tests that need them will skip"
fi
exit 0
