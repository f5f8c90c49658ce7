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

    from models.bundle import BundleError
    from server.app import create_app
    from models.backends import EngineUnavailable
    from server.engine import discover_bundles, engines_from_settings
    from server.settings import Settings

    log = logging.getLogger("ctseg.serve")
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("bundle_dirs", args.bundles)) if v}
    try:
        settings = Settings(**overrides)
        found = discover_bundles(settings.bundle_dirs)
        if not found:
            raise BundleError(f"no model bundle found in {', '.join(map(str, settings.bundle_dirs))} (CTSEG_BUNDLE_DIRS)")
        # checksums, manifests, engine and precision: before the server binds its port
        engines_from_settings(settings)
    except (BundleError, EngineUnavailable, ValidationError, ValueError) as err:
        log.error("%s", err)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0
