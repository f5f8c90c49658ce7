"""The job database, embedded or shared: one way to open it (SQLAlchemy 2 Core), one schema history (Alembic),
one rule for what is retried.

``CTSEG_DATABASE_URL`` unset: SQLite in ``<storage>/jobs.sqlite3`` (WAL, ``synchronous=FULL``, every write
transaction ``BEGIN IMMEDIATE`` so a writer takes the lock before it reads what it will change). A
``postgresql://`` URL: the shared store of several machines (psycopg 3), with a pre-ping on every pooled
connection so a database that restarted or failed over costs a retry, not an error.

Both take their schema from the same Alembic revisions (server/core/migrations/), applied at open (idempotent:
one query when at head) or by ``ctseg db upgrade``; concurrent upgraders queue on SQLite's write lock or on a
PostgreSQL advisory lock. A database written by a release before Alembic (its ``schema_migrations`` rows) is
brought to that release's last schema by the same steps it would have run (server/core/migrations/legacy.py)
and stamped.

What is retried (:func:`retry`): a lock held by another connection past the busy timeout (SQLite ``database is
locked``, PostgreSQL ``lock_not_available``), a serialization failure or deadlock, and a connection that broke.
Each is transient; turning it into a failed job would lose a finished result. Anything else is raised.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from server.core import sqlite

if TYPE_CHECKING:
    from server.core.settings import Settings

log = logging.getLogger(__name__)
# Alembic narrates each plugin and context at INFO (from its import on); what was applied is logged once by
# server/core/migrations.
logging.getLogger("alembic").setLevel(logging.WARNING)
T = TypeVar("T")

DB_NAME = "jobs.sqlite3"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# PostgreSQL SQLSTATEs that mean "try again": lock_not_available, serialization_failure, deadlock_detected,
# and the connection exception class (08xxx) and admin shutdown (57P01) of a restart or failover.
# read_only_sql_transaction (25006): a write that reached a standby during a failover.
_TRANSIENT_SQLSTATES = {"55P03", "40001", "40P01", "57P01", "57P02", "57P03", "25006"}
# A connection refused for what it asked, not for the moment: retrying would only hide the mistake for minutes.
_FATAL_CONNECT = ("does not exist", "authentication failed", "password", "no pg_hba.conf entry", "permission denied")
_UPGRADE_LOCK = 0x63747365  # "ctse": the advisory lock concurrent upgraders of one PostgreSQL database queue on


class StoreBusy(RuntimeError):
    """The database stayed locked (or unreachable) for longer than the retries allow."""


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer ctseg than this one."""


class DatabaseUnavailable(RuntimeError):
    """The database cannot be used: unreachable, refused our credentials, too new, or its driver is missing."""


def embedded_url(storage: Path) -> str:
    return f"sqlite:///{Path(storage) / DB_NAME}"


def redacted(url: str) -> str:
    """The URL without its password (in the user part or the query string), for logs and errors."""
    try:
        parsed = sa.make_url(url)
        query = {k: ("***" if any(w in k.lower() for w in ("password", "secret", "token", "key")) else v)
                 for k, v in parsed.query.items()}
        return parsed.set(query=query).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL that does not parse is not echoed at all
        return "<database URL>"


class Database:
    """An engine and the dialect's rules for it. One per process (a worker process opens its own)."""

    def __init__(self, url: str, busy_timeout_s: float = 10.0, patience_s: float = 300.0,
                 read_patience_s: float | None = None) -> None:
        self.url = url
        self.busy_timeout_s, self.patience_s = busy_timeout_s, patience_s
        # reads for a waiting client (the API: a 503 it can retry, not a request hung for minutes)
        self.read_patience_s = min(patience_s, read_patience_s) if read_patience_s is not None else patience_s
        parsed = sa.make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # A pool of a few connections reused by threads; more are made when needed and closed when returned.
            self.engine = sa.create_engine(url, pool_size=8, max_overflow=-1, connect_args={
                "check_same_thread": False, "timeout": busy_timeout_s, "isolation_level": None})
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        elif self.dialect == "postgresql":
            if parsed.drivername in ("postgresql", "postgres"):
                parsed = parsed.set(drivername="postgresql+psycopg")
            # target_session_attrs: after a failover, connect to the new primary, never to a standby
            self.engine = sa.create_engine(parsed, pool_size=5, max_overflow=60, pool_pre_ping=True, pool_timeout=10,
                                           connect_args={"connect_timeout": max(1, int(busy_timeout_s)),
                                                         "target_session_attrs": "read-write"})
        else:
            raise ValueError(f"CTSEG_DATABASE_URL must be sqlite:///... or postgresql://..., not {self.dialect}://")

    @classmethod
    def embedded(cls, storage: Path, busy_timeout_s: float = 10.0, patience_s: float = 300.0) -> Database:
        return cls(embedded_url(storage), busy_timeout_s, patience_s)

    @classmethod
    def from_settings(cls, settings: Settings, read_patience_s: float | None = None) -> Database:
        url = settings.database_url.get_secret_value() if settings.database_url else embedded_url(settings.storage_dir)
        return cls(url, settings.db_busy_timeout_s, settings.db_patience_s, read_patience_s)

    @property
    def safe_url(self) -> str:
        return redacted(self.url)

    @property
    def postgres(self) -> bool:
        return self.dialect == "postgresql"

    def dispose(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------------ running
    @contextmanager
    def transaction(self, short: bool = False, read: bool = False) -> Iterator[Connection]:
        """One transaction. ``short``: wait at most ~50 ms for another connection's lock (a heartbeat, a progress
        report: repeated anyway, and never to hold up the inference that makes them). ``read``: it only reads
        (on SQLite a deferred BEGIN, which never waits for a writer in WAL mode)."""
        with self.engine.connect() as conn:
            if read:
                conn.execution_options(ctseg_read=True)
            raw = conn.connection.driver_connection if short and not self.postgres else None
            if raw is not None:
                raw.execute("PRAGMA busy_timeout = 50")  # before BEGIN IMMEDIATE, which is what waits
            try:
                with conn.begin():
                    if short and self.postgres:
                        conn.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
                    yield conn
            finally:
                if raw is not None:
                    raw.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")

    def run(self, what: str, fn: Callable[[Connection], T], patience_s: float | None = None) -> T:
        """``fn`` in one write transaction, retried while the database is busy; ``patience_s`` 0: one short try."""
        def once() -> T:
            with self.transaction(short=patience_s == 0) as conn:
                return fn(conn)
        return retry(once, self.patience_s if patience_s is None else patience_s, what)

    def read(self, what: str, fn: Callable[[Connection], T]) -> T:
        """``fn`` in one transaction that only reads, retried like a write (SQLite: one snapshot; PostgreSQL at
        READ COMMITTED: each statement sees what was committed when it began)."""
        def once() -> T:
            with self.transaction(read=True) as conn:
                return fn(conn)
        return retry(once, self.read_patience_s, what)

    # ------------------------------------------------------------------------------------------------ schema
    def upgrade(self) -> str:
        """Apply the revisions not yet applied (all of them on a new database); returns the revision at head."""
        from server.core.migrations import (
            upgrade,  # Alembic only where the schema is touched
        )

        return retry(lambda: upgrade(self), self.patience_s, "migrate the database schema")

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()


def _sqlite_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    sqlite.pragmas(dbapi_conn)


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("ctseg_read") else "BEGIN IMMEDIATE")


