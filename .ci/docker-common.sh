# Sourced by the Docker checks (.ci/docker-smoke.sh, .ci/docker-smoke-scale.sh, .ci/gpu-image.sh) after they set
# NAME: a Docker engine (started where none runs), the local base image, compose, and a free loopback port.
# Outside CI a machine without Docker skips (saying why); under CI=true that is a failure, like a missing tool.
ENGINE=../shared/tools/container-engine.sh
PY=${PY:-.venv/bin/python}
log() { echo "$NAME: $*"; }
skip() { log "$1"; if [ "${CI:-}" = true ]; then log "FAILED: CI needs the $NAME check"; exit 1; fi; exit 0; }
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
  if [ -x "$ENGINE" ]; then
    bash "$ENGINE" start >/tmp/ctseg-engine.log 2>&1 || skip "SKIPPED: no Docker engine could be started (see /tmp/ctseg-engine.log)"
  else
    skip "SKIPPED: no Docker engine here and no $ENGINE to start one"
  fi
fi
if [ -x "$ENGINE" ]; then
  bash "$ENGINE" base >/tmp/ctseg-engine-base.log 2>&1 || { log "FAILED: could not build the base image"; cat /tmp/ctseg-engine-base.log; exit 1; }
fi
COMPOSE="docker-compose"
command -v docker-compose >/dev/null || COMPOSE="docker compose"
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
