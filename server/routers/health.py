"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: bundles loaded and warmed up")
def readyz(service: ServiceDep) -> JSONResponse:
    ready = service.ready and service.workers.healthy and all(e.ready for e in service.engines.values())
    status = "ready" if ready else "starting"
    if not ready and service.workers.start_error:
        status = f"no worker: {service.workers.start_error}"
    body = {"status": status, "models": {n: e.ready for n, e in service.engines.items()}}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(service.store), media_type="text/plain; version=0.0.4")
