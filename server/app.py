"""``create_app(settings)``: the FastAPI application. Bundles are loaded and warmed up once, in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import ctseg
from server.api.limits import BodySizeLimit
from server.api.routes import health, models, segmentations
from server.api.security import PROBES, ApiKeyGuard
from server.core.errors import (
    STORAGE_FULL,
    BadGateway,
    InputError,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    storage_full,
)
from server.core.settings import Settings
from server.core.sqlite import StoreBusy
from server.jobs.lock import StorageLock
from server.service import SegmentationService

log = logging.getLogger(__name__)


# Client libraries that log a line per request at INFO, naming study and series UIDs: warnings only.
QUIET_LOGGERS = ("dicomweb_client", "pynetdicom", "highdicom")


def create_app(settings: Settings | None = None, service: SegmentationService | None = None,
               lock: StorageLock | None = None) -> FastAPI:
    """``lock``: the storage lock, when the caller took it already (``ctseg serve`` does, before binding a port)."""
    settings = settings or Settings()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or SegmentationService(settings, lock)
        app.state.service = svc
        try:
            await asyncio.get_running_loop().run_in_executor(None, svc.start)
        except BaseException:
            svc.stop()  # what started goes, and the storage lock with it
            raise
        cleaner = asyncio.create_task(_retention_loop(svc))
        log.info("ready: %s", ", ".join(svc.engines))
        try:
            yield
        finally:
            cleaner.cancel()
            svc.stop()

    app = FastAPI(
        title="ctseg", version=ctseg.__version__, lifespan=lifespan,
        description="CT segmentation with inflated 2D Vision Transformers. Research and demonstration use only.",
    )
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(segmentations.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_mb * 1024 * 1024)
    open_paths = PROBES | ({"/metrics"} if settings.metrics_public else set())
    app.add_middleware(ApiKeyGuard, keys=settings.api_keys, open_paths=frozenset(open_paths))  # outermost: first

    @app.middleware("http")
    async def observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        svc = getattr(request.app.state, "service", None)
        if svc is not None:
            svc.metrics.requests.labels(request.method, path, str(response.status_code)).inc()
            svc.metrics.latency.labels(request.method, path).observe(time.perf_counter() - start)
        return response

    for exc_type in (InputError, NotFound, PayloadTooLarge, ServiceUnavailable, BadGateway, InsufficientStorage):
        app.add_exception_handler(exc_type, _error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(Exception, _internal_handler)
    return app


async def _internal_handler(request: Request, exc: Exception) -> JSONResponse:
    if storage_full(exc):  # wherever it happened (a record, a file): the same 507, never a 500
        log.error("storage full on %s %s", request.method, request.url.path)
        return await _error_handler(request, InsufficientStorage(STORAGE_FULL))
    if isinstance(exc, StoreBusy):
        return await _error_handler(request, ServiceUnavailable("the job database is busy; retry later"))
    log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the service log"}, status_code=500)


async def _error_handler(request: Request, exc: Exception) -> JSONResponse:
    body: dict = {"detail": str(exc)}
    extra = getattr(exc, "detail", None)
    if isinstance(extra, dict):
        body.update(extra)
    headers = {"Retry-After": "30"} if isinstance(exc, ServiceUnavailable) else None
    return JSONResponse(body, status_code=getattr(exc, "status_code", 400), headers=headers)


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'request'}: {e.get('msg')}" for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


async def _retention_loop(service: SegmentationService) -> None:
    while True:
        await asyncio.sleep(600)
        try:
            removed = await asyncio.get_running_loop().run_in_executor(None, service.cleanup)
            if removed:
                log.info("retention removed %d job(s)", removed)
        except Exception:  # keep the loop alive; the next round tries again
            log.exception("retention cleanup failed")
