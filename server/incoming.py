"""Series arriving over DIMSE, instance by instance, until they are complete: on disk and in the job store's
database, so a restart of the service loses nothing that was acknowledged to a sender.

Each series gets a folder under ``<storage>/incoming/`` (named by a hash of its UID: a UID from the network is
never a path) and a row with its sender, modality, instance and frame counts, the time of its last instance and
whether an association that carried part of it was aborted. The router (server/dicom_listener.py) takes a series
once it has been quiet for ``dicom_stable_seconds``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS incoming (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, calling_ae_title TEXT NOT NULL, modality TEXT NOT NULL,
    description TEXT NOT NULL, instances INTEGER NOT NULL, frames INTEGER NOT NULL, first_received REAL NOT NULL,
    last_received REAL NOT NULL, aborted INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class IncomingSeries:
    series_uid: str
    study_uid: str
    calling_ae_title: str
    modality: str
    description: str
    instances: int
    frames: int
    first_received: float
    last_received: float
    aborted: bool


def _digest(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


def fsync_write(path: Path, data: bytes) -> None:
    """``data`` at ``path``, durable before this returns (temporary file, fsync, rename, fsync of the folder)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IncomingStore:
    def __init__(self, storage: Path) -> None:
        self.root = Path(storage) / "incoming"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one writer at a time: an instance lands in a series, or the series moves
        self._db = sqlite3.connect(Path(storage) / "jobs.sqlite3", check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._drop_orphans()

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def folder(self, series_uid: str) -> Path:
        return self.root / _digest(series_uid)

    def store_instance(self, series: IncomingSeries, sop_instance_uid: str, data: bytes) -> None:
        """Write one instance durably and count it (``series`` carries the instance's own header values)."""
        with self.lock:
            folder = self.folder(series.series_uid)
            folder.mkdir(exist_ok=True)
            path = folder / f"{_digest(sop_instance_uid)}.dcm"
            again = path.exists()  # a resend of the same instance replaces it, and is not counted twice
            fsync_write(path, data)
            now = time.time()
            self._db.execute(
                "INSERT INTO incoming (series_uid, study_uid, calling_ae_title, modality, description, instances, "
                "frames, first_received, last_received) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(series_uid) DO UPDATE "
                "SET instances = instances + excluded.instances, frames = frames + excluded.frames, "
                "last_received = excluded.last_received, calling_ae_title = excluded.calling_ae_title",
                (series.series_uid, series.study_uid, series.calling_ae_title, series.modality, series.description,
                 0 if again else 1, 0 if again else series.frames, now, now),
            )

    def mark_aborted(self, series_uids: set[str]) -> None:
        with self.lock:
            self._db.executemany("UPDATE incoming SET aborted = 1 WHERE series_uid = ?", [(u,) for u in series_uids])

    def clear_aborted(self, series_uids: set[str]) -> None:
        """A later association that ended cleanly carried these series: a sender's retry completes them."""
        with self.lock:
            self._db.executemany("UPDATE incoming SET aborted = 0 WHERE series_uid = ?", [(u,) for u in series_uids])

    def quiet_since(self, cutoff: float) -> list[IncomingSeries]:
        with self.lock:
            rows = self._db.execute(
                "SELECT series_uid, study_uid, calling_ae_title, modality, description, instances, frames, "
                "first_received, last_received, aborted FROM incoming WHERE last_received <= ? ORDER BY last_received",
                (cutoff,),
            ).fetchall()
        return [IncomingSeries(*r[:9], bool(r[9])) for r in rows]

    def take(self, series_uid: str, target: Path) -> bool:
        """Move the series' files to ``target`` (a job's input folder) and forget it; False if it was gone."""
        with self.lock:
            folder = self.folder(series_uid)
            if folder.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(folder, target)
            self._db.execute("DELETE FROM incoming WHERE series_uid = ?", (series_uid,))
            return target.is_dir()

    def drop(self, series_uid: str) -> None:
        with self.lock:
            shutil.rmtree(self.folder(series_uid), ignore_errors=True)
            self._db.execute("DELETE FROM incoming WHERE series_uid = ?", (series_uid,))

    def pending(self) -> int:
        with self.lock:
            return self._db.execute("SELECT COUNT(*) FROM incoming").fetchone()[0]

    def _drop_orphans(self) -> None:
        """After a crash: rows whose folder was already moved, folders with no row, half-written files."""
        with self.lock:
            uids = [r[0] for r in self._db.execute("SELECT series_uid FROM incoming")]
            known = {_digest(u) for u in uids}
            for uid in uids:
                if not self.folder(uid).is_dir():
                    self._db.execute("DELETE FROM incoming WHERE series_uid = ?", (uid,))
            for folder in self.root.iterdir():
                if folder.name not in known:
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    for part in folder.glob("*.part"):
                        part.unlink(missing_ok=True)
