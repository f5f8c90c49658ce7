"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.deps import AuthDep, ServiceDep
from server.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the process answers (no key needed)")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut, "description": "not ready, and why"}},
            summary="Readiness: bundles loaded and warmed up (no key needed)")
def readyz(service: ServiceDep) -> JSONResponse:
    ready = service.ready and service.workers.healthy and all(e.ready for e in service.engines.values())
    status = "ready" if ready else "starting"
    if not ready and service.workers.start_error:
        status = f"no worker: {service.workers.start_error}"
    body = ReadyOut(status=status, models={n: e.ready for n, e in service.engines.items()})
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", dependencies=[AuthDep], response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(service.store), media_type="text/plain; version=0.0.4")
