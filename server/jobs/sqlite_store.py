"""The embedded job store: job records and the delivery outbox in ``<storage>/jobs.sqlite3`` (WAL, FULL sync).

The outbox lives in the same database on purpose: a job's success and the deliveries of its SEG are written in
one transaction, so a crash can never leave a succeeded job whose SEG nobody will send, nor a delivery of a SEG
that was never finished. Every change is a compare-and-set (``WHERE state = ?``, and ``AND attempt = ?`` for a
worker's writes): a worker whose lease expired, an orphan of a killed service, or a second writer changes nothing.

Each thread has its own connection (WAL readers never wait for a writer); a write that meets another
connection's lock past the busy timeout is retried (server/core/sqlite.py) rather than failed. The schema is
versioned (``MIGRATIONS``); a database written by an earlier release is migrated at open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from server.core import sqlite
from server.core.vocabulary import (
    DeliveryState,
    DestinationChoice,
    ErrorKind,
    InputKind,
    Output,
    ResultFile,
)
from server.jobs.model import (
    Claim,
    Delivery,
    Job,
    JobResult,
    JobSpec,
    JobState,
    Origin,
    StagedInput,
)
from server.jobs.store import Requeued, Superseded

T = TypeVar("T")
COMPONENT = "jobs"
ONE_TRY_BUSY_S = 0.05
DB_NAME = "jobs.sqlite3"


def _v1_baseline(db: sqlite3.Connection) -> None:
    """The schema of the first releases (their ad-hoc columns included), so their databases carry on."""
    db.execute("""CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL, input_kind TEXT,
        params TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
        progress_done INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0,
        timings TEXT NOT NULL DEFAULT '{}', error TEXT, error_kind TEXT, notes TEXT NOT NULL DEFAULT '[]',
        outputs TEXT NOT NULL DEFAULT '[]')""")
    have = sqlite.columns(db, "jobs")
    for column, decl in (("origin", "TEXT"), ("staged", "TEXT"), ("destinations", "TEXT NOT NULL DEFAULT '[]'")):
        if column not in have:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)")
    db.execute("""CREATE TABLE IF NOT EXISTS deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created REAL NOT NULL, next_attempt REAL NOT NULL,
        delivered_at REAL, claimed_until REAL, UNIQUE (job_id, destination))""")
    db.execute("CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt)")


def _v2_job_core(db: sqlite3.Connection) -> None:
    """Typed job parameters instead of a JSON dict; claims (attempt, lease, owner); superseding; delivery claims
    by token and warnings."""
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


MIGRATIONS: tuple[sqlite.Migration, ...] = (_v1_baseline, _v2_job_core)

_JOB_COLUMNS = ("id, state, model, input_kind, created, updated, progress_done, progress_total, timings, error, "
                "error_kind, notes, outputs, origin, staged, destinations, outputs_requested, series_uid, "
                "destination_choice, attempt, lease_until, superseded_by, supersedes, seg_seed, params")
_DELIVERY_COLUMNS = ("id, job_id, destination, state, attempts, last_error, warning, created, next_attempt, "
                     "delivered_at, claim")
_RUNNING = JobState.RUNNING.value


def _params(spec: JobSpec) -> dict[str, str]:
    """Request options without a column of their own (``phase``), in the record's ``params`` JSON."""
    return {"phase": str(spec.phase)} if spec.phase is not None else {}


def _job(r: sqlite3.Row) -> Job:
    origin = Origin.from_dict(json.loads(r["origin"])) if r["origin"] else Origin("upload")
    spec = JobSpec(r["model"], tuple(Output(o) for o in json.loads(r["outputs_requested"] or "[]")) or (Output.NIFTI,),
                   r["series_uid"], tuple(json.loads(r["destinations"] or "[]")),
                   DestinationChoice(r["destination_choice"]), origin, json.loads(r["params"] or "{}").get("phase"))
    return Job(
        r["id"], JobState(r["state"]), spec, r["created"], r["updated"],
        InputKind(r["input_kind"]) if r["input_kind"] else None,
        StagedInput.from_dict(json.loads(r["staged"])) if r["staged"] else None,
        r["progress_done"], r["progress_total"], json.loads(r["timings"]), r["error"],
        ErrorKind(r["error_kind"]) if r["error_kind"] else None, json.loads(r["notes"]),
        tuple(ResultFile(o) for o in json.loads(r["outputs"])), r["attempt"], r["lease_until"], r["superseded_by"],
        r["supersedes"], r["seg_seed"] or r["id"],
    )


