"""The arrival buffer: received instances on disk, and in the database which association brought each one.

Files live in ``<storage>/incoming/<hash of the series UID>/<hash of the SOP Instance UID>.dcm`` (never a name a
sender chose); each is written durably (server/core/durable.py) before its C-STORE success goes back. Rows in
``<storage>/jobs.sqlite3``:

* ``associations``: one per accepted association, ``open`` -> ``released`` | ``aborted``. Written as it happens,
  so a crash or a shutdown leaves the truth: at the next start, and when the listener stops, every association
  still ``open`` becomes ``aborted``.
* ``arrival_instances``: which association last delivered each instance. A series is complete when no instance's
  last delivery came through an aborted association: a series cut off mid-transfer waits until its instances are
  sent again (a sender's retry re-delivers them through a released association), however many other associations
  carried parts of it meanwhile.
* ``incoming``: one row per series, with its counts, and its routing: ``staging_job`` while a job is being made of
  it (a crash there re-stages it at the next start, so an acknowledged series is never lost), then ``job_id`` and
  ``routed_instances``. The files stay for ``dicom_reassembly_minutes`` after routing: instances that arrive
  later make the series due again, and it is run whole, superseding the job made of the first part. Its
  ``sender`` is the DIMSE destination that sent it, when the association's calling AE title *and* peer address are
  that destination's (the listener checks): only then does its SEG go back to the sender.

pynetdicom writes each received data set to ``<storage>/receiving/`` as it arrives; the listener moves the file
into ``incoming/`` (same file system: a rename). Files left there by an association cut off mid-instance are removed
at start and once nothing has been written to them for a while.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from server.core import durable, sqlite
from server.core.database import Database, retry

log = logging.getLogger(__name__)
T = TypeVar("T")


class AssociationState:
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"


@dataclass(frozen=True)
class InstanceHeader:
    """What the listener read from one instance's header (UIDs already checked)."""

    series_uid: str
    study_uid: str
    sop_instance_uid: str
    modality: str
    description: str
    frames: int


@dataclass(frozen=True)
class ArrivedSeries:
    series_uid: str
    study_uid: str
    calling_ae_title: str
    modality: str
    description: str
    instances: int
    frames: int
    first_received: float
    last_received: float
    routed_instances: int
    job_id: str | None  # the job made of it last time (superseded by the next one)
    complete: bool  # no instance's last delivery came through an aborted association
    busy: bool  # an open association carried it
    sender: str | None = None  # the DIMSE destination all its instances came from (AE title and address checked)


def _move(source: Path, target: Path) -> None:
    """A rename where both are on one file system (``receiving/`` is beside ``incoming/``), else a copy."""
    try:
        os.replace(source, target)
    except OSError:
        shutil.copyfile(source, target)


