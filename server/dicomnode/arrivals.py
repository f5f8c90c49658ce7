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
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.core import durable
from server.core.database import Database

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


# An open association counts as aborted once its receiver stopped renewing it (a receiver replica that died).
_CUT = ("(a.state = 'aborted' OR (a.state = 'open' AND a.seen IS NOT NULL AND a.seen < :stale))")
_SERIES = ("s.series_uid, s.study_uid, s.calling_ae_title, s.modality, s.description, s.instances, s.frames, "  # noqa: S608 - constants only
           "s.first_received, s.last_received, s.routed_instances, s.job_id, "
           "(NOT EXISTS (SELECT 1 FROM arrival_instances i JOIN associations a ON "
           f" a.id = i.association_id WHERE i.series_uid = s.series_uid AND {_CUT})) AS complete, "
           "EXISTS (SELECT 1 FROM arrival_instances i JOIN associations a ON a.id = i.association_id "
           " WHERE i.series_uid = s.series_uid AND a.state = 'open' AND (a.seen IS NULL OR a.seen >= :stale)) AS busy, "
           "s.sender")
Q = sa.text


def _series(row: Any) -> ArrivedSeries:
    return ArrivedSeries(*row[:11], complete=bool(row[11]), busy=bool(row[12]), sender=row[13])


