#!/usr/bin/env bash
# System tools the tests check against where present (DICOM validators, a real PACS). Best effort: a test that
# needs a missing tool skips and says so; CI installs them so the checks run there.
set -uo pipefail
need=()
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc orthanc-dicomweb)
if ((${#need[@]})) && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "ci: installing ${need[*]}"
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || echo "ci: could not install ${need[*]}; the tests that need them will skip"
fi
exit 0
