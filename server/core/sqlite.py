"""Raw SQLite connections for the arrival buffer (server/dicomnode/arrivals.py), which holds one connection and
serialises its writers itself. The schema and what is retried are server/core/database.py's (one history, one
rule): this module only opens a connection the same way and runs ``BEGIN IMMEDIATE`` transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def pragmas(db: sqlite3.Connection) -> None:
    """Every connection to a ctseg database, raw or through SQLAlchemy."""
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # an acknowledged record survives a power cut
    db.execute("PRAGMA foreign_keys=ON")


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)
    pragmas(db)
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
