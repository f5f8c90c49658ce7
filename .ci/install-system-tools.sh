#!/usr/bin/env bash
# System tools the tests run against: Orthanc with its DICOMweb plugin (a real PACS), dcmtk (storescu, echoscu),
# dicom3tools (dciodvfy), Chromium + chromedriver + nginx (the viewer test), PostgreSQL (the shared job store). Under CI=true a tool that cannot be installed fails the run here, and a test that
# finds one missing fails too (tests/pacs.py: require_tool): CI is never green without the real peers.
# Debian's orthanc package would start a server listening on every interface: policy-rc.d keeps it stopped; the
# tests start their own Orthanc on loopback ports with RemoteAccessAllowed false.
set -uo pipefail
need=()
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
# tests/test_viewer.py: OHIF in a real browser behind nginx
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
{ command -v nginx || [ -x /usr/sbin/nginx ]; } >/dev/null || need+=(nginx)
# tests/test_gpu_presence.py builds a stand-in libcuda
command -v cc >/dev/null || need+=(gcc)
# tests/test_store_contract.py, test_postgres_service.py: a real PostgreSQL server (initdb, pg_ctl)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if ((${#need[@]})); then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "ci: installing ${need[*]}"
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created_policy=1
    fi
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/tmp/ctseg-apt.log 2>&1
    rc=$?
    ((created_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((rc)); then
      echo "ci: could not install ${need[*]} (see /tmp/ctseg-apt.log)"
      [ "${CI:-}" = true ] && exit 1
    fi
    # Never leave a system-wide Orthanc running (the package's service, if anything started it).
    pkill -x Orthanc 2>/dev/null || true
  else
    echo "ci: missing ${need[*]} and no apt-get as root to install them"
    [ "${CI:-}" = true ] && exit 1
  fi
fi
exit 0
