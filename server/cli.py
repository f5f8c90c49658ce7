"""``ctseg serve``: run the service with uvicorn."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the inference service (REST)")
    p.add_argument("--host", help="listen address (CTSEG_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (CTSEG_PORT, default 8000)")
    p.add_argument("--bundles", type=Path, nargs="+", help="bundle directories (CTSEG_BUNDLE_DIRS)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn
    from pydantic import ValidationError

    from models import logs
    from models.backends import EngineUnavailable
    from models.bundle import BundleError
    from server.app import create_app
    from server.core.database import (
        DatabaseInUse,
        DatabaseUnavailable,
        SingleBoxLock,
        open_checked,
    )
    from server.core.settings import Settings
    from server.dicomnode.listener import UnsupportedPynetdicom, check_pynetdicom
    from server.inference.engine import discover_bundles, engines_from_settings
    from server.jobs.lock import StorageLock, StorageLocked

    log = logging.getLogger("ctseg.serve")
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("bundle_dirs", args.bundles)) if v}
    try:
        settings = Settings(**overrides)
        found = discover_bundles(settings.bundle_dirs)
        if not found:
            raise BundleError(f"no model bundle found in {', '.join(map(str, settings.bundle_dirs))} (CTSEG_BUNDLE_DIRS)")
        # checksums, manifests, engine and precision: before the server binds its port
        engines_from_settings(settings)
        if settings.dicom_port is not None:
            check_pynetdicom()  # the listener's receive-to-disk needs the pynetdicom it was written for
        # one service per storage folder; replicas share theirs and coordinate through the database
        lock = None if settings.replicated else StorageLock(settings.storage_dir).acquire()
        db = open_checked(settings)  # reachable, our credentials taken, migrated to this ctseg's schema
        # a single box on PostgreSQL owns the database as it owns its folder (held until the process ends)
        single_box = SingleBoxLock(db) if db.postgres and not settings.replicated else None
    except (BundleError, EngineUnavailable, StorageLocked, ValidationError, ValueError, UnsupportedPynetdicom,
            DatabaseUnavailable, DatabaseInUse) as err:
        log.error("%s", err)
        return 2
    # every log line through the redacting formatter (models/logs.py), uvicorn's own included (no log_config)
    logs.install(settings.log_level.upper(), messages=settings.log_exception_messages)
    if settings.role == "worker":  # one inference worker: no HTTP, no DICOM; jobs from the shared queue
        from server.jobs.shared_queue import run_worker

        return run_worker(settings)
    # uvicorn's access log prints the path with its query string (``?series_uid=``): the app writes its own
    # (server/app.py RequestObserver), by route template.
    logging.getLogger("ctseg.access").setLevel(settings.log_level.upper())
    try:
        uvicorn.run(create_app(settings, lock=lock), host=settings.host, port=settings.port,
                    log_level=settings.log_level.lower(), access_log=False, log_config=None)
    finally:
        if single_box is not None:
            single_box.release()
        db.dispose()
    return 0
