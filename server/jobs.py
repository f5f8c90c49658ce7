"""The job store: job records, the delivery outbox, results on disk. Nothing vanishes on a crash.

A job is ``staging`` (its input is arriving) -> ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` |
``cancelled``. Records live in ``<storage>/jobs.sqlite3`` (WAL), files in ``<storage>/jobs/<id>/``.

The outbox lives in the same database on purpose: a job's success and the deliveries of its SEG are written in
one transaction, so a crash can never leave a succeeded job whose SEG nobody will send, nor a delivery of a SEG
that was never finished. A delivery is ``pending`` until a destination acknowledged it (``delivered``) or it was
given up (``failed``); attempts, the last error and the next attempt's time are kept with it.

On start-up (:meth:`JobStore.recover`): jobs still ``staging`` are failed (their input was cut off; it is
removed), ``running`` jobs are failed with the reason, ``queued`` jobs are queued again, and pending deliveries
simply go on. Retention never removes a job whose SEG is still to be delivered.

This class is the one interface to that state; a shared store for several machines replaces it whole.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from server.job_input import Origin, StagedInput
from server.vocabulary import DeliveryState, ErrorKind, InputKind


class JobState(str, Enum):
    STAGING = "staging"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ACTIVE_STATES = (JobState.STAGING, JobState.QUEUED, JobState.RUNNING)


@dataclass
class Delivery:
    """One SEG to one destination."""

    id: int
    job_id: str
    destination: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    created: float
    next_attempt: float
    delivered_at: float | None


@dataclass
class Job:
    id: str
    state: JobState
    model: str
    input_kind: InputKind | None  # known once staged
    params: dict[str, Any]  # what was asked: outputs, series_uid
    created: float
    updated: float
    progress_done: int = 0
    progress_total: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_kind: ErrorKind | None = None
    notes: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    origin: Origin | None = None
    staged: StagedInput | None = None
    destinations: list[str] = field(default_factory=list)

    @property
    def outputs_requested(self) -> list[str]:
        return list(self.params.get("outputs", []))


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL, input_kind TEXT,
    params TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    progress_done INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0,
    timings TEXT NOT NULL DEFAULT '{}', error TEXT, error_kind TEXT, notes TEXT NOT NULL DEFAULT '[]',
    outputs TEXT NOT NULL DEFAULT '[]', origin TEXT, staged TEXT, destinations TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created REAL NOT NULL, next_attempt REAL NOT NULL,
    delivered_at REAL, claimed_until REAL, UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt);
"""
# Columns added after the first release, for stores written by it.
MIGRATIONS = {"origin": "TEXT", "staged": "TEXT", "destinations": "TEXT NOT NULL DEFAULT '[]'"}
JSON_COLUMNS = ("timings", "notes", "outputs", "params", "destinations")
UPDATABLE = {"state", "input_kind", "params", "progress_done", "progress_total", "timings", "error", "error_kind",
             "notes", "outputs", "origin", "staged", "destinations"}


def _encode(key: str, value: Any) -> Any:
    if key in JSON_COLUMNS:
        return json.dumps(value)
    if key in ("origin", "staged"):
        return None if value is None else json.dumps(value.to_dict())
    return value.value if isinstance(value, Enum) else value


class JobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged record survives a power cut
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, decl in MIGRATIONS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    # ------------------------------------------------------------------------------------------------ jobs
    def create(self, model: str, params: dict[str, Any], origin: Origin, destinations: list[str],
               state: JobState = JobState.STAGING) -> Job:
        now = time.time()
        job = Job(uuid.uuid4().hex, state, model, None, params, now, now, origin=origin,
                  destinations=list(destinations))
        self.job_dir(job.id).mkdir(parents=True)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, state, model, params, created, updated, origin, destinations) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job.id, state.value, model, json.dumps(params), now, now, _encode("origin", origin),
                 json.dumps(job.destinations)),
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            cursor = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
            row = cursor.fetchone()
            cols = [d[0] for d in cursor.description]
        return self._row(dict(zip(cols, row))) if row else None

    def list(self, limit: int = 50, state: JobState | None = None, before: float | None = None) -> list[Job]:
        """Newest first; ``before``: only jobs created before that time (paging)."""
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if state is not None:
            query += " AND state = ?"
            args.append(state.value)
        if before is not None:
            query += " AND created < ?"
            args.append(before)
        with self._lock:
            cursor = self._db.execute(query + " ORDER BY created DESC LIMIT ?", (*args, limit))
            rows = cursor.fetchall()
            cols = [d[0] for d in cursor.description]
        return [self._row(dict(zip(cols, r))) for r in rows]

    @staticmethod
    def _row(r: dict[str, Any]) -> Job:
        return Job(
            r["id"], JobState(r["state"]), r["model"], InputKind(r["input_kind"]) if r["input_kind"] else None,
            json.loads(r["params"]), r["created"], r["updated"], r["progress_done"], r["progress_total"],
            json.loads(r["timings"]), r["error"], ErrorKind(r["error_kind"]) if r["error_kind"] else None,
            json.loads(r["notes"]), json.loads(r["outputs"]),
            Origin.from_dict(json.loads(r["origin"])) if r["origin"] else None,
            StagedInput.from_dict(json.loads(r["staged"])) if r["staged"] else None,
            json.loads(r["destinations"] or "[]"),
        )

    def update(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - UPDATABLE
        if unknown:  # column names go into the SQL text: only the schema's own
            raise ValueError(f"not job columns: {sorted(unknown)}")
        encoded = {k: _encode(k, v) for k, v in fields.items()}
        encoded["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in encoded)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*encoded.values(), job_id))  # noqa: S608

    def staged(self, job_id: str, staged: StagedInput) -> None:
        """Staging is complete: the job records its input and is ready to be queued."""
        self.update(job_id, staged=staged, input_kind=staged.kind, state=JobState.QUEUED)

    def fail(self, job_id: str, kind: ErrorKind, error: str) -> None:
        self.update(job_id, state=JobState.FAILED, error_kind=kind, error=error)

    def succeed(self, job_id: str, timings: dict[str, float], notes: list[str], outputs: list[str],
                deliver_to: list[str]) -> bool:
        """The job's success and its SEG's deliveries, in one transaction. False if the job was deleted."""
        now = time.time()
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET state = ?, timings = ?, notes = ?, outputs = ?, updated = ? WHERE id = ?",
                (JobState.SUCCEEDED.value, json.dumps(timings), json.dumps(notes), json.dumps(outputs), now, job_id),
            ).rowcount
            if changed:
                db.executemany(
                    "INSERT OR IGNORE INTO deliveries (job_id, destination, state, created, next_attempt) "
                    "VALUES (?,?,?,?,?)",
                    [(job_id, name, DeliveryState.PENDING.value, now, now) for name in deliver_to],
                )
        return bool(changed)

    def ids_in_state(self, *states: JobState) -> list[str]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created",  # noqa: S608
                                    [s.value for s in states]).fetchall()
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s.value: 0 for s in JobState} | {state: n for state, n in rows}

    def active(self) -> int:
        counts = self.counts()
        return sum(counts[s.value] for s in ACTIVE_STATES)

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        with self._transaction() as db:
            db.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def expired(self, older_than_s: float) -> list[str]:
        """Finished jobs past retention, except those whose SEG still waits for a destination."""
        cutoff = time.time() - older_than_s
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE updated < ? AND state IN (?,?,?) AND NOT EXISTS "
                "(SELECT 1 FROM deliveries d WHERE d.job_id = jobs.id AND d.state = ?)",
                (cutoff, JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value,
                 DeliveryState.PENDING.value),
            ).fetchall()
        return [r[0] for r in rows]

    def recover(self) -> tuple[list[str], list[str]]:
        """After a restart: cut-off staging and running jobs failed (with the reason), queued jobs returned."""
        cut_off = self.ids_in_state(JobState.STAGING)
        for job_id in cut_off:
            self.fail(job_id, ErrorKind.INTERRUPTED,
                      "interrupted: the service stopped while this job's input was arriving; send it again")
            shutil.rmtree(self.job_dir(job_id) / "input", ignore_errors=True)
        interrupted = self.ids_in_state(JobState.RUNNING)
        for job_id in interrupted:
            self.fail(job_id, ErrorKind.INTERRUPTED, "interrupted: the service stopped while this job ran; submit it again")
            shutil.rmtree(self.job_dir(job_id) / "input", ignore_errors=True)
        with self._lock:  # claims of a process that is gone
            self._db.execute("UPDATE deliveries SET claimed_until = NULL WHERE state = ?", (DeliveryState.PENDING.value,))
        return self.ids_in_state(JobState.QUEUED), cut_off + interrupted

    # ------------------------------------------------------------------------------------------------ outbox
    @staticmethod
    def _delivery(row: tuple) -> Delivery:
        i, job_id, dest, state, attempts, err, created, next_attempt, delivered_at = row
        return Delivery(i, job_id, dest, DeliveryState(state), attempts, err, created, next_attempt, delivered_at)

    _DELIVERY_COLUMNS = "id, job_id, destination, state, attempts, last_error, created, next_attempt, delivered_at"

    def deliveries(self, job_id: str) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ? ORDER BY id",  # noqa: S608
                                    (job_id,)).fetchall()
        return [self._delivery(r) for r in rows]

    def claim_due(self, now: float, lease_s: float, limit: int = 16) -> list[Delivery]:
        """Pending deliveries whose time has come, claimed for ``lease_s`` so no other sender takes them."""
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {self._DELIVERY_COLUMNS} FROM deliveries WHERE state = ? AND next_attempt <= ? "  # noqa: S608
                "AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY next_attempt LIMIT ?",
                (DeliveryState.PENDING.value, now, now, limit),
            ).fetchall()
            db.executemany("UPDATE deliveries SET claimed_until = ? WHERE id = ?", [(now + lease_s, r[0]) for r in rows])
        return [self._delivery(r) for r in rows]

    def next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_attempt) FROM deliveries WHERE state = ?",
                                   (DeliveryState.PENDING.value,)).fetchone()
        return row[0]

    def delivery_done(self, delivery_id: int, state: DeliveryState, error: str | None = None,
                      next_attempt: float | None = None) -> None:
        """Record one attempt: delivered, failed for good, or pending again until ``next_attempt``."""
        now = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, claimed_until = NULL, "
                "next_attempt = COALESCE(?, next_attempt), delivered_at = ? WHERE id = ?",
                (state.value, error, next_attempt, now if state == DeliveryState.DELIVERED else None, delivery_id),
            )

    def expedite(self, destination: str, now: float) -> int:
        """A destination just acknowledged a SEG: its other pending deliveries are due now, not at their back-off."""
        with self._lock:
            return self._db.execute(
                "UPDATE deliveries SET next_attempt = ? WHERE destination = ? AND state = ? AND next_attempt > ?",
                (now, destination, DeliveryState.PENDING.value, now),
            ).rowcount

    def outbox_stats(self) -> tuple[dict[tuple[str, str], int], float | None]:
        """Deliveries by (destination, state), and the creation time of the oldest pending one."""
        with self._lock:
            rows = self._db.execute("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state").fetchall()
            oldest = self._db.execute("SELECT MIN(created) FROM deliveries WHERE state = ?",
                                      (DeliveryState.PENDING.value,)).fetchone()[0]
        return {(d, s): n for d, s, n in rows}, oldest
