"""``create_app(settings)``: the FastAPI application. Bundles are loaded and warmed up once, in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import ctseg
from server.api.limits import BodyDeadlines, BodySizeLimit
from server.api.routes import health, models, segmentations
from server.api.security import PROBES, ApiKeyGuard
from server.core.database import StoreBusy
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
from server.core.metrics import UNMATCHED, method_label
from server.core.settings import Settings
from server.jobs.lock import StorageLock
from server.service import SegmentationService

log = logging.getLogger(__name__)
access_log = logging.getLogger("ctseg.access")
JOB_ID = re.compile(r"[0-9a-f]{32}")


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
    # The last added runs first: the key guard, then the access log and metrics, then the body's limits.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_mb * 1024 * 1024)
    app.add_middleware(BodyDeadlines, idle_s=settings.upload_idle_timeout_s,
                       min_bytes_s=settings.upload_min_kib_s * 1024, grace_s=settings.upload_rate_grace_s)
    record = _recorder(app)
    app.add_middleware(RequestObserver, record=record)
    open_paths = PROBES | ({"/metrics"} if settings.metrics_public else set())
    app.add_middleware(ApiKeyGuard, keys=settings.api_keys, open_paths=frozenset(open_paths),  # outermost
                       on_refused=lambda scope, status: record(scope, status, 0.0))

    for exc_type in (InputError, NotFound, PayloadTooLarge, ServiceUnavailable, BadGateway, InsufficientStorage):
        app.add_exception_handler(exc_type, _error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(Exception, _internal_handler)
    return app


class RequestObserver:
    """ASGI middleware: per request, one access-log line and the request metrics. Both name the route template,
    never the path or its query string (``?series_uid=``, a UID or a file name typed into a path), so the access
    log carries no patient data; uvicorn's own access log is off (``ctseg serve``)."""

    def __init__(self, app, record: Callable[[dict, int, float], None]) -> None:  # type: ignore[no-untyped-def]
        self.app, self.record = app, record

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 0  # 0: no answer (the client went away)

        async def watching_send(message):  # type: ignore[no-untyped-def]
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:
            status = status or 500  # what the server error middleware outside answers
            raise
        finally:
            self.record(scope, status, time.perf_counter() - start)


def _recorder(app: FastAPI) -> Callable[[dict, int, float], None]:
    def record(scope: dict, status: int, seconds: float) -> None:
        template = getattr(scope.get("route"), "path", None)
        job_id = scope.get("path_params", {}).get("job_id", "")
        where = template or UNMATCHED
        if template and JOB_ID.fullmatch(job_id):  # a job id is ours, not patient data: it traces a request
            where = where.replace("{job_id}", job_id)
        client = scope.get("client") or ("-", 0)
        access_log.info("%s %s %s %d %.0f ms", client[0], method_label(scope["method"]), where, status, seconds * 1000)
        service = getattr(app.state, "service", None)
        if service is not None:
            service.metrics.observe_request(scope["method"], template, status, seconds)

    return record


def _where(request: Request) -> str:
    """The route template, as the access log names it: never the raw path (a UID or a name typed into it)."""
    return getattr(request.scope.get("route"), "path", None) or UNMATCHED


async def _internal_handler(request: Request, exc: Exception) -> JSONResponse:
    if storage_full(exc):  # wherever it happened (a record, a file): the same 507, never a 500
        log.error("storage full on %s %s", method_label(request.method), _where(request))
        return await _error_handler(request, InsufficientStorage(STORAGE_FULL))
    if isinstance(exc, StoreBusy):
        return await _error_handler(request, ServiceUnavailable("the job database is busy; retry later"))
    log.error("internal error on %s %s: %s", method_label(request.method), _where(request), type(exc).__name__,
              exc_info=exc)
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
