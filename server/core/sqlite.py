"""SQLite for the embedded stores: one way to open a database, versioned migrations, and retries of a busy lock.

Each store (jobs and outbox, received series) owns a *component* of the database and a list of migrations; the
applied version of each component is a row of ``schema_migrations``, and pending migrations run in one
transaction at open. A schema change is a new entry at the end of a list, never an ad-hoc ``ALTER TABLE`` at
start-up.

``database is locked`` is SQLite saying another connection holds the write lock past the busy timeout: a
transient condition. :func:`retry_busy` retries it with back-off instead of letting it turn a finished job into a
failed one.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

Migration = Callable[[sqlite3.Connection], None]


class StoreBusy(RuntimeError):
    """The database stayed locked by another connection for longer than the retries allow."""


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # an acknowledged record survives a power cut
    db.execute("PRAGMA foreign_keys=ON")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT; on any error (a failed COMMIT included) the transaction is rolled back if SQLite
    has not done so itself (it has, on SQLITE_FULL), so the connection is never left inside one."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


@contextmanager
def busy_timeout(db: sqlite3.Connection, seconds: float, restore_s: float) -> Iterator[None]:
    """A shorter wait for another connection's lock, for writes that are repeated anyway (leases, progress)."""
    db.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
    try:
        yield
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(restore_s * 1000)}")


def migrate(db: sqlite3.Connection, component: str, migrations: Sequence[Migration], patience_s: float = 300.0) -> int:
    """Apply the migrations of ``component`` not yet applied, in order, in one transaction; returns the version.
    Retried while another connection holds the lock (a worker starting while the service writes)."""
    return retry_busy(lambda: _migrate(db, component, migrations), patience_s, f"open the {component} schema")


def _migrate(db: sqlite3.Connection, component: str, migrations: Sequence[Migration]) -> int:
    with transaction(db):
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_migrations WHERE component = ?", (component,)).fetchone()
        version = row[0] if row else 0
        if version > len(migrations):
            raise RuntimeError(f"the database's {component} schema is version {version}, newer than this ctseg "
                               f"knows ({len(migrations)}): run the newer ctseg, or restore a backup")
        for number, step in enumerate(migrations[version:], start=version + 1):
            step(db)
            log.info("database %s schema migrated to version %d", component, number)
        db.execute("INSERT INTO schema_migrations (component, version) VALUES (?, ?) ON CONFLICT(component) "
                   "DO UPDATE SET version = excluded.version", (component, len(migrations)))
    return len(migrations)


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def is_busy(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def retry_busy(fn: Callable[[], T], patience_s: float, what: str) -> T:
    """``fn()``, retried while the database is locked by another connection, for up to ``patience_s``."""
    deadline = time.monotonic() + patience_s
    delay = 0.05
    warned = False
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as err:
            if not is_busy(err):
                raise
            if time.monotonic() + delay > deadline:
                raise StoreBusy(f"the job database stayed locked for {patience_s:.0f} s ({what})") from err
            if not warned:
                log.warning("the job database is locked by another connection (%s); retrying", what)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
