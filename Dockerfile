# ctseg inference service. Serving dependencies only (and the postgres extra: CTSEG_DATABASE_URL, CTSEG_ROLE): no
# torch, no training code imported.
#   CPU (default):  docker build -t ctseg .
#   CUDA:           docker build -t ctseg:gpu --build-arg EXTRA=gpu .
#                   the same slim base: onnxruntime-gpu with NVIDIA's CUDA 13 and cuDNN 9 wheels from PyPI
#                   (docker/gpu/requirements.txt), no CUDA base image; the host brings the driver (>= 580).
#   + TensorRT:     add --build-arg TENSORRT=1 (docker/gpu/tensorrt.txt; needs pypi.nvidia.com reachable)
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG EXTRA=""
ARG TENSORRT=""
# CUDA base images carry no Python; the python:* images do.
RUN command -v python3 >/dev/null && python3 -m venv --help >/dev/null 2>&1 \
    || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# CUDA build: the pinned GPU wheels (~2.6 GB) in layers of their own, before the sources, so that a change to ctseg
# does not download them again. onnxruntime-gpu provides the CPU wheel's `onnxruntime` module: ctseg's other
# requirements then go in without it (docker/gpu/serving_requirements.py) and ctseg itself with --no-deps.
COPY docker/gpu ./docker/gpu
RUN if [ "$EXTRA" = "gpu" ]; then pip install -r docker/gpu/requirements.txt; fi
RUN if [ "$EXTRA" = "gpu" ] && [ -n "$TENSORRT" ]; then pip install -r docker/gpu/tensorrt.txt; fi
COPY pyproject.toml README.md ./
COPY ctseg ./ctseg
COPY models ./models
COPY server ./server
COPY inflation ./inflation
RUN if [ "$EXTRA" = "gpu" ]; then \
        python docker/gpu/serving_requirements.py pyproject.toml >/tmp/serving.txt \
        && pip install -r /tmp/serving.txt && pip install --no-deps . ; \
    else pip install ".[postgres]" ; fi \
    && python -c "import server.app, sys; assert 'torch' not in sys.modules"

FROM ${BASE}
ARG EXTRA=""
RUN command -v python3 >/dev/null \
    || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*)
RUN useradd --system --uid 10001 --home-dir /var/lib/ctseg --create-home ctseg \
    && mkdir -p /opt/ctseg/bundles /bundles && chown ctseg /var/lib/ctseg
COPY --from=build /opt/venv /opt/venv
# CUDA build: the wheels' library folders (nvidia/*/lib, tensorrt_libs) registered with the dynamic linker, as a CUDA
# base image registers /usr/local/cuda: every process finds them (the API, its spawned workers, any tool), with no
# LD_LIBRARY_PATH and no preloading in code; the NVIDIA container toolkit's ldconfig at start keeps them. The build
# fails if ONNX Runtime's CUDA provider then lacks any library but the host's driver (libcuda.so.1).
RUN if [ "$EXTRA" = "gpu" ]; then \
        set -e; site=$(echo /opt/venv/lib/python3*/site-packages); \
        find "$site/nvidia" "$site/tensorrt_libs" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u \
            >/etc/ld.so.conf.d/ctseg-cuda-wheels.conf; \
        test -s /etc/ld.so.conf.d/ctseg-cuda-wheels.conf; ldconfig; \
        provider="$site/onnxruntime/capi/libonnxruntime_providers_cuda.so"; test -f "$provider"; \
        missing=$(ldd "$provider" | grep 'not found' | grep -v 'libcuda\.so\.1' || true); \
        if [ -n "$missing" ]; then echo "CUDA provider: libraries not found: $missing"; exit 1; fi; \
    fi
COPY models/bundles /opt/ctseg/bundles
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CTSEG_HOST=0.0.0.0 \
    CTSEG_PORT=8000 \
    CTSEG_BUNDLE_DIRS=/opt/ctseg/bundles,/bundles \
    CTSEG_STORAGE_DIR=/var/lib/ctseg
USER ctseg
WORKDIR /var/lib/ctseg
# 8000: REST. 11112: DICOM (DIMSE), reserved for the PACS integration.
EXPOSE 8000 11112
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
CMD ["ctseg", "serve"]