def digest(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


_SERIES = ("s.series_uid, s.study_uid, s.calling_ae_title, s.modality, s.description, s.instances, s.frames, "
           "s.first_received, s.last_received, s.routed_instances, s.job_id, "
           "(NOT EXISTS (SELECT 1 FROM arrival_instances i JOIN associations a ON "
           " a.id = i.association_id WHERE i.series_uid = s.series_uid AND a.state = 'aborted')) AS complete, "
           "EXISTS (SELECT 1 FROM arrival_instances i JOIN associations a ON a.id = i.association_id "
           " WHERE i.series_uid = s.series_uid AND a.state = 'open') AS busy, s.sender")


def _series(row: sqlite3.Row) -> ArrivedSeries:
    return ArrivedSeries(*row[:11], complete=bool(row[11]), busy=bool(row[12]), sender=row[13])


class ArrivalStore:
    def __init__(self, storage: Path, busy_timeout_s: float = 10.0, patience_s: float = 300.0) -> None:
        self.root = durable.make_dirs(Path(storage) / "incoming")
        self.receiving = durable.make_dirs(Path(storage) / "receiving")  # pynetdicom's files while they arrive
        self.path = Path(storage) / "jobs.sqlite3"
        self.patience_s = patience_s
        schema = Database.embedded(Path(storage), busy_timeout_s, patience_s)  # the schema is Alembic's
        try:
            schema.upgrade()
        finally:
            schema.dispose()
        self._db = sqlite.connect(self.path, busy_timeout_s)
        self.lock = threading.Lock()  # one connection, one writer at a time in this process
        # An instance's file and row, and a series' removal, never interleave: a removal decided on what a series
        # was cannot take an instance acknowledged since.
        self._series_lock = threading.Lock()
        self._drop_orphans()
        self._adopt_first_release()

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self.lock:
                return fn(self._db)
        return retry(locked, self.patience_s, what)

    def _tx(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        def body(db: sqlite3.Connection) -> T:
            with sqlite.transaction(db):
                return fn(db)
        return self._run(what, body)

    def folder(self, series_uid: str) -> Path:
        return self.root / digest(series_uid)

    # ------------------------------------------------------------------------------------------------ associations
    def open_association(self, calling_ae_title: str) -> str:
        assoc_id = uuid.uuid4().hex
        self._run("record an association", lambda db: db.execute(
            "INSERT INTO associations (id, calling_ae_title, state, opened) VALUES (?,?,?,?)",
            (assoc_id, calling_ae_title, AssociationState.OPEN, time.time())))
        return assoc_id

    def close_association(self, assoc_id: str, released: bool) -> list[str]:
        """Released or aborted; returns the series it carried (for the log)."""
        state = AssociationState.RELEASED if released else AssociationState.ABORTED

        def body(db: sqlite3.Connection) -> list[str]:
            db.execute("UPDATE associations SET state = ?, closed = ? WHERE id = ? AND state = ?",
                       (state, time.time(), assoc_id, AssociationState.OPEN))
            return [r[0] for r in db.execute(
                "SELECT DISTINCT series_uid FROM arrival_instances WHERE association_id = ?", (assoc_id,))]
        return self._tx("close an association", body)

    def abort_open_associations(self) -> int:
        """Associations a stop or a crash cut off: what they carried counts as cut off too."""
        return self._run("abort open associations", lambda db: db.execute(
            "UPDATE associations SET state = ?, closed = ? WHERE state = ?",
            (AssociationState.ABORTED, time.time(), AssociationState.OPEN)).rowcount)

    # ------------------------------------------------------------------------------------------------ instances
    def store_instance(self, assoc_id: str, calling_ae_title: str, header: InstanceHeader, received: Path,
                       sender: str | None = None) -> None:
        """Move the received file (``receiving/``) into place durably, then record it: the caller answers success
        only after this returns. A series keeps a verified ``sender`` only while every instance of it came from that
        one sender: one instance from an unverified association (or another sender) clears it for good."""
        with self._series_lock:
            self._store_instance(assoc_id, calling_ae_title, header, received, sender)

    def _store_instance(self, assoc_id: str, calling_ae_title: str, header: InstanceHeader, received: Path,
                        sender: str | None) -> None:
        folder = self.folder(header.series_uid)
        durable.make_dirs(folder)
        instance = digest(header.sop_instance_uid)
        path = folder / f"{instance}.dcm"
        again = path.exists()
        durable.write_with(path, lambda tmp: _move(received, tmp))  # a resend of the same instance replaces it
        now = time.time()

        def body(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO arrival_instances (series_uid, instance, association_id, frames, received) "
                       "VALUES (?,?,?,?,?) ON CONFLICT(series_uid, instance) DO UPDATE SET association_id = "
                       "excluded.association_id, frames = excluded.frames, received = excluded.received",
                       (header.series_uid, instance, assoc_id, header.frames, now))
            db.execute(
                "INSERT INTO incoming (series_uid, study_uid, calling_ae_title, modality, description, instances, "
                "frames, first_received, last_received, sender) VALUES (?,?,?,?,?,0,0,?,?,?) ON CONFLICT(series_uid) "
                "DO UPDATE SET last_received = excluded.last_received, calling_ae_title = excluded.calling_ae_title, "
                "sender = CASE WHEN incoming.sender IS excluded.sender THEN incoming.sender END",
                (header.series_uid, header.study_uid, calling_ae_title, header.modality, header.description, now, now,
                 sender))
            db.execute("UPDATE incoming SET instances = (SELECT COUNT(*) FROM arrival_instances WHERE series_uid = ?), "
                       "frames = (SELECT COALESCE(SUM(frames), 0) FROM arrival_instances WHERE series_uid = ?) "
                       "WHERE series_uid = ?", (header.series_uid, header.series_uid, header.series_uid))
        try:
            self._tx("record an instance", body)
        except BaseException:
            if not again:  # refused (no success goes back): nothing of it may be run later
                path.unlink(missing_ok=True)
            raise

    def sweep_receiving(self, idle_before: float) -> int:
        """Files in ``receiving/`` not written to since ``idle_before``: what an association cut off mid-instance
        left (pynetdicom does not remove them). Returns how many were removed."""
        removed = 0
        for path in self.receiving.iterdir():
            try:
                if path.stat().st_mtime < idle_before:
                    path.unlink()
                    removed += 1
            except OSError:
                continue  # moved into place or removed meanwhile
        return removed

    # ------------------------------------------------------------------------------------------------ routing
    def due(self, quiet_before: float) -> list[ArrivedSeries]:
        """Series quiet since ``quiet_before`` with instances not yet routed, not being routed now."""
        rows = self._run("find due series", lambda db: db.execute(
            f"SELECT {_SERIES} FROM incoming s WHERE s.last_received <= ? AND s.staging_job IS NULL "  # noqa: S608
            "AND (s.instances > s.routed_instances OR s.last_received > s.cut_off_at) ORDER BY s.last_received",
            (quiet_before,)).fetchall())
        return [_series(r) for r in rows]

    def get(self, series_uid: str) -> ArrivedSeries | None:
        row = self._run("read a series", lambda db: db.execute(
            f"SELECT {_SERIES} FROM incoming s WHERE s.series_uid = ?", (series_uid,)).fetchone())  # noqa: S608
        return _series(row) if row else None

    def begin_routing(self, series_uid: str, job_id: str, instances: int) -> bool:
        return self._run("route a series", lambda db: db.execute(
            "UPDATE incoming SET staging_job = ?, staging_instances = ? WHERE series_uid = ? AND staging_job IS NULL",
            (job_id, instances, series_uid)).rowcount == 1)

    def link_into(self, series_uid: str, target: Path) -> int:
        """Every instance of the series, hard-linked into ``target`` (a job's input folder); the buffer keeps its own
        copy for reassembly."""
        durable.make_dirs(target)
        count = 0
        for path in sorted(self.folder(series_uid).glob("*.dcm")):
            if not path.name.startswith(durable.PART):
                durable.link_or_copy(path, target / path.name)
                count += 1
        durable.fsync_dir(target)
        return count

    def routed(self, series_uid: str, job_id: str | None) -> None:
        """The job made of the series is queued (or the series was refused): routing is done."""
        self._run("finish routing", lambda db: db.execute(
            "UPDATE incoming SET job_id = COALESCE(?, job_id), routed_instances = COALESCE(staging_instances, instances), "
            "staging_job = NULL, staging_instances = NULL, cut_off_at = NULL, routed_at = ? WHERE series_uid = ?",
            (job_id, time.time(), series_uid)))

    def evaluated(self, series_uid: str, instances: int) -> None:
        """No route takes the series as it is now: not run; kept (reassembly) in case more of it arrives."""
        self._run("skip a series", lambda db: db.execute(
            "UPDATE incoming SET routed_instances = ?, routed_at = ? WHERE series_uid = ?",
            (instances, time.time(), series_uid)))

    def cut_off(self, series_uid: str, instances: int) -> None:
        """Not sent again complete within the hold: not run, and kept (reassembly) so that a complete resend (the
        same instances through a released association) still makes it due."""
        now = time.time()
        self._run("give up a series", lambda db: db.execute(
            "UPDATE incoming SET routed_instances = ?, routed_at = ?, cut_off_at = ? WHERE series_uid = ?",
            (instances, now, now, series_uid)))

    def abandon_routing(self, series_uid: str) -> None:
        self._run("abandon routing", lambda db: db.execute(
            "UPDATE incoming SET staging_job = NULL, staging_instances = NULL WHERE series_uid = ?", (series_uid,)))

    def in_routing(self) -> list[tuple[str, str]]:
        """(series UID, job) of series a job was being made of when the service stopped."""
        return [tuple(r) for r in self._run("find series in routing", lambda db: db.execute(
            "SELECT series_uid, staging_job FROM incoming WHERE staging_job IS NOT NULL").fetchall())]

    def stale(self, routed_before: float) -> list[tuple[str, float]]:
        """(series UID, last received) of series routed (or skipped) before ``routed_before`` with nothing new
        since: their reassembly window is over."""
        return [tuple(r) for r in self._run("find stale series", lambda db: db.execute(
            "SELECT series_uid, last_received FROM incoming WHERE staging_job IS NULL AND routed_at IS NOT NULL "
            "AND routed_at < ? AND last_received <= routed_at AND instances <= routed_instances",
            (routed_before,)).fetchall())]

    def drop(self, series_uid: str, seen_last_received: float | None = None) -> bool:
        """The series' rows and files removed; with ``seen_last_received``, only if nothing arrived since it was
        seen (else False: the series lives on)."""
        with self._series_lock:
            def body(db: sqlite3.Connection) -> bool:
                row = db.execute("SELECT last_received FROM incoming WHERE series_uid = ?", (series_uid,)).fetchone()
                if row is not None and seen_last_received is not None and row[0] > seen_last_received:
                    return False
                db.execute("DELETE FROM arrival_instances WHERE series_uid = ?", (series_uid,))
                db.execute("DELETE FROM incoming WHERE series_uid = ?", (series_uid,))
                db.execute("DELETE FROM associations WHERE state != ? AND NOT EXISTS "
                           "(SELECT 1 FROM arrival_instances i WHERE i.association_id = associations.id)",
                           (AssociationState.OPEN,))
                return True
            if not self._tx("drop a series", body):
                return False
            shutil.rmtree(self.folder(series_uid), ignore_errors=True)  # rows first: a crash leaves an orphan folder
            return True

    def waiting(self) -> dict[str, int]:
        """Series not routed yet: still receiving (or quiet, about to be routed), and cut off (incomplete)."""
        rows = self._run("count series", lambda db: db.execute(
            f"SELECT {_SERIES} FROM incoming s WHERE s.instances > s.routed_instances").fetchall())  # noqa: S608
        series = [_series(r) for r in rows]
        return {"receiving": sum(s.complete for s in series), "incomplete": sum(not s.complete for s in series)}

    def pending(self) -> int:
        return self._run("count series", lambda db: db.execute("SELECT COUNT(*) FROM incoming").fetchone()[0])

    def _adopt_first_release(self) -> None:
        """Series received by the first releases have no instance rows: each file becomes one, under a stand-in
        association in the state the release recorded (its ``aborted`` flag), so they go on like any other."""
        legacy = self._run("find first-release series", lambda db: db.execute(
            "SELECT series_uid, aborted, instances, frames FROM incoming s WHERE NOT EXISTS "
            "(SELECT 1 FROM arrival_instances i WHERE i.series_uid = s.series_uid)").fetchall())
        for series_uid, aborted, instances, frames in legacy:
            files = sorted(self.folder(series_uid).glob("*.dcm"))
            state = AssociationState.ABORTED if aborted else AssociationState.RELEASED
            assoc = f"first-release-{state}"
            per = max(1, frames // max(1, instances))

            def body(db: sqlite3.Connection, series_uid: str = series_uid, files: list = files) -> None:
                db.execute("INSERT OR IGNORE INTO associations (id, calling_ae_title, state, opened, closed) "
                           "VALUES (?, '', ?, 0, 0)", (assoc, state))
                db.executemany("INSERT OR IGNORE INTO arrival_instances VALUES (?,?,?,?,?)",
                               [(series_uid, f.stem, assoc, per, time.time()) for f in files])
                db.execute("UPDATE incoming SET aborted = 0 WHERE series_uid = ?", (series_uid,))
            self._tx("adopt a first-release series", body)

    def _drop_orphans(self) -> None:
        """After a crash: rows whose folder is gone, folders with no row, half-written and half-received files."""
        self.sweep_receiving(float("inf"))
        uids = [r[0] for r in self._run("list series", lambda db: db.execute("SELECT series_uid FROM incoming").fetchall())]
        known = {digest(u) for u in uids}
        for uid in uids:
            if not self.folder(uid).is_dir():
                self.drop(uid)
        for folder in self.root.iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for part in [*folder.glob(f"{durable.PART}*"), *folder.glob("*.part")]:  # (and the first releases')
                    part.unlink(missing_ok=True)
