"""``ctseg db upgrade|current``: the job database's schema, for a cluster's one-off migration job (``ctseg serve``
applies it too, at start)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="the job database (CTSEG_DATABASE_URL, else SQLite in the storage folder)")
    p.add_argument("action", choices=("upgrade", "current"), help="upgrade: apply the migrations not yet applied; "
                   "current: print the schema revision and the one this ctseg expects")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    from server.core.database import DatabaseUnavailable, open_checked
    from server.core.migrations import head
    from server.core.settings import Settings

    log = logging.getLogger("ctseg.db")
    try:
        settings = Settings()
        db = open_checked(settings, migrate=args.action == "upgrade")
    except (DatabaseUnavailable, ValidationError) as err:
        log.error("%s", err)
        return 2
    try:
        current = db.revision()
    finally:
        db.dispose()
    print(f"database {db.safe_url}: revision {current} (this ctseg: {head()})")  # the command's output
    return 0 if current == head() or args.action == "current" else 1
