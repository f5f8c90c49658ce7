#!/usr/bin/env bash
# Build the image, start the ctseg service with compose, wait for /readyz, post a CT (a generated DICOM series),
# check the label map and the DICOM-SEG, then the PACS pair (--profile pacs): Orthanc forwards a CT to ctseg and the
# SEG comes back into the study. Tears everything down. Skips (exit 0, says why) where no engine runs, except under
# CI=true, where that fails.
set -uo pipefail
cd "$(dirname "$0")/.."
NAME=docker-smoke
. .ci/docker-common.sh
PORT=$(free_port)
ORTHANC_PORT=$(free_port)
export CTSEG_HTTP_PORT=$PORT CTSEG_BIND=127.0.0.1 CTSEG_IMAGE=ctseg:ci CTSEG_ORTHANC_IMAGE=ctseg-orthanc:ci
export CTSEG_DICOM_HOST_PORT=$(free_port) CTSEG_ORTHANC_HTTP_PORT=$ORTHANC_PORT CTSEG_ORTHANC_DICOM_PORT=$(free_port)
export CTSEG_DICOM_STABLE_SECONDS=3
PROJECT="ctsegci$$"
cleanup() { $COMPOSE -p "$PROJECT" --profile pacs down -v --remove-orphans >/dev/null 2>&1; }
trap cleanup EXIT

start=$(date +%s)
$COMPOSE -p "$PROJECT" build ctseg >/tmp/ctseg-docker-build.log 2>&1 || { log "FAILED: image build"; tail -40 /tmp/ctseg-docker-build.log; exit 1; }
log "image built in $(( $(date +%s) - start )) s; size $(docker image inspect ctseg:ci --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
$COMPOSE -p "$PROJECT" up -d ctseg || { log "FAILED: compose up"; exit 1; }
for _ in $(seq 120); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/readyz" || { log "FAILED: /readyz never answered"; $COMPOSE -p "$PROJECT" logs ctseg | tail -40; exit 1; }
echo
$PY .ci/docker_smoke_check.py "http://127.0.0.1:$PORT" || { log "FAILED: segmentation check"; $COMPOSE -p "$PROJECT" logs ctseg | tail -40; exit 1; }
cid=$($COMPOSE -p "$PROJECT" ps -q ctseg)
for _ in $(seq 60); do
  health=$(docker inspect --format '{{.State.Health.Status}}' "$cid")
  [ "$health" = healthy ] && break
  sleep 2
done
[ "$health" = healthy ] || { log "FAILED: the image's HEALTHCHECK did not turn healthy ($health)"; exit 1; }
user=$(docker exec "$cid" id -un)
[ "$user" != root ] || { log "FAILED: the service runs as root"; exit 1; }
docker exec "$cid" python3 -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('torch') else 0)" \
  || { log "FAILED: torch is installed in the serving image"; exit 1; }
log "container health: $health; user: $user; no torch in the image"

# The PACS pair (--profile pacs): Orthanc forwards a study to ctseg, the SEG comes back into the same study.
$COMPOSE -p "$PROJECT" --profile pacs build orthanc >/tmp/ctseg-docker-build-orthanc.log 2>&1 \
  || { log "FAILED: Orthanc image build"; tail -40 /tmp/ctseg-docker-build-orthanc.log; exit 1; }
# The viewer (OHIF, pinned by version and hash) beside Orthanc, on a free port.
bash .ci/ohif.sh docker/ohif/dist || { log "FAILED: fetching the pinned OHIF build"; exit 1; }
export CTSEG_OHIF_PORT=$(free_port) CTSEG_OHIF_IMAGE=ctseg-ohif:ci
$COMPOSE -p "$PROJECT" --profile pacs up -d || { log "FAILED: compose --profile pacs up"; exit 1; }
for _ in $(seq 60); do
  curl -fsS "http://127.0.0.1:$ORTHANC_PORT/system" >/dev/null 2>&1 && break
  sleep 1
done
for _ in $(seq 30); do
  curl -fsS "http://127.0.0.1:$CTSEG_OHIF_PORT/dicom-web/studies" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$CTSEG_OHIF_PORT/app-config.js" >/dev/null \
  && curl -fsS "http://127.0.0.1:$CTSEG_OHIF_PORT/dicom-web/studies" >/dev/null \
  || { log "FAILED: the viewer does not serve OHIF or proxy /dicom-web to Orthanc"; exit 1; }
log "viewer on 127.0.0.1:$CTSEG_OHIF_PORT serves OHIF and proxies /dicom-web"
$PY .ci/docker_smoke_pacs.py "http://127.0.0.1:$ORTHANC_PORT" \
  || { log "FAILED: PACS round trip"; $COMPOSE -p "$PROJECT" --profile pacs logs | tail -60; exit 1; }
log "passed in $(( $(date +%s) - start )) s"
