#!/usr/bin/env bash
# The compose scale profile, really run: PostgreSQL (docker/postgres/), the one-off migration, 2 API replicas behind
# the proxy (docker/proxy/), a DICOM receiver and 2 workers on one shared volume. Posts a CT (a generated DICOM
# series) to the proxy, waits for the job, reads its label map and SEG back through the proxy (round-robin: other
# replicas than the one that took it), checks a worker ran it and every container is non-root on a read-only root
# filesystem. Tears everything down (down -v). Skips (exit 0, says why) where no engine runs, except under CI=true.
# The ctseg image must have the postgres extra (psycopg, procrastinate); CTSEG_IMAGE picks it (default ctseg:ci,
# built here from the Dockerfile unless CTSEG_SCALE_NO_BUILD=1).
set -uo pipefail
cd "$(dirname "$0")/.."
NAME=docker-smoke-scale
. .ci/docker-common.sh
export CTSEG_BIND=127.0.0.1 CTSEG_IMAGE=${CTSEG_IMAGE:-ctseg:ci}
export CTSEG_POSTGRES_IMAGE=ctseg-postgres:ci CTSEG_PROXY_IMAGE=ctseg-proxy:ci
export CTSEG_PROXY_PORT=$(free_port) CTSEG_SCALE_DICOM_HOST_PORT=$(free_port)
export CTSEG_POSTGRES_PASSWORD="ci-$$-$RANDOM"
WORKERS=2
PROJECT="ctsegscale$$"
dc() { $COMPOSE -p "$PROJECT" --profile scale "$@"; }
cleanup() { dc down -v --remove-orphans >/dev/null 2>&1; }
trap cleanup EXIT
fail() { log "FAILED: $1"; dc ps; dc logs --tail=40; exit 1; }

t0=$(date +%s)
if [ "${CTSEG_SCALE_NO_BUILD:-}" != 1 ]; then
  $COMPOSE -p "$PROJECT" build ctseg >/tmp/ctseg-docker-build.log 2>&1 || { log "FAILED: image build"; tail -40 /tmp/ctseg-docker-build.log; exit 1; }
fi
docker run --rm --entrypoint python3 "$CTSEG_IMAGE" -c "import psycopg, procrastinate" 2>/dev/null \
  || { log "FAILED: $CTSEG_IMAGE lacks the postgres extra (the Dockerfile must pip install '.[postgres]')"; exit 1; }
dc build postgres proxy >/tmp/ctseg-docker-build-scale.log 2>&1 || { log "FAILED: postgres/proxy image build"; tail -40 /tmp/ctseg-docker-build-scale.log; exit 1; }
t1=$(date +%s)
log "images ready in $(( t1 - t0 )) s"
# the services by name: `up` alone would also start the single-box service ctseg (it has no profile)
dc up -d --scale worker=$WORKERS proxy dicom worker || fail "compose --profile scale up"
BASE="http://127.0.0.1:$CTSEG_PROXY_PORT"
for _ in $(seq 180); do
  curl -fsS "$BASE/readyz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "$BASE/readyz" >/dev/null || fail "the proxy's /readyz never answered"
t2=$(date +%s)
log "up and ready through the proxy in $(( t2 - t1 )) s"
[ "$(docker inspect --format '{{.State.ExitCode}}' "$(dc ps -q migrate)")" = 0 ] || fail "the migration did not exit 0"
for svc in api worker; do
  want=$([ $svc = api ] && echo 2 || echo $WORKERS)
  n=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$svc" | wc -l)
  [ "$n" = "$want" ] || fail "$n $svc containers running, not $want"
done
for _ in $(seq 60); do  # every worker has warmed up and listens on its queue
  n=$(dc logs --no-color worker 2>/dev/null | grep -c "takes jobs from seg\.")
  [ "$n" -ge $WORKERS ] && break
  sleep 1
done
[ "$n" -ge $WORKERS ] || fail "only $n of $WORKERS workers said they take jobs"
out=$($PY .ci/docker_smoke_check.py "$BASE") || { echo "$out"; fail "segmentation through the proxy"; }
echo "$out"
t3=$(date +%s)
log "CT segmented through the proxy in $(( t3 - t2 )) s"
job=$(echo "$out" | sed -n 's/^docker-smoke: job \([0-9a-f]*\) .*/\1/p')
worker_logs=$(dc logs --no-color worker 2>&1)  # into a variable: grep -q on a pipe would SIGPIPE it (pipefail)
[ -n "$job" ] && grep -q "job $job succeeded" <<<"$worker_logs" || fail "no worker logged job $job succeeded"
# the DICOM receiver answers a C-ECHO from an allowed AE title on its host port (dcmtk's echoscu)
command -v echoscu >/dev/null || { [ "${CI:-}" = true ] && fail "echoscu (dcmtk) missing"; log "no echoscu: C-ECHO not checked"; }
if command -v echoscu >/dev/null; then
  for _ in $(seq 30); do echoscu -aet ORTHANC -aec CTSEG 127.0.0.1 "$CTSEG_SCALE_DICOM_HOST_PORT" 2>/dev/null && break; sleep 1; done
  echoscu -aet ORTHANC -aec CTSEG 127.0.0.1 "$CTSEG_SCALE_DICOM_HOST_PORT" || fail "the DICOM receiver did not answer C-ECHO"
  log "DICOM receiver answers C-ECHO on 127.0.0.1:$CTSEG_SCALE_DICOM_HOST_PORT"
fi
for cid in $(dc ps -q api); do  # round-robin: each replica answered requests that came through the proxy
  api_logs=$(docker logs "$cid" 2>&1)
  grep "ctseg.access" <<<"$api_logs" | grep -v " 127.0.0.1 " | grep -q . \
    || fail "api replica $(docker inspect --format '{{.Name}}' "$cid") got no request through the proxy"
done
for cid in $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT"); do
  name=$(docker inspect --format '{{.Name}}' "$cid")
  user=$(docker exec "$cid" id -u)
  [ "$user" != 0 ] || fail "$name runs as root"
  case "$name" in *_postgres_*|*_proxy_*) continue ;; esac
  [ "$(docker inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$cid")" = true ] || fail "$name has a writable root"
done
dc down -v --remove-orphans >/dev/null 2>&1 || fail "compose down -v"
log "passed: postgres, migrate, 2 api behind the proxy, dicom, $WORKERS workers; total $(( $(date +%s) - t0 )) s"
