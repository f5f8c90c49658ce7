#!/usr/bin/env bash
# Every GPU measurement of issue 22 in one command (bench/gpu_check.py says what each table is).
#
#   bash bench/gpu_check.sh --out DIR             on the GPU machine: its python3 (torch, timm, einops, numpy)
#   bash bench/gpu_check.sh --out DIR --dry-run   on a CPU at tiny sizes (CI), so the script cannot rot
#
# The GPU machine has no MONAI and reaches no registry: the wheel travels in .whl/ (ignored by git), fetched here
# first with `bash bench/gpu_check.sh --fetch-wheels`; what travels must stay under 64 MiB with the tracked tree.
set -euo pipefail
cd "$(dirname "$0")/.."
MONAI_WHEEL_VERSION=1.4.0
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "monai==${MONAI_WHEEL_VERSION}"
  tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
  echo "gpu_check: tracked tree $((tracked / 1048576)) MiB + wheels $((wheels / 1048576)) MiB of the 64 MiB a call carries"
  (( tracked + wheels < 64 * 1048576 )) || { echo "gpu_check: too much to carry" >&2; exit 1; }
  exit 0
fi
PY=${PYTHON:-python3}
if [[ -z "${PYTHON:-}" && -x .venv/bin/python && " $* " == *" --dry-run "* ]]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import monai" 2>/dev/null; then
  ls .whl/monai-*.whl >/dev/null 2>&1 || { echo "gpu_check: MONAI missing and no wheel in .whl/ (--fetch-wheels)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/monai-*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec timeout 480 "$PY" bench/gpu_check.py "$@"
