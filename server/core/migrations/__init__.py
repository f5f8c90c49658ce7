"""The job database's schema history (Alembic), for SQLite and PostgreSQL alike.

:func:`upgrade` is what ``Database.upgrade`` and ``ctseg db upgrade`` run: in one transaction that holds the
database's write lock (SQLite) or an advisory lock (PostgreSQL), so two processes starting at once apply each
revision once. A database a newer ctseg migrated is refused with :class:`SchemaTooNew`, never written to.
A revision is a new file in ``versions/`` (``down_revision`` the previous head); never an ad-hoc ``ALTER TABLE``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from server.core.migrations import legacy

if TYPE_CHECKING:
    from server.core.database import Database

log = logging.getLogger(__name__)
BASELINE = "0001"  # the schema of the last release before Alembic (jobs v2, arrivals v3)


def config() -> Config:
    from server.core.database import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head() or BASELINE


def upgrade(db: Database) -> str:
    from server.core.database import _UPGRADE_LOCK, SchemaTooNew

    cfg = config()
    script = ScriptDirectory.from_config(cfg)
    target = script.get_current_head()
    with db.engine.connect() as conn, conn.begin():  # SQLite: BEGIN IMMEDIATE (server/core/database.py)
        if db.postgres:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
        current = MigrationContext.configure(conn).get_current_revision()
        if current == target:
            return target
        if current is not None and current not in {r.revision for r in script.walk_revisions()}:
            raise SchemaTooNew(f"the database's schema is revision {current}, newer than this ctseg knows "
                               f"(head {target}): run the newer ctseg, or restore a backup")
        cfg.attributes["connection"] = conn
        if current is None and legacy.present(conn):
            legacy.bring_up(conn)  # the steps that release would have run, then recorded as the baseline
            command.stamp(cfg, BASELINE)
            log.info("database from a release before Alembic adopted at revision %s", BASELINE)
        command.upgrade(cfg, "head")
        if db.dialect == "sqlite":
            legacy.refuse_old_releases(conn)  # a release before Alembic refuses this file rather than alter it
        log.info("database schema at revision %s", target)
    return target