def is_transient(err: BaseException) -> bool:
    """Busy, locked, a serialization failure, a deadlock, a broken connection or every pooled connection in use:
    worth another try. A connection refused for its database, role or password is not."""
    if isinstance(err, sa.exc.TimeoutError):  # the pool's: all connections busy (a slow database, a burst)
        return True
    if isinstance(err, sa.exc.DBAPIError):
        if err.connection_invalidated:
            return True
        err = err.orig or err
    if isinstance(err, sqlite3.OperationalError):
        text = str(err).lower()
        return "locked" in text or "busy" in text
    sqlstate = getattr(err, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")
    # psycopg's OperationalError without a SQLSTATE: the server could not be reached (refused, reset, restarting),
    # unless it answered and refused who we are
    if type(err).__module__.startswith("psycopg") and type(err).__name__ == "OperationalError":
        return not any(word in str(err).lower() for word in _FATAL_CONNECT)
    return False


def retry(fn: Callable[[], T], patience_s: float, what: str) -> T:
    """``fn()``, retried while the database is busy (:func:`is_transient`) for up to ``patience_s``."""
    deadline = time.monotonic() + patience_s
    delay = 0.05
    warned = False
    while True:
        try:
            return fn()
        except (sa.exc.DBAPIError, sa.exc.TimeoutError, sqlite3.OperationalError) as err:
            if not is_transient(err):
                raise
            if time.monotonic() + delay > deadline:
                raise StoreBusy(f"the job database stayed busy for {patience_s:.0f} s ({what})") from err
            if not warned:
                log.warning("the job database is busy (%s): %s; retrying", what, type(getattr(err, "orig", err)).__name__)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def open_checked(settings: Settings, migrate: bool = True) -> Database:
    """The settings' database, reachable and (``migrate``) at this ctseg's schema: at start, so a wrong URL, a
    password refused or a schema too new is one line naming the database (never its password), not a traceback."""
    try:
        db = Database.from_settings(settings)
    except ModuleNotFoundError as err:
        raise DatabaseUnavailable(f"the database driver {err.name} is not installed (pip install 'ctseg[postgres]')") \
            from err
    except (ValueError, sa.exc.ArgumentError) as err:
        raise DatabaseUnavailable(str(err)) from err
    try:
        if migrate:
            db.upgrade()
        else:
            db.revision()
    except SchemaTooNew as err:
        db.dispose()
        raise DatabaseUnavailable(f"database {db.safe_url}: {err}") from err
    except (StoreBusy, sa.exc.SQLAlchemyError) as err:
        db.dispose()
        cause: BaseException = err
        while getattr(cause, "orig", None) is not None or (isinstance(cause, StoreBusy) and cause.__cause__):
            cause = getattr(cause, "orig", None) or cause.__cause__  # type: ignore[assignment]
        raise DatabaseUnavailable(f"database {db.safe_url} cannot be used: {type(cause).__name__}: "
                                  f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}") from err
    return db


class DatabaseInUse(RuntimeError):
    """Another single-box ctseg (CTSEG_ROLE=all) already uses this PostgreSQL database."""


class SingleBoxLock:
    """A single box (``CTSEG_ROLE=all``) on PostgreSQL recovers what it finds at start as its own: the database is
    its alone, like its storage folder. A session advisory lock on a connection held for the process's life says
    so (the server releases it when the process dies, however it dies); a second one is refused."""

    KEY = 0x63746231  # "ctb1"

    def __init__(self, db: Database) -> None:
        self._conn = db.engine.connect()
        got = self._conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": self.KEY}).scalar()
        self._conn.commit()
        if not got:
            self._conn.close()
            raise DatabaseInUse(f"database {db.safe_url} is in use by another single-box ctseg (CTSEG_ROLE=all); "
                                "run replicas with CTSEG_ROLE=api|dicom|worker, or give this one its own database")

    def release(self) -> None:
        self._conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": self.KEY})
        self._conn.commit()
        self._conn.close()