def _delivery(r: sqlite3.Row) -> Delivery:
    return Delivery(r["id"], r["job_id"], r["destination"], DeliveryState(r["state"]), r["attempts"], r["last_error"],
                    r["warning"], r["created"], r["next_attempt"], r["delivered_at"], r["claim"])


class SqliteJobStore:
    """:class:`server.jobs.store.JobStore` on SQLite."""

    def __init__(self, root: Path, busy_timeout_s: float = 10.0, patience_s: float = 300.0) -> None:
        self.path = Path(root) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s, self.patience_s = busy_timeout_s, patience_s
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._guard = threading.Lock()
        sqlite.migrate(self._db(), COMPONENT, MIGRATIONS, patience_s)

    # ------------------------------------------------------------------------------------------------ plumbing
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite.connect(self.path, self.busy_timeout_s)
            db.row_factory = sqlite3.Row
            self._local.db = db
            with self._guard:
                # Threads come and go (a heartbeat per run, the server's thread pool): their connections go too.
                for thread, old in [c for c in self._connections if not c[0].is_alive()]:
                    old.close()
                self._connections = [c for c in self._connections if c[0].is_alive()]
                self._connections.append((threading.current_thread(), db))
        return db

    def close(self) -> None:
        with self._guard:
            for _, db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    def connections(self) -> int:
        with self._guard:
            return len(self._connections)

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], T], patience_s: float | None = None) -> T:
        """One statement or transaction, retried while another connection holds the lock (``patience_s`` 0: one
        short try, :class:`StoreBusy` at once; for writes that are repeated anyway, which must not hold up the
        inference that makes them)."""
        if patience_s == 0:
            db = self._db()
            with sqlite.busy_timeout(db, ONE_TRY_BUSY_S, self.busy_timeout_s):
                return sqlite.retry_busy(lambda: fn(db), 0, what)
        return sqlite.retry_busy(lambda: fn(self._db()), self.patience_s if patience_s is None else patience_s, what)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with sqlite.transaction(self._db()) as db:
            yield db

    def _in_tx(self, what: str, fn: Callable[[sqlite3.Connection], T], patience_s: float | None = None) -> T:
        def body(_: sqlite3.Connection) -> T:
            with self._tx() as db:
                return fn(db)
        return self._run(what, body, patience_s)

    # ------------------------------------------------------------------------------------------------ jobs
    def create(self, spec: JobSpec, supersedes: str | None = None) -> Job:
        now = time.time()
        job_id = uuid.uuid4().hex
        job = Job(job_id, JobState.STAGING, spec, now, now, supersedes=supersedes, seg_seed=job_id)
        self._run("create a job", lambda db: db.execute(
            "INSERT INTO jobs (id, state, model, params, created, updated, origin, destinations, outputs_requested, "
            "series_uid, destination_choice, supersedes, seg_seed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (job_id, JobState.STAGING.value, spec.model, json.dumps(_params(spec)), now, now,
             json.dumps(spec.origin.to_dict()), json.dumps(list(spec.destinations)), json.dumps([o.value for o in spec.outputs]), spec.series_uid,
             spec.destination_choice.value, supersedes, job_id)))
        return job

    def get(self, job_id: str) -> Job | None:
        row = self._run("read a job", lambda db: db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone())  # noqa: S608
        return _job(row) if row else None

    def list(self, limit: int = 50, state: JobState | None = None, before: float | None = None) -> list[Job]:
        """Newest first; ``before``: only jobs created before that time (paging)."""
        query, args = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE 1=1", []  # noqa: S608
        if state is not None:
            query += " AND state = ?"
            args.append(state.value)
        if before is not None:
            query += " AND created < ?"
            args.append(before)
        rows = self._run("list jobs", lambda db: db.execute(query + " ORDER BY created DESC LIMIT ?",
                                                            (*args, limit)).fetchall())
        return [_job(r) for r in rows]

    def in_state(self, state: JobState) -> list[Job]:
        rows = self._run("list jobs", lambda db: db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ? ORDER BY created", (state.value,)).fetchall())  # noqa: S608
        return [_job(r) for r in rows]

    def all_ids(self) -> set[str]:
        return {r[0] for r in self._run("list jobs", lambda db: db.execute("SELECT id FROM jobs").fetchall())}

    def mark_staged(self, job_id: str, staged: StagedInput, spec: JobSpec, notes: list[str]) -> bool:
        """staging -> queued, with what staging chose and what the input lets the job produce."""
        return self._run("queue a job", lambda db: db.execute(
            "UPDATE jobs SET state = ?, staged = ?, input_kind = ?, outputs_requested = ?, destinations = ?, notes = ?, "
            "updated = ? WHERE id = ? AND state = ?",
            (JobState.QUEUED.value, json.dumps(staged.to_dict()), staged.kind.value,
             json.dumps([o.value for o in spec.outputs]), json.dumps(list(spec.destinations)),
             json.dumps(list(staged.notes) + notes), time.time(), job_id, JobState.STAGING.value)).rowcount == 1)

    def refuse(self, job_id: str, kind: ErrorKind, error: str) -> bool:
        """A job whose input was refused or cut off before it was queued: staging -> failed."""
        return self._run("fail a job", lambda db: db.execute(
            "UPDATE jobs SET state = ?, error_kind = ?, error = ?, updated = ? WHERE id = ? AND state = ?",
            (JobState.FAILED.value, kind.value, error, time.time(), job_id, JobState.STAGING.value)).rowcount == 1)

    def claim(self, job_id: str, owner: str, lease_s: float) -> Claim | None:
        """queued -> running, atomically: the attempt number it returns fences every later write of this run."""
        now = time.time()
        row = self._run("claim a job", lambda db: db.execute(
            "UPDATE jobs SET state = ?, attempt = attempt + 1, lease_until = ?, owner = ?, progress_done = 0, "
            "progress_total = 0, updated = ? WHERE id = ? AND state = ? RETURNING attempt",
            (_RUNNING, now + lease_s, owner, now, job_id, JobState.QUEUED.value)).fetchone())
        return Claim(job_id, row[0], owner) if row else None

    def _fenced(self, what: str, claim: Claim, sets: str, args: tuple[Any, ...],
                patience_s: float | None = None) -> bool:
        return self._run(what, lambda db: db.execute(
            f"UPDATE jobs SET {sets} WHERE id = ? AND attempt = ? AND state = ?",  # noqa: S608 - our own SET text
            (*args, claim.job_id, claim.attempt, _RUNNING)).rowcount == 1, patience_s)

    def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        """One try (the next beat tries again): StoreBusy while another connection holds the lock."""
        return self._fenced("renew a lease", claim, "lease_until = ?", (time.time() + lease_s,), patience_s=0)

    def report_progress(self, claim: Claim, done: int, total: int) -> bool:
        """One try: progress is a courtesy, and a locked database must not hold the inference up."""
        return self._fenced("report progress", claim, "progress_done = ?, progress_total = ?, updated = ?",
                            (done, total, time.time()), patience_s=0)

    def fail(self, claim: Claim, kind: ErrorKind, error: str) -> bool:
        return self._fenced("fail a job", claim, "state = ?, error_kind = ?, error = ?, lease_until = NULL, updated = ?",
                            (JobState.FAILED.value, kind.value, error, time.time()))

    def succeed(self, claim: Claim, result: JobResult, deliver_to: tuple[str, ...]) -> bool:
        """The job's success and its SEG's deliveries, in one transaction; nothing if the claim is stale."""
        now = time.time()

        def body(db: sqlite3.Connection) -> bool:
            changed = db.execute(
                "UPDATE jobs SET state = ?, timings = ?, notes = ?, outputs = ?, lease_until = NULL, updated = ? "
                "WHERE id = ? AND attempt = ? AND state = ?",
                (JobState.SUCCEEDED.value, json.dumps(result.timings), json.dumps(list(result.notes)),
                 json.dumps([r.value for r in result.results]), now, claim.job_id, claim.attempt, _RUNNING)).rowcount
            if changed:
                db.executemany(
                    "INSERT OR IGNORE INTO deliveries (job_id, destination, state, created, next_attempt) "
                    "VALUES (?,?,?,?,?)",
                    [(claim.job_id, name, DeliveryState.PENDING.value, now, now) for name in deliver_to])
            return bool(changed)
        return self._in_tx("record a job's success", body)

    def release(self, claim: Claim, reason: str, max_attempts: int) -> Requeued | None:
        """A run ended without a result: queued again for another run, or failed once ``max_attempts`` ran."""
        def body(db: sqlite3.Connection) -> Requeued | None:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? AND attempt = ? AND state = ?",  # noqa: S608
                             (claim.job_id, claim.attempt, _RUNNING)).fetchone()
            return self._release_row(db, row, reason, max_attempts) if row else None
        return self._in_tx("requeue a job", body)

    @staticmethod
    def _release_row(db: sqlite3.Connection, row: sqlite3.Row, reason: str, max_attempts: int) -> Requeued:
        job = _job(row)
        notes = [*job.notes, f"run {job.attempt} ended without a result: {reason}"]
        if job.attempt >= max_attempts:
            db.execute("UPDATE jobs SET state = ?, error_kind = ?, error = ?, notes = ?, lease_until = NULL, owner = NULL, "
                       "updated = ? WHERE id = ? AND attempt = ?",
                       (JobState.FAILED.value, ErrorKind.INTERRUPTED.value,
                        f"{reason}; the job ran {job.attempt} time(s) without a result (CTSEG_JOB_MAX_ATTEMPTS="
                        f"{max_attempts}); submit it again", json.dumps(notes), time.time(), job.id, job.attempt))
            return Requeued(job.id, JobState.FAILED, job.attempt)
        db.execute("UPDATE jobs SET state = ?, notes = ?, lease_until = NULL, owner = NULL, progress_done = 0, "
                   "progress_total = 0, updated = ? WHERE id = ? AND attempt = ?",
                   (JobState.QUEUED.value, json.dumps(notes), time.time(), job.id, job.attempt))
        return Requeued(job.id, JobState.QUEUED, job.attempt)

    def _release_where(self, what: str, where: str, args: tuple[Any, ...], reason: str,
                       max_attempts: int, patience_s: float | None = None) -> list[Requeued]:
        def body(db: sqlite3.Connection) -> list[Requeued]:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ? AND {where}",  # noqa: S608
                              (_RUNNING, *args)).fetchall()
            return [self._release_row(db, row, reason, max_attempts) for row in rows]
        return self._in_tx(what, body, patience_s)

    def requeue_expired(self, now: float, max_attempts: int) -> list[Requeued]:
        """Running jobs whose worker stopped renewing its lease. One short try (StoreBusy while the database is
        locked): a sweep that waited out a lock would find every live run expired, its heartbeats having waited
        too."""
        return self._release_where("requeue expired leases", "lease_until < ?", (now,),
                                   "its worker stopped renewing its lease (stopped, paused or cut off)", max_attempts,
                                   patience_s=0)

    def requeue_running(self, reason: str, max_attempts: int) -> list[Requeued]:
        """Every running job, at the start of the one service that may hold them (its storage lock proves that
        whoever ran them is gone)."""
        return self._release_where("requeue interrupted jobs", "1 = 1", (), reason, max_attempts)

    def supersede(self, job_id: str, by: str) -> Superseded | None:
        """``by`` replaces ``job_id`` (more instances of the same received series): an unfinished old job stops,
        its undelivered SEG is not sent; if its SEG reached (or may be reaching) a destination, ``by`` reuses its
        SEG UIDs so that destinations that overwrite instances replace it."""
        now = time.time()

        def body(db: sqlite3.Connection) -> Superseded | None:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()  # noqa: S608
            if row is None:
                return None
            old = _job(row)
            if not old.state.finished:
                db.execute("UPDATE jobs SET state = ?, superseded_by = ?, lease_until = NULL, updated = ? WHERE id = ?",
                           (JobState.SUPERSEDED.value, by, now, job_id))
            else:
                db.execute("UPDATE jobs SET superseded_by = ?, updated = ? WHERE id = ?", (by, now, job_id))
            reached = [r[0] for r in db.execute(
                "SELECT destination FROM deliveries WHERE job_id = ? AND (state = ? OR (state = ? AND claim IS NOT NULL "
                "AND claimed_until >= ?)) ORDER BY id",
                (job_id, DeliveryState.DELIVERED.value, DeliveryState.PENDING.value, now))]
            cancelled = db.execute(
                "UPDATE deliveries SET state = ?, last_error = ? WHERE job_id = ? AND state = ?",
                (DeliveryState.SUPERSEDED.value, f"not sent: job {by} replaces this job", job_id,
                 DeliveryState.PENDING.value)).rowcount
            if reached:
                db.execute("UPDATE jobs SET seg_seed = ? WHERE id = ?", (old.seg_seed, by))
            return Superseded(old.state, tuple(reached), cancelled)
        return self._in_tx("supersede a job", body)

    def cancel(self, job_id: str) -> bool:
        """The job and its deliveries removed; a worker running it finds its claim gone at its next write."""
        def body(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 1
        return self._in_tx("remove a job", body)

    def counts(self) -> dict[str, int]:
        rows = self._run("count jobs", lambda db: db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {s.value: 0 for s in JobState} | {state: n for state, n in rows}

    def active(self) -> int:
        return self._run("count jobs", lambda db: db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state IN (?,?,?)",
            (JobState.STAGING.value, JobState.QUEUED.value, _RUNNING)).fetchone()[0])

    def expired(self, older_than_s: float) -> list[str]:
        """Finished jobs past retention, except those whose SEG still waits for a destination."""
        cutoff = time.time() - older_than_s
        finished = [s.value for s in JobState if s.finished]
        marks = ",".join("?" * len(finished))
        rows = self._run("find expired jobs", lambda db: db.execute(
            f"SELECT id FROM jobs WHERE updated < ? AND state IN ({marks}) AND NOT EXISTS "  # noqa: S608
            "(SELECT 1 FROM deliveries d WHERE d.job_id = jobs.id AND d.state = ?)",
            (cutoff, *finished, DeliveryState.PENDING.value)).fetchall())
        return [r[0] for r in rows]

    # ------------------------------------------------------------------------------------------------ outbox
    def deliveries(self, job_id: str) -> list[Delivery]:
        rows = self._run("read deliveries", lambda db: db.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,)).fetchall())  # noqa: S608
        return [_delivery(r) for r in rows]

    def claim_deliveries(self, destination: str, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Due deliveries to ``destination``, claimed with a token for ``lease_s`` so no other sender takes them."""
        token = uuid.uuid4().hex
        rows = self._run("claim deliveries", lambda db: db.execute(
            f"UPDATE deliveries SET claim = ?, claimed_until = ? WHERE id IN (SELECT id FROM deliveries "  # noqa: S608
            "WHERE destination = ? AND state = ? AND next_attempt <= ? AND (claimed_until IS NULL OR claimed_until < ?) "
            f"ORDER BY next_attempt, id LIMIT ?) RETURNING {_DELIVERY_COLUMNS}",
            (token, now + lease_s, destination, DeliveryState.PENDING.value, now, now, limit)).fetchall())
        return sorted((_delivery(r) for r in rows), key=lambda d: (d.next_attempt, d.id))

    def begin_send(self, delivery: Delivery, lease_s: float) -> bool:
        """Just before its send: the delivery is still pending and still ours (not superseded, given up or taken
        over since the batch was claimed); its lease restarts now."""
        return self._run("start a delivery", lambda db: db.execute(
            "UPDATE deliveries SET claimed_until = ? WHERE id = ? AND claim = ? AND state = ?",
            (time.time() + lease_s, delivery.id, delivery.claim, DeliveryState.PENDING.value)).rowcount == 1)

    def delivery_done(self, delivery: Delivery, state: DeliveryState, error: str | None = None,
                      warning: str | None = None, next_attempt: float | None = None) -> bool:
        """Record one attempt under the sender's claim: delivered, failed for good, or pending again until
        ``next_attempt``. A delivery superseded meanwhile stays superseded unless it was in fact delivered."""
        now = time.time()
        return self._run("record a delivery", lambda db: db.execute(
            "UPDATE deliveries SET state = CASE WHEN state = ? AND ? != ? THEN state ELSE ? END, "
            "attempts = attempts + 1, last_error = ?, warning = ?, claim = NULL, claimed_until = NULL, "
            "next_attempt = COALESCE(?, next_attempt), delivered_at = ? WHERE id = ? AND claim = ?",
            (DeliveryState.SUPERSEDED.value, state.value, DeliveryState.DELIVERED.value, state.value, error, warning,
             next_attempt, now if state == DeliveryState.DELIVERED else None, delivery.id,
             delivery.claim)).rowcount == 1)

    def unclaim(self, delivery: Delivery) -> None:
        self._run("release a delivery", lambda db: db.execute(
            "UPDATE deliveries SET claim = NULL, claimed_until = NULL WHERE id = ? AND claim = ?",
            (delivery.id, delivery.claim)))

    def expedite(self, destination: str, now: float) -> int:
        """A destination answers again: its pending deliveries are due now, not at their back-off."""
        return self._run("expedite deliveries", lambda db: db.execute(
            "UPDATE deliveries SET next_attempt = ? WHERE destination = ? AND state = ? AND next_attempt > ?",
            (now, destination, DeliveryState.PENDING.value, now)).rowcount)

    def give_up_deliveries(self, created_before: float, reason: str) -> list[Delivery]:
        def body(db: sqlite3.Connection) -> list[Delivery]:
            rows = db.execute(f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE state = ? AND created < ? "  # noqa: S608
                              "AND (claimed_until IS NULL OR claimed_until < ?)",
                              (DeliveryState.PENDING.value, created_before, time.time())).fetchall()
            db.executemany("UPDATE deliveries SET state = ?, claim = NULL, claimed_until = NULL, "
                           "last_error = COALESCE(last_error || '; ', '') || ? WHERE id = ?",
                           [(DeliveryState.FAILED.value, reason, r["id"]) for r in rows])
            return [_delivery(r) for r in rows]
        return self._in_tx("give up deliveries", body)

    def release_delivery_claims(self) -> int:
        return self._run("release delivery claims", lambda db: db.execute(
            "UPDATE deliveries SET claim = NULL, claimed_until = NULL WHERE state = ? "
            "AND (claim IS NOT NULL OR claimed_until IS NOT NULL)",
            (DeliveryState.PENDING.value,)).rowcount)

    def next_due(self, destination: str) -> float | None:
        return self._run("read the outbox", lambda db: db.execute(
            "SELECT MIN(next_attempt) FROM deliveries WHERE destination = ? AND state = ?",
            (destination, DeliveryState.PENDING.value)).fetchone()[0])

    def pending_destinations(self) -> set[str]:
        return {r[0] for r in self._run("read the outbox", lambda db: db.execute(
            "SELECT DISTINCT destination FROM deliveries WHERE state = ?", (DeliveryState.PENDING.value,)).fetchall())}

    def outbox_stats(self) -> tuple[dict[tuple[str, str], int], float | None]:
        """Deliveries by (destination, state), and the creation time of the oldest pending one."""
        def body(db: sqlite3.Connection) -> tuple[dict[tuple[str, str], int], float | None]:
            rows = db.execute("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state").fetchall()
            oldest = db.execute("SELECT MIN(created) FROM deliveries WHERE state = ?",
                                (DeliveryState.PENDING.value,)).fetchone()[0]
            return {(d, s): n for d, s, n in rows}, oldest
        return self._run("read the outbox", body)
