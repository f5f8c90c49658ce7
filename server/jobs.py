"""Job records (SQLite) and results on disk; nothing vanishes on a crash.

A job is ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``. Records live in
``<storage>/jobs.sqlite3`` (WAL), files in ``<storage>/jobs/<id>/``. On start-up, queued jobs are queued again
and jobs that were running are marked failed with the reason; expired jobs are removed by retention.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Job:
    id: str
    state: JobState
    model: str
    input_kind: str  # "nifti" | "dicom"
    params: dict[str, Any]
    created: float
    updated: float
    progress_done: int = 0
    progress_total: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    notes: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def to_public(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state.value, "model": self.model, "input": self.input_kind,
            "outputs_requested": self.params.get("outputs"), "created": self.created, "updated": self.updated,
            "progress": {"windows_done": self.progress_done, "windows_total": self.progress_total},
            "timings": self.timings, "error": self.error, "notes": self.notes,
            "results": {name: f"/v1/segmentations/{self.id}/{name}" for name in self.outputs},
        }


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL, input_kind TEXT NOT NULL,
    params TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    progress_done INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0,
    timings TEXT NOT NULL DEFAULT '{}', error TEXT, error_kind TEXT, notes TEXT NOT NULL DEFAULT '[]',
    outputs TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""


class JobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def create(self, model: str, input_kind: str, params: dict[str, Any]) -> Job:
        now = time.time()
        job = Job(uuid.uuid4().hex, JobState.QUEUED, model, input_kind, params, now, now)
        self.job_dir(job.id).mkdir(parents=True)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, state, model, input_kind, params, created, updated) VALUES (?,?,?,?,?,?,?)",
                (job.id, job.state.value, model, input_kind, json.dumps(params), now, now),
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            cols = [d[0] for d in self._db.execute("SELECT * FROM jobs LIMIT 0").description]
        return self._row(dict(zip(cols, row))) if row else None

    @staticmethod
    def _row(r: dict[str, Any]) -> Job:
        return Job(
            r["id"], JobState(r["state"]), r["model"], r["input_kind"], json.loads(r["params"]), r["created"],
            r["updated"], r["progress_done"], r["progress_total"], json.loads(r["timings"]), r["error"],
            r["error_kind"], json.loads(r["notes"]), json.loads(r["outputs"]),
        )

    def update(self, job_id: str, **fields: Any) -> None:
        encoded = {k: (json.dumps(v) if k in ("timings", "notes", "outputs", "params") else
                       v.value if isinstance(v, JobState) else v) for k, v in fields.items()}
        encoded["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in encoded)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*encoded.values(), job_id))

    def ids_in_state(self, *states: JobState) -> list[str]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created",
                                    [s.value for s in states]).fetchall()
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s.value: 0 for s in JobState} | {state: n for state, n in rows}

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def expired(self, older_than_s: float) -> list[str]:
        cutoff = time.time() - older_than_s
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE updated < ? AND state IN (?,?,?)",
                (cutoff, JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value),
            ).fetchall()
        return [r[0] for r in rows]

    def recover(self) -> tuple[list[str], list[str]]:
        """After a restart: running jobs failed (with the reason), queued jobs returned for re-queueing."""
        interrupted = self.ids_in_state(JobState.RUNNING)
        for job_id in interrupted:
            self.update(job_id, state=JobState.FAILED, error="interrupted: the service stopped while this job ran; submit it again",
                        error_kind="interrupted")
            shutil.rmtree(self.job_dir(job_id) / "input", ignore_errors=True)
        return self.ids_in_state(JobState.QUEUED), interrupted
