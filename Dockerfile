# ctseg inference service. Serving dependencies only: no torch, no training code imported.
#   CPU (default):  docker build -t ctseg .
#   CUDA:           docker build -t ctseg:gpu --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 --build-arg EXTRA=gpu .
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG EXTRA=""
# CUDA base images carry no Python; the python:* images do.
RUN command -v python3 >/dev/null && python3 -m venv --help >/dev/null 2>&1 \
    || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ctseg ./ctseg
COPY models ./models
COPY server ./server
COPY inflation ./inflation
RUN pip install . \
    && if [ "$EXTRA" = "gpu" ]; then pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.18" "onnx>=1.16"; fi \
    && python -c "import server.app, sys; assert 'torch' not in sys.modules"

FROM ${BASE}
RUN command -v python3 >/dev/null \
    || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*)
RUN useradd --system --uid 10001 --home-dir /var/lib/ctseg --create-home ctseg \
    && mkdir -p /opt/ctseg/bundles /bundles && chown ctseg /var/lib/ctseg
COPY --from=build /opt/venv /opt/venv
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
