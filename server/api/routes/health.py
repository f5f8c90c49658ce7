"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.api.deps import AuthDep, ServiceDep
from server.api.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the process answers (no key needed)")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut, "description": "not ready, and why"}},
            summary="Readiness: bundles loaded and warmed up (no key needed)")
def readyz(service: ServiceDep) -> JSONResponse:
    ready, status = service.readiness()
    body = ReadyOut(status=status, models={n: e.ready for n, e in service.engines.items()})
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", dependencies=[AuthDep], response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics_text(), media_type="text/plain; version=0.0.4")
