#!/usr/bin/env bash
# Build the CUDA image the way docker-compose.gpu.yml does (Dockerfile EXTRA=gpu: the slim Python base with
# onnxruntime-gpu and NVIDIA's CUDA/cuDNN wheels, no CUDA base image) and check it on this machine, which has no GPU:
# ONNX Runtime inside lists CUDAExecutionProvider and every library its CUDA provider and cuDNN need resolves but the
# host's driver; `ctseg serve` with CTSEG_DEVICE=cuda (as the GPU compose file sets) logs that no GPU was found,
# serves on the CPU (/healthz, /readyz, /v1/models says cpu), runs as non-root without torch; and CTSEG_ENGINE=cuda
# refuses to start, naming the missing GPU. Skips (exit 0, says why) where no engine runs, except under CI=true,
# where that fails; any failed check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
NAME=gpu-image
. .ci/docker-common.sh
IMAGE=${CTSEG_GPU_IMAGE:-ctseg:gpu-ci}
fail() { log "FAILED: $*"; exit 1; }

start=$(date +%s)
CTSEG_IMAGE=$IMAGE $COMPOSE -f docker-compose.yml -f docker-compose.gpu.yml build ctseg >/tmp/ctseg-gpu-build.log 2>&1 \
  || { tail -40 /tmp/ctseg-gpu-build.log; fail "CUDA image build"; }
log "image $IMAGE built in $(( $(date +%s) - start )) s; size $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

providers=$(docker run --rm "$IMAGE" python3 -c "import onnxruntime as o; print(o.get_available_providers())") \
  || fail "onnxruntime does not import in the image"
log "providers: $providers"
[[ $providers == *CUDAExecutionProvider* ]] || fail "onnxruntime in the image lists no CUDAExecutionProvider"

# The libraries are found through the dynamic linker's cache (Dockerfile: ld.so.conf.d), by ldd and by dlopen by
# name as ONNX Runtime loads cuDNN; only the driver, which the NVIDIA container toolkit mounts, may be missing here.
docker run --rm "$IMAGE" python3 -c '
import ctypes, glob, os, subprocess, sys
import onnxruntime
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
libs = glob.glob(os.path.join(capi, "libonnxruntime_providers_*.so")) + glob.glob("/opt/venv/lib/python3*/site-packages/nvidia/**/lib*.so*", recursive=True)
missing = {}
for lib in libs:
    out = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
    gone = [l.split()[0] for l in out.splitlines() if "not found" in l and not l.strip().startswith("libcuda.so.1")]
    if gone and not (lib.endswith("tensorrt.so") and all(g.startswith("libnv") for g in gone)):
        missing[os.path.basename(lib)] = gone
for name in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12", "libcudnn.so.9"):
    ctypes.CDLL(name)
print(len(libs), "libraries checked; unresolved but the driver:", missing or "none")
sys.exit(1 if missing else 0)
' || fail "CUDA libraries do not all resolve in the image"

PORT=$(free_port)
cid=$(docker run -d -p "127.0.0.1:$PORT:8000" -e CTSEG_DEVICE=cuda "$IMAGE") || fail "docker run"
trap 'docker rm -f "$cid" >/dev/null 2>&1' EXIT
for _ in $(seq 120); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null || { docker logs "$cid" 2>&1 | tail -40; fail "/readyz never answered"; }
curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null || fail "/healthz did not answer"
logs=$(docker logs "$cid" 2>&1)  # read whole, then searched: `grep -m1` on the pipe would cut docker logs (pipefail)
nogpu=$(grep "no GPU found" <<<"$logs") || { tail -40 <<<"$logs"; fail "no 'no GPU found' line in the log"; }
log "log: $nogpu"
[ "$(wc -l <<<"$nogpu")" = 1 ] || fail "the 'no GPU found' line is not logged once"
devices=$(curl -fsS "http://127.0.0.1:$PORT/v1/models" | $PY -c 'import json, sys; print(sorted({m["device"] + " " + m["engine"] for m in json.load(sys.stdin)["models"]}))')
log "serving: $devices"
[[ $devices == *cpu* && $devices != *cuda* ]] || fail "the models are not served on the CPU ($devices)"
[ "$(docker exec "$cid" id -un)" != root ] || fail "the service runs as root"
docker exec "$cid" python3 -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('torch') else 0)" \
  || fail "torch is installed in the CUDA image"

refusal=$(timeout 120 docker run --rm -e CTSEG_ENGINE=cuda "$IMAGE" 2>&1); rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "CTSEG_ENGINE=cuda without a GPU did not refuse to start (rc $rc)"
[[ $refusal == *"no GPU was found"* ]] || { echo "$refusal" | tail -20; fail "CTSEG_ENGINE=cuda refused without naming the missing GPU"; }
log "CTSEG_ENGINE=cuda without a GPU: refused (rc $rc)"
log "passed in $(( $(date +%s) - start )) s"