class ArrivalStore:
    """The arrival buffer on the job database: SQLite in the storage folder (one receiver), or the shared
    PostgreSQL, where several receiver replicas behind a TCP load balancer may each get part of one series.

    With several receivers: each names itself (``receiver``) on the associations it records and renews them
    (:meth:`heartbeat`); an open association its receiver stopped renewing for ``stale_s`` counts as aborted, so a
    series cut off by a dead replica waits to be sent again, like one cut off here. An instance's file and rows,
    and a series' removal, are serialised per series across replicas (an advisory lock on PostgreSQL; in one
    process a lock and SQLite's single writer), so a removal can never take an instance acknowledged since. A
    replica never treats what it finds at start as its own leftovers: another one may be writing it."""

    def __init__(self, storage: Path, busy_timeout_s: float = 10.0, patience_s: float = 300.0,
                 db: Database | None = None, receiver: str | None = None, stale_s: float = 60.0) -> None:
        self.storage = Path(storage)
        self.root = durable.make_dirs(self.storage / "incoming")
        self.db = db or Database.embedded(self.storage, busy_timeout_s, patience_s)
        self.db.upgrade()  # the schema is Alembic's (server/core/migrations)
        self.shared = self.db.postgres
        self.receiver = receiver or "local"
        self.stale_s = stale_s
        receiving = self.storage / "receiving"
        # pynetdicom's files while they arrive: one folder per receiver where several share the storage
        self.receiving = durable.make_dirs(receiving / digest(self.receiver)[:16] if self.shared else receiving)
        self._receiving_root = receiving
        # An instance's file and row, and a series' removal, never interleave in this process: a removal decided
        # on what a series was cannot take an instance acknowledged since.
        self._series_lock = threading.Lock()
        self._drop_orphans()
        if not self.shared:
            self._adopt_first_release()

    def close(self) -> None:
        self.db.dispose()  # its own engine (the service opens one for it), whoever made it

    def _run(self, what: str, fn: Callable[[Connection], T]) -> T:
        return self.db.run(what, fn)

    def _read(self, what: str, fn: Callable[[Connection], T]) -> T:
        return self.db.read(what, fn)

    def _lock_series(self, c: Connection, series_uid: str) -> None:
        """Across replicas (PostgreSQL): one writer per series until the transaction ends."""
        if self.shared:
            c.execute(Q("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": "ctseg-series:" + series_uid})

    def _stale_before(self) -> float:
        """Open associations renewed before this are a dead receiver's (one receiver: never; it aborts its own)."""
        return time.time() - self.stale_s if self.shared else 0.0

    def folder(self, series_uid: str) -> Path:
        return self.root / digest(series_uid)

    # ------------------------------------------------------------------------------------------------ associations
    def open_association(self, calling_ae_title: str) -> str:
        assoc_id = uuid.uuid4().hex
        now = time.time()
        self._run("record an association", lambda c: c.execute(Q(
            "INSERT INTO associations (id, calling_ae_title, state, opened, receiver, seen) "
            "VALUES (:id, :calling, :state, :now, :receiver, :now)"),
            {"id": assoc_id, "calling": calling_ae_title, "state": AssociationState.OPEN, "now": now,
             "receiver": self.receiver}))
        return assoc_id

    def heartbeat(self) -> int:
        """This receiver's open associations are alive; others' that stopped being renewed become aborted."""
        now = time.time()

        def body(c: Connection) -> int:
            c.execute(Q("UPDATE associations SET seen = :now WHERE receiver = :receiver AND state = :open"),
                      {"now": now, "receiver": self.receiver, "open": AssociationState.OPEN})
            return c.execute(Q("UPDATE associations SET state = :aborted, closed = :now WHERE state = :open "
                               "AND seen IS NOT NULL AND seen < :stale"),
                             {"aborted": AssociationState.ABORTED, "now": now, "open": AssociationState.OPEN,
                              "stale": now - self.stale_s}).rowcount
        return self._run("renew associations", body) if self.shared else 0

    def close_association(self, assoc_id: str, released: bool) -> list[str]:
        """Released or aborted; returns the series it carried (for the log)."""
        state = AssociationState.RELEASED if released else AssociationState.ABORTED

        def body(c: Connection) -> list[str]:
            c.execute(Q("UPDATE associations SET state = :state, closed = :now WHERE id = :id AND state = :open"),
                      {"state": state, "now": time.time(), "id": assoc_id, "open": AssociationState.OPEN})
            return list(c.execute(Q("SELECT DISTINCT series_uid FROM arrival_instances WHERE association_id = :id"),
                                  {"id": assoc_id}).scalars())
        return self._run("close an association", body)

    def abort_open_associations(self) -> int:
        """Associations a stop or a crash cut off: what they carried counts as cut off too. With several
        receivers, only this receiver's (the others' are theirs, or expire)."""
        where = " AND receiver = :receiver" if self.shared else ""
        return self._run("abort open associations", lambda c: c.execute(Q(
            f"UPDATE associations SET state = :aborted, closed = :now WHERE state = :open{where}"),  # noqa: S608
            {"aborted": AssociationState.ABORTED, "now": time.time(), "open": AssociationState.OPEN,
             "receiver": self.receiver}).rowcount)

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
        instance = digest(header.sop_instance_uid)
        path = folder / f"{instance}.dcm"
        state: dict[str, bool] = {}

        def place() -> None:
            durable.make_dirs(folder)
            if "again" not in state:
                state["again"] = path.exists()
            if received.exists():  # (a retried transaction finds it moved already)
                durable.write_with(path, lambda tmp: _move(received, tmp))  # a resend of the same instance replaces it

        if not self.shared:
            place()  # one process: its lock serialises this with a removal, outside SQLite's write lock

        def body(c: Connection) -> None:
            if self.shared:
                self._lock_series(c, header.series_uid)  # the file and its rows under the series' lock
                place()
            now = time.time()
            args = {"series": header.series_uid, "instance": instance, "assoc": assoc_id, "frames": header.frames,
                    "now": now, "study": header.study_uid, "calling": calling_ae_title, "modality": header.modality,
                    "description": header.description, "sender": sender}
            c.execute(Q("INSERT INTO arrival_instances (series_uid, instance, association_id, frames, received) "
                        "VALUES (:series, :instance, :assoc, :frames, :now) ON CONFLICT (series_uid, instance) DO "
                        "UPDATE SET association_id = excluded.association_id, frames = excluded.frames, "
                        "received = excluded.received"), args)
            c.execute(Q(
                "INSERT INTO incoming (series_uid, study_uid, calling_ae_title, modality, description, instances, "
                "frames, first_received, last_received, sender) VALUES (:series, :study, :calling, :modality, "
                ":description, 0, 0, :now, :now, :sender) ON CONFLICT (series_uid) DO UPDATE SET "
                "last_received = excluded.last_received, calling_ae_title = excluded.calling_ae_title, "
                "sender = CASE WHEN incoming.sender IS NOT DISTINCT FROM excluded.sender THEN incoming.sender END"),
                args)
            c.execute(Q("UPDATE incoming SET instances = (SELECT COUNT(*) FROM arrival_instances WHERE series_uid = "
                        ":series), frames = (SELECT COALESCE(SUM(frames), 0) FROM arrival_instances WHERE "
                        "series_uid = :series) WHERE series_uid = :series"), args)
        try:
            self._run("record an instance", body)
        except BaseException:
            if not state.get("again", True):  # refused (no success goes back): nothing of it may be run later
                path.unlink(missing_ok=True)
            raise

    def sweep_receiving(self, idle_before: float) -> int:
        """Files in ``receiving/`` (every receiver's) not written to since ``idle_before``: what an association cut
        off mid-instance left (pynetdicom does not remove them). Returns how many were removed."""
        removed = 0
        for path in self._receiving_root.rglob("*"):
            try:
                if path.is_file() and path.stat().st_mtime < idle_before:
                    path.unlink()
                    removed += 1
            except OSError:
                continue  # moved into place or removed meanwhile
        return removed

    # ------------------------------------------------------------------------------------------------ routing
    def due(self, quiet_before: float) -> list[ArrivedSeries]:
        """Series quiet since ``quiet_before`` with instances not yet routed, not being routed now."""
        rows = self._read("find due series", lambda c: c.execute(Q(
            f"SELECT {_SERIES} FROM incoming s WHERE s.last_received <= :quiet AND s.staging_job IS NULL "  # noqa: S608
            "AND (s.instances > s.routed_instances OR s.last_received > s.cut_off_at) ORDER BY s.last_received"),
            {"quiet": quiet_before, "stale": self._stale_before()}).all())
        return [_series(r) for r in rows]

    def get(self, series_uid: str) -> ArrivedSeries | None:
        row = self._read("read a series", lambda c: c.execute(Q(
            f"SELECT {_SERIES} FROM incoming s WHERE s.series_uid = :series"),  # noqa: S608
            {"series": series_uid, "stale": self._stale_before()}).first())
        return _series(row) if row else None

    def begin_routing(self, series_uid: str, job_id: str, instances: int) -> bool:
        """The one router of a quiet series, across receivers: a compare-and-set on ``staging_job``."""
        return self._run("route a series", lambda c: c.execute(Q(
            "UPDATE incoming SET staging_job = :job, staging_instances = :n WHERE series_uid = :series AND "
            "staging_job IS NULL"), {"job": job_id, "n": instances, "series": series_uid}).rowcount == 1)

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
        self._run("finish routing", lambda c: c.execute(Q(
            "UPDATE incoming SET job_id = COALESCE(:job, job_id), routed_instances = COALESCE(staging_instances, "
            "instances), staging_job = NULL, staging_instances = NULL, cut_off_at = NULL, routed_at = :now "
            "WHERE series_uid = :series"), {"job": job_id, "now": time.time(), "series": series_uid}))

    def evaluated(self, series_uid: str, instances: int) -> None:
        """No route takes the series as it is now: not run; kept (reassembly) in case more of it arrives."""
        self._run("skip a series", lambda c: c.execute(Q(
            "UPDATE incoming SET routed_instances = :n, routed_at = :now WHERE series_uid = :series"),
            {"n": instances, "now": time.time(), "series": series_uid}))

    def cut_off(self, series_uid: str, instances: int) -> None:
        """Not sent again complete within the hold: not run, and kept (reassembly) so that a complete resend (the
        same instances through a released association) still makes it due."""
        now = time.time()
        self._run("give up a series", lambda c: c.execute(Q(
            "UPDATE incoming SET routed_instances = :n, routed_at = :now, cut_off_at = :now WHERE series_uid = "
            ":series"), {"n": instances, "now": now, "series": series_uid}))

    def abandon_routing(self, series_uid: str, job_id: str | None = None) -> bool:
        """Routing given back (the series is due again); with ``job_id``, only if that job still routes it."""
        where = " AND staging_job = :job" if job_id is not None else ""
        return self._run("abandon routing", lambda c: c.execute(Q(
            f"UPDATE incoming SET staging_job = NULL, staging_instances = NULL WHERE series_uid = :series{where}"),  # noqa: S608
            {"series": series_uid, "job": job_id}).rowcount == 1)

    def in_routing(self) -> list[tuple[str, str]]:
        """(series UID, job) of series a job is being made of (at a start: was, when the service stopped)."""
        return [tuple(r) for r in self._read("find series in routing", lambda c: c.execute(Q(
            "SELECT series_uid, staging_job FROM incoming WHERE staging_job IS NOT NULL")).all())]

    def stale(self, routed_before: float) -> list[tuple[str, float]]:
        """(series UID, last received) of series routed (or skipped) before ``routed_before`` with nothing new
        since: their reassembly window is over."""
        return [tuple(r) for r in self._read("find stale series", lambda c: c.execute(Q(
            "SELECT series_uid, last_received FROM incoming WHERE staging_job IS NULL AND routed_at IS NOT NULL "
            "AND routed_at < :before AND last_received <= routed_at AND instances <= routed_instances"),
            {"before": routed_before}).all())]

    def drop(self, series_uid: str, seen_last_received: float | None = None) -> bool:
        """The series' rows and files removed; with ``seen_last_received``, only if nothing arrived since it was
        seen (else False: the series lives on). Files and rows go under the series' lock, so an instance stored
        by another receiver meanwhile is either seen (and the series kept) or stored after (and kept)."""
        with self._series_lock:
            def body(c: Connection) -> bool:
                self._lock_series(c, series_uid)
                last = c.execute(Q("SELECT last_received FROM incoming WHERE series_uid = :series"),
                                 {"series": series_uid}).scalar()
                if last is not None and seen_last_received is not None and last > seen_last_received:
                    return False
                c.execute(Q("DELETE FROM arrival_instances WHERE series_uid = :series"), {"series": series_uid})
                c.execute(Q("DELETE FROM incoming WHERE series_uid = :series"), {"series": series_uid})
                c.execute(Q("DELETE FROM associations WHERE state != :open AND NOT EXISTS "
                            "(SELECT 1 FROM arrival_instances i WHERE i.association_id = associations.id)"),
                          {"open": AssociationState.OPEN})
                if self.shared:  # under the lock: no receiver writes this series' folder now
                    shutil.rmtree(self.folder(series_uid), ignore_errors=True)
                return True
            if not self._run("drop a series", body):
                return False
            if not self.shared:  # (shared: removed under the lock above; here another receiver may be storing)
                shutil.rmtree(self.folder(series_uid), ignore_errors=True)  # rows first: a crash leaves an orphan
            return True

    def waiting(self) -> dict[str, int]:
        """Series not routed yet: still receiving (or quiet, about to be routed), and cut off (incomplete)."""
        rows = self._read("count series", lambda c: c.execute(Q(
            f"SELECT {_SERIES} FROM incoming s WHERE s.instances > s.routed_instances"),  # noqa: S608
            {"stale": self._stale_before()}).all())
        series = [_series(r) for r in rows]
        return {"receiving": sum(s.complete for s in series), "incomplete": sum(not s.complete for s in series)}

    def pending(self) -> int:
        return self._read("count series", lambda c: c.execute(Q("SELECT COUNT(*) FROM incoming")).scalar_one())

    def _adopt_first_release(self) -> None:
        """Series received by the first releases have no instance rows: each file becomes one, under a stand-in
        association in the state the release recorded (its ``aborted`` flag), so they go on like any other."""
        legacy = self._read("find first-release series", lambda c: c.execute(Q(
            "SELECT series_uid, aborted, instances, frames FROM incoming s WHERE NOT EXISTS "
            "(SELECT 1 FROM arrival_instances i WHERE i.series_uid = s.series_uid)")).all())
        for series_uid, aborted, instances, frames in legacy:
            files = sorted(self.folder(series_uid).glob("*.dcm"))
            state = AssociationState.ABORTED if aborted else AssociationState.RELEASED
            assoc = f"first-release-{state}"
            per = max(1, frames // max(1, instances))

            def body(c: Connection, series_uid: str = series_uid, files: list = files, assoc: str = assoc,
                     state: str = state, per: int = per) -> None:
                c.execute(Q("INSERT INTO associations (id, calling_ae_title, state, opened, closed) "
                            "VALUES (:id, '', :state, 0, 0) ON CONFLICT DO NOTHING"), {"id": assoc, "state": state})
                if files:
                    c.execute(Q("INSERT INTO arrival_instances VALUES (:series, :instance, :assoc, :frames, :now) "
                                "ON CONFLICT DO NOTHING"),
                              [{"series": series_uid, "instance": f.stem, "assoc": assoc, "frames": per,
                                "now": time.time()} for f in files])
                c.execute(Q("UPDATE incoming SET aborted = 0 WHERE series_uid = :series"), {"series": series_uid})
            self._run("adopt a first-release series", body)

    def _drop_orphans(self) -> None:
        """After a crash: rows whose folder is gone, folders with no row, half-written and half-received files.
        With several receivers only this receiver's half-received files: the rest may be another's, in progress."""
        if self.shared:
            for path in self.receiving.iterdir():
                path.unlink(missing_ok=True)
            return
        self.sweep_receiving(float("inf"))
        uids = list(self._read("list series", lambda c: c.execute(Q("SELECT series_uid FROM incoming")).scalars()))
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
