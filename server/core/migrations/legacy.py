"""Databases written before Alembic: ``schema_migrations`` held a version per component (jobs 1-2, arrivals 1-3),
or nothing at all in the first releases. :func:`bring_up` runs the steps those releases would have run, verbatim,
so any such database reaches the schema of revision 0001 (which is then stamped); its ``schema_migrations`` rows
are set to :data:`ADOPTED`, which a release before Alembic reads as "newer than this ctseg knows" and refuses,
rather than writing to a schema it does not know. SQLite only: PostgreSQL came with Alembic.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.core.database import SchemaTooNew

Step = Callable[[sqlite3.Connection], None]
ADOPTED = 1000


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _jobs_v1(db: sqlite3.Connection) -> None:
    """The schema of the first releases (their ad-hoc columns included)."""
    db.execute("""CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL, input_kind TEXT,
        params TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
        progress_done INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0,
        timings TEXT NOT NULL DEFAULT '{}', error TEXT, error_kind TEXT, notes TEXT NOT NULL DEFAULT '[]',
        outputs TEXT NOT NULL DEFAULT '[]')""")
    have = _columns(db, "jobs")
    for column, decl in (("origin", "TEXT"), ("staged", "TEXT"), ("destinations", "TEXT NOT NULL DEFAULT '[]'")):
        if column not in have:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)")
    db.execute("""CREATE TABLE IF NOT EXISTS deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created REAL NOT NULL, next_attempt REAL NOT NULL,
        delivered_at REAL, claimed_until REAL, UNIQUE (job_id, destination))""")
    db.execute("CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt)")


def _jobs_v2(db: sqlite3.Connection) -> None:
    """Typed job parameters instead of a JSON dict; claims; superseding; delivery claims by token, warnings."""
    for column, decl in (
        ("outputs_requested", "TEXT NOT NULL DEFAULT '[]'"), ("series_uid", "TEXT"),
        ("destination_choice", "TEXT NOT NULL DEFAULT 'default'"), ("attempt", "INTEGER NOT NULL DEFAULT 0"),
        ("lease_until", "REAL"), ("owner", "TEXT"), ("superseded_by", "TEXT"), ("supersedes", "TEXT"),
        ("seg_seed", "TEXT NOT NULL DEFAULT ''"),
    ):
        db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
    db.execute("""UPDATE jobs SET outputs_requested = COALESCE(json_extract(params, '$.outputs'), '[]'),
                  series_uid = json_extract(params, '$.series_uid'),
                  destination_choice = CASE WHEN json_extract(params, '$.destinations_named') THEN 'named'
                                            ELSE 'default' END,
                  seg_seed = id, params = '{}'""")
    for column in ("warning TEXT", "claim TEXT"):
        db.execute(f"ALTER TABLE deliveries ADD COLUMN {column}")
    db.execute("CREATE INDEX IF NOT EXISTS deliveries_destination ON deliveries(destination, state, next_attempt)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(state, lease_until)")


def _arrivals_v1(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE IF NOT EXISTS incoming (
        series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, calling_ae_title TEXT NOT NULL, modality TEXT NOT NULL,
        description TEXT NOT NULL, instances INTEGER NOT NULL, frames INTEGER NOT NULL, first_received REAL NOT NULL,
        last_received REAL NOT NULL, aborted INTEGER NOT NULL DEFAULT 0)""")


def _arrivals_v2(db: sqlite3.Connection) -> None:
    for column in ("routed_instances INTEGER NOT NULL DEFAULT 0", "job_id TEXT", "staging_job TEXT",
                   "staging_instances INTEGER", "routed_at REAL", "cut_off_at REAL"):
        db.execute(f"ALTER TABLE incoming ADD COLUMN {column}")
    db.execute("""CREATE TABLE associations (
        id TEXT PRIMARY KEY, calling_ae_title TEXT NOT NULL, state TEXT NOT NULL, opened REAL NOT NULL, closed REAL)""")
    db.execute("""CREATE TABLE arrival_instances (
        series_uid TEXT NOT NULL, instance TEXT NOT NULL, association_id TEXT NOT NULL, frames INTEGER NOT NULL,
        received REAL NOT NULL, PRIMARY KEY (series_uid, instance))""")
    db.execute("CREATE INDEX arrival_instances_association ON arrival_instances(association_id)")
    db.execute("CREATE INDEX associations_state ON associations(state)")


def _arrivals_v3(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE incoming ADD COLUMN sender TEXT")


STEPS: dict[str, tuple[Step, ...]] = {"jobs": (_jobs_v1, _jobs_v2), "arrivals": (_arrivals_v1, _arrivals_v2, _arrivals_v3)}


def present(conn: Connection) -> bool:
    """A database with tables but no Alembic revision: written by a release before Alembic."""
    if conn.dialect.name != "sqlite":
        return False
    tables = set(sa.inspect(conn).get_table_names())
    return bool(tables & {"jobs", "incoming", "schema_migrations"})


def bring_up(conn: Connection) -> None:
    """Inside the caller's transaction (the raw sqlite3 connection shares it)."""
    db: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    versions = dict(db.execute("SELECT component, version FROM schema_migrations").fetchall())
    for component, steps in STEPS.items():
        version = versions.get(component, 0)
        if version > len(steps):
            raise SchemaTooNew(f"the database's {component} schema is version {version}, newer than this ctseg "
                               f"knows ({len(steps)}): run the newer ctseg, or restore a backup")
        for step in steps[version:]:
            step(db)
        db.execute("INSERT INTO schema_migrations (component, version) VALUES (?, ?) ON CONFLICT(component) "
                   "DO UPDATE SET version = excluded.version", (component, ADOPTED))


def refuse_old_releases(conn: Connection) -> None:
    """Mark any SQLite database this ctseg migrates (adopted or new) as newer than a release before Alembic knows,
    so that one refuses it with a sentence instead of re-running its ALTERs on it (an adopted database has its
    rows from :func:`bring_up` already)."""
    db: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone()
    if exists:
        return  # bring_up reads and then replaces its rows
    db.execute("CREATE TABLE schema_migrations (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    db.executemany("INSERT INTO schema_migrations VALUES (?, ?)", [(c, ADOPTED) for c in STEPS])
