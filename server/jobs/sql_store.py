"""The job store on SQL: job records and the delivery outbox, in SQLite (embedded) or PostgreSQL (several machines).

The outbox lives in the same database on purpose: a job's success and the deliveries of its SEG are written in
one transaction, so a crash can never leave a succeeded job whose SEG nobody will send, nor a delivery of a SEG
that was never finished. Every change is a compare-and-set (``WHERE state = ...``, and ``AND attempt = ...`` for
a worker's writes): a worker whose lease expired, an orphan of a killed service, or a second writer changes
nothing.

With several writers on PostgreSQL (API replicas, workers, senders on other machines), whatever reads rows to
change them takes them ``FOR UPDATE SKIP LOCKED``: two sweepers never requeue one expired run twice, and two
senders never claim one delivery. SQLite has one writer at a time (``BEGIN IMMEDIATE``), so the same statements
are safe there without the clause, which SQLAlchemy leaves out for it.

One SQL text for both (SQLAlchemy Core, server/core/schema.py); what is retried and how is server/core/database.py.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from server.core.database import Database
from server.core.schema import deliveries as D
from server.core.schema import jobs as J
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

_RUNNING = JobState.RUNNING.value
_PENDING = DeliveryState.PENDING.value
_HELD = DeliveryState.HELD.value
_JOB = [c for c in J.c if c.name != "owner"]
_DELIVERY = [D.c[n] for n in ("id", "job_id", "destination", "state", "attempts", "last_error", "warning", "created",
                              "next_attempt", "delivered_at", "claim", "object")]


def _params(spec: JobSpec) -> str:
    """Request options without a column of their own (``phase``, ``review``), in the record's ``params`` JSON."""
    params: dict[str, Any] = {"phase": str(spec.phase)} if spec.phase is not None else {}
    return json.dumps(params | ({"review": True} if spec.review else {}))


def _job(r: Row[Any]) -> Job:
    m = r._mapping
    origin = Origin.from_dict(json.loads(m["origin"])) if m["origin"] else Origin("upload")
    params = json.loads(m["params"] or "{}")
    spec = JobSpec(m["model"], tuple(Output(o) for o in json.loads(m["outputs_requested"] or "[]")) or (Output.NIFTI,),
                   m["series_uid"], tuple(json.loads(m["destinations"] or "[]")),
                   DestinationChoice(m["destination_choice"]), origin, params.get("phase"),
                   bool(params.get("review", False)))
    return Job(
        m["id"], JobState(m["state"]), spec, m["created"], m["updated"],
        InputKind(m["input_kind"]) if m["input_kind"] else None,
        StagedInput.from_dict(json.loads(m["staged"])) if m["staged"] else None,
        m["progress_done"], m["progress_total"], json.loads(m["timings"]), m["error"],
        ErrorKind(m["error_kind"]) if m["error_kind"] else None, json.loads(m["notes"]),
        tuple(ResultFile(o) for o in json.loads(m["outputs"])), m["attempt"], m["lease_until"], m["superseded_by"],
        m["supersedes"], m["seg_seed"] or m["id"],
    )


def _delivery(r: Row[Any]) -> Delivery:
    m = r._mapping
    return Delivery(m["id"], m["job_id"], m["destination"], DeliveryState(m["state"]), m["attempts"], m["last_error"],
                    m["warning"], m["created"], m["next_attempt"], m["delivered_at"], m["claim"],
                    ResultFile(m["object"]))


def _insert(conn: Connection, table: sa.Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING in the connection's dialect."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


class SqlJobStore:
    """:class:`server.jobs.store.JobStore` on a :class:`~server.core.database.Database`."""

    def __init__(self, db: Database, migrate: bool = True) -> None:
        self.db = db
        if migrate:
            db.upgrade()

    def close(self) -> None:
        self.db.dispose()

    def connections(self) -> int:
        """Connections held open by the pool (threads come and go; their connections stay few)."""
        return self.db.engine.pool.checkedin() + self.db.engine.pool.checkedout()

    # ------------------------------------------------------------------------------------------------ jobs
    def create(self, spec: JobSpec, supersedes: str | None = None) -> Job:
        now = time.time()
        job_id = uuid.uuid4().hex
        job = Job(job_id, JobState.STAGING, spec, now, now, supersedes=supersedes, seg_seed=job_id)
        # ON CONFLICT DO NOTHING: a retry after a COMMIT whose reply was lost finds its own row (the id is ours)
        self.db.run("create a job", lambda c: c.execute(_insert(c, J).on_conflict_do_nothing().values(
            id=job_id, state=JobState.STAGING.value, model=spec.model, params=_params(spec), created=now, updated=now,
            origin=json.dumps(spec.origin.to_dict()), destinations=json.dumps(list(spec.destinations)),
            outputs_requested=json.dumps([o.value for o in spec.outputs]), series_uid=spec.series_uid,
            destination_choice=spec.destination_choice.value, supersedes=supersedes, seg_seed=job_id)))
        return job

    def get(self, job_id: str) -> Job | None:
        row = self.db.read("read a job", lambda c: c.execute(sa.select(*_JOB).where(J.c.id == job_id)).first())
        return _job(row) if row else None

    def list(self, limit: int = 50, state: JobState | None = None, before: float | None = None) -> list[Job]:
        """Newest first; ``before``: only jobs created before that time (paging)."""
        query = sa.select(*_JOB)
        if state is not None:
            query = query.where(J.c.state == state.value)
        if before is not None:
            query = query.where(J.c.created < before)
        rows = self.db.read("list jobs", lambda c: c.execute(query.order_by(J.c.created.desc()).limit(limit)).all())
        return [_job(r) for r in rows]

    def in_state(self, state: JobState) -> list[Job]:
        rows = self.db.read("list jobs", lambda c: c.execute(
            sa.select(*_JOB).where(J.c.state == state.value).order_by(J.c.created)).all())
        return [_job(r) for r in rows]

    def all_ids(self) -> set[str]:
        return set(self.db.read("list jobs", lambda c: c.execute(sa.select(J.c.id)).scalars().all()))

    def _update(self, what: str, where: Any, patience_s: float | None = None, mine: Any = None,
                **values: Any) -> bool:
        """One row changed. ``mine``: what the row looks like once this very write landed (its ``updated`` time is
        the token), so a retry after a COMMIT whose reply was lost (PostgreSQL: a failover, a cut connection)
        reports the write that did land instead of "nothing changed"."""
        def body(c: Connection) -> bool:
            if c.execute(J.update().where(where).values(**values)).rowcount == 1:
                return True
            return mine is not None and c.execute(sa.select(J.c.id).where(mine)).first() is not None
        return self.db.run(what, body, patience_s)

    def mark_staged(self, job_id: str, staged: StagedInput, spec: JobSpec, notes: list[str]) -> bool:
        """staging -> queued, with what staging chose and what the input lets the job produce."""
        now = time.time()
        return self._update(
            "queue a job", (J.c.id == job_id) & (J.c.state == JobState.STAGING.value),
            mine=(J.c.id == job_id) & (J.c.state == JobState.QUEUED.value) & (J.c.updated == now),
            state=JobState.QUEUED.value, staged=json.dumps(staged.to_dict()), input_kind=staged.kind.value,
            outputs_requested=json.dumps([o.value for o in spec.outputs]),
            destinations=json.dumps(list(spec.destinations)), notes=json.dumps(list(staged.notes) + notes),
            updated=now)

    def touch_staging(self, job_ids: list[str]) -> int:
        """Jobs whose input this process is still receiving: their ``updated`` is now (a replica's staging lease;
        another replica's sweeper fails a staging job nobody touched for long, its receiver having died)."""
        if not job_ids:
            return 0
        return self.db.run("renew staging", lambda c: c.execute(
            J.update().where(J.c.id.in_(job_ids) & (J.c.state == JobState.STAGING.value))
            .values(updated=time.time())).rowcount, patience_s=0)

    def refuse(self, job_id: str, kind: ErrorKind, error: str) -> bool:
        """A job whose input was refused or cut off before it was queued: staging -> failed."""
        return self._update("fail a job", (J.c.id == job_id) & (J.c.state == JobState.STAGING.value),
                            state=JobState.FAILED.value, error_kind=kind.value, error=error, updated=time.time())

    def claim(self, job_id: str, owner: str, lease_s: float) -> Claim | None:
        """queued -> running, atomically: the attempt number it returns fences every later write of this run."""
        now = time.time()

        def body(c: Connection) -> int | None:
            attempt = c.execute(J.update().where((J.c.id == job_id) & (J.c.state == JobState.QUEUED.value))
                                .values(state=_RUNNING, attempt=J.c.attempt + 1, lease_until=now + lease_s,
                                        owner=owner, progress_done=0, progress_total=0, updated=now)
                                .returning(J.c.attempt)).scalar()
            if attempt is None:  # a retry after our own claim landed (its reply lost): the claim is ours
                attempt = c.execute(sa.select(J.c.attempt).where(
                    (J.c.id == job_id) & (J.c.state == _RUNNING) & (J.c.owner == owner)
                    & (J.c.updated == now))).scalar()
            return attempt
        attempt = self.db.run("claim a job", body)
        return Claim(job_id, attempt, owner) if attempt is not None else None

    @staticmethod
    def _ours(claim: Claim) -> Any:
        return (J.c.id == claim.job_id) & (J.c.attempt == claim.attempt) & (J.c.state == _RUNNING)

    def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        """One short try (the next beat tries again): StoreBusy while another connection holds the lock."""
        return self._update("renew a lease", self._ours(claim), patience_s=0, lease_until=time.time() + lease_s)

    def report_progress(self, claim: Claim, done: int, total: int) -> bool:
        """One short try: progress is a courtesy, and a locked database must not hold the inference up."""
        return self._update("report progress", self._ours(claim), patience_s=0, progress_done=done,
                            progress_total=total, updated=time.time())

    def fail(self, claim: Claim, kind: ErrorKind, error: str) -> bool:
        now = time.time()
        return self._update("fail a job", self._ours(claim), state=JobState.FAILED.value, error_kind=kind.value,
                            error=error, lease_until=None, updated=now,
                            mine=(J.c.id == claim.job_id) & (J.c.attempt == claim.attempt)
                            & (J.c.state == JobState.FAILED.value) & (J.c.updated == now))

    def succeed(self, claim: Claim, result: JobResult,
                deliver_to: tuple[str | tuple[str, ResultFile], ...]) -> bool:
        """The job's success and its deliveries, in one transaction; nothing if the claim is stale. ``deliver_to``:
        destinations (each sent the SEG) or (destination, object) pairs."""
        now = time.time()
        pairs = [(d, ResultFile.SEG) if isinstance(d, str) else (d[0], ResultFile(d[1])) for d in deliver_to]

        def body(c: Connection) -> bool:
            changed = c.execute(J.update().where(self._ours(claim)).values(
                state=JobState.SUCCEEDED.value, timings=json.dumps(result.timings),
                notes=json.dumps(list(result.notes)), outputs=json.dumps([r.value for r in result.results]),
                lease_until=None, updated=now)).rowcount
            if not changed:  # a retry after our own success landed (its reply lost): it is ours, deliveries too
                return c.execute(sa.select(J.c.id).where(
                    (J.c.id == claim.job_id) & (J.c.attempt == claim.attempt)
                    & (J.c.state == JobState.SUCCEEDED.value) & (J.c.updated == now))).first() is not None
            if pairs:  # a job under review: its deliveries held, not pending, until a person releases them
                params = c.execute(sa.select(J.c.params).where(J.c.id == claim.job_id)).scalar()
                state = _HELD if json.loads(params or "{}").get("review") else _PENDING
                c.execute(_insert(c, D).values([
                    {"job_id": claim.job_id, "destination": name, "object": obj.value, "state": state,
                     "created": now, "next_attempt": now} for name, obj in pairs]).on_conflict_do_nothing())
            return bool(changed)
        return self.db.run("record a job's success", body)

    def release(self, claim: Claim, reason: str, max_attempts: int) -> Requeued | None:
        """A run ended without a result: queued again for another run, or failed once ``max_attempts`` ran."""
        def body(c: Connection) -> Requeued | None:
            row = c.execute(sa.select(*_JOB).where(self._ours(claim)).with_for_update()).first()
            return self._release_row(c, row, reason, max_attempts) if row else None
        return self.db.run("requeue a job", body)

    @staticmethod
    def _release_row(c: Connection, row: Row[Any], reason: str, max_attempts: int) -> Requeued:
        job = _job(row)
        notes = json.dumps([*job.notes, f"run {job.attempt} ended without a result: {reason}"])
        this_run = (J.c.id == job.id) & (J.c.attempt == job.attempt) & (J.c.state == _RUNNING)
        if job.attempt >= max_attempts:
            c.execute(J.update().where(this_run).values(
                state=JobState.FAILED.value, error_kind=ErrorKind.INTERRUPTED.value,
                error=f"{reason}; the job ran {job.attempt} time(s) without a result (CTSEG_JOB_MAX_ATTEMPTS="
                      f"{max_attempts}); submit it again", notes=notes, lease_until=None, owner=None,
                updated=time.time()))
            return Requeued(job.id, JobState.FAILED, job.attempt)
        c.execute(J.update().where(this_run).values(state=JobState.QUEUED.value, notes=notes, lease_until=None,
                                                    owner=None, progress_done=0, progress_total=0, updated=time.time()))
        return Requeued(job.id, JobState.QUEUED, job.attempt)

    def _release_where(self, what: str, where: Any, reason: str, max_attempts: int,
                       patience_s: float | None = None) -> list[Requeued]:
        def body(c: Connection) -> list[Requeued]:
            rows = c.execute(sa.select(*_JOB).where((J.c.state == _RUNNING) & where)
                             .with_for_update(skip_locked=True)).all()
            return [self._release_row(c, row, reason, max_attempts) for row in rows]
        return self.db.run(what, body, patience_s)

    def requeue_expired(self, now: float, max_attempts: int) -> list[Requeued]:
        """Running jobs whose worker stopped renewing its lease. One short try (StoreBusy while the database is
        locked): a sweep that waited out a lock would find every live run expired, its heartbeats having waited
        too."""
        return self._release_where("requeue expired leases", J.c.lease_until < now,
                                   "its worker stopped renewing its lease (stopped, paused or cut off)", max_attempts,
                                   patience_s=0)

    def requeue_running(self, reason: str, max_attempts: int) -> list[Requeued]:
        """Every running job, at the start of the one service that may hold them (its storage lock proves that
        whoever ran them is gone)."""
        return self._release_where("requeue interrupted jobs", sa.true(), reason, max_attempts)

    def supersede(self, job_id: str, by: str) -> Superseded | None:
        """``by`` replaces ``job_id`` (more instances of the same received series): an unfinished old job stops,
        its undelivered SEG is not sent; if its SEG reached (or may be reaching) a destination, ``by`` reuses its
        SEG UIDs so that destinations that overwrite instances replace it."""
        now = time.time()

        def body(c: Connection) -> Superseded | None:
            row = c.execute(sa.select(*_JOB).where(J.c.id == job_id).with_for_update()).first()
            if row is None:
                return None
            old = _job(row)
            values: dict[str, Any] = {"superseded_by": by, "updated": now}
            if not old.state.finished:
                values |= {"state": JobState.SUPERSEDED.value, "lease_until": None}
            c.execute(J.update().where(J.c.id == job_id).values(**values))
            # Its deliveries locked first: a sender on another machine starting one of them now (begin_send) waits,
            # then finds it superseded; one already started counts as reached.
            c.execute(sa.select(D.c.id).where(D.c.job_id == job_id).with_for_update()).all()
            reached = c.execute(sa.select(D.c.destination).where(
                (D.c.job_id == job_id) & ((D.c.state == DeliveryState.DELIVERED.value)
                                          | ((D.c.state == _PENDING) & D.c.claim.is_not(None)
                                             & (D.c.claimed_until >= now)))).order_by(D.c.id)).scalars().all()
            reached = list(dict.fromkeys(reached))  # a destination once, whatever objects it got
            cancelled = c.execute(D.update().where((D.c.job_id == job_id) & D.c.state.in_([_PENDING, _HELD])).values(
                state=DeliveryState.SUPERSEDED.value, last_error=f"not sent: job {by} replaces this job")).rowcount
            if reached:
                c.execute(J.update().where(J.c.id == by).values(seg_seed=old.seg_seed))
            return Superseded(old.state, tuple(reached), cancelled)
        return self.db.run("supersede a job", body)

    def cancel(self, job_id: str) -> bool:
        """The job and its deliveries removed; a worker running it finds its claim gone at its next write."""
        def body(c: Connection) -> bool:
            c.execute(D.delete().where(D.c.job_id == job_id))
            return c.execute(J.delete().where(J.c.id == job_id)).rowcount == 1
        return self.db.run("remove a job", body)

    def counts(self) -> dict[str, int]:
        rows = self.db.read("count jobs", lambda c: c.execute(
            sa.select(J.c.state, sa.func.count()).group_by(J.c.state)).all())
        return {s.value: 0 for s in JobState} | {state: n for state, n in rows}

    def active(self) -> int:
        states = [JobState.STAGING.value, JobState.QUEUED.value, _RUNNING]
        return self.db.read("count jobs", lambda c: c.execute(
            sa.select(sa.func.count()).select_from(J).where(J.c.state.in_(states))).scalar_one())

    def expired(self, older_than_s: float) -> list[str]:
        """Finished jobs past retention, except those whose SEG still waits for a destination or for a person's
        review (a held SEG is kept until someone releases or discards it, however long that takes)."""
        cutoff = time.time() - older_than_s
        waiting = sa.select(D.c.id).where((D.c.job_id == J.c.id) & D.c.state.in_([_PENDING, _HELD])).exists()
        query = sa.select(J.c.id).where((J.c.updated < cutoff) & J.c.state.in_([s.value for s in JobState if s.finished])
                                        & ~waiting)
        return list(self.db.read("find expired jobs", lambda c: c.execute(query).scalars().all()))

    # ------------------------------------------------------------------------------------------------ outbox
    def deliveries(self, job_id: str) -> list[Delivery]:
        rows = self.db.read("read deliveries", lambda c: c.execute(
            sa.select(*_DELIVERY).where(D.c.job_id == job_id).order_by(D.c.id)).all())
        return [_delivery(r) for r in rows]

    def claim_deliveries(self, destination: str, now: float, lease_s: float, limit: int,
                         max_senders: int | None = None) -> list[Delivery]:
        """Due deliveries to ``destination``, claimed with a token for ``lease_s`` so no other sender takes them
        (on PostgreSQL, rows another sender is claiming this instant are skipped, not waited for).

        ``max_senders``: nothing is claimed while that many other batches for the destination are held. A sender
        sends its batch one association at a time, so this caps the associations all replicas hold open to one
        PACS. The count and the claim are one step: SQLite has one writer; PostgreSQL queues the destination's
        claimers on an advisory lock for the transaction."""
        token = uuid.uuid4().hex
        due = (sa.select(D.c.id).where(
            (D.c.destination == destination) & (D.c.state == _PENDING) & (D.c.next_attempt <= now)
            & (D.c.claimed_until.is_(None) | (D.c.claimed_until < now)))
            .order_by(D.c.next_attempt, D.c.id).limit(limit).with_for_update(skip_locked=True))

        def body(c: Connection) -> list[Row[Any]]:
            if max_senders is not None:
                if c.dialect.name == "postgresql":
                    c.execute(sa.select(sa.func.pg_advisory_xact_lock(
                        sa.func.hashtext("ctseg-outbox:" + destination))))
                held = c.execute(sa.select(sa.func.count(sa.distinct(D.c.claim))).where(
                    (D.c.destination == destination) & (D.c.state == _PENDING) & D.c.claim.is_not(None)
                    & (D.c.claimed_until >= now))).scalar_one()
                if held >= max_senders:
                    return []
            return c.execute(D.update().where(D.c.id.in_(due.scalar_subquery()))
                             .values(claim=token, claimed_until=now + lease_s).returning(*_DELIVERY)).all()
        rows = self.db.run("claim deliveries", body)
        return sorted((_delivery(r) for r in rows), key=lambda d: (d.next_attempt, d.id))

    def _ours_delivery(self, delivery: Delivery) -> Any:
        return (D.c.id == delivery.id) & (D.c.claim == delivery.claim)

    def begin_send(self, delivery: Delivery, lease_s: float) -> bool:
        """Just before its send: the delivery is still pending and still ours (not superseded, given up or taken
        over since the batch was claimed); its lease restarts now."""
        return self.db.run("start a delivery", lambda c: c.execute(
            D.update().where(self._ours_delivery(delivery) & (D.c.state == _PENDING))
            .values(claimed_until=time.time() + lease_s)).rowcount == 1)

    def delivery_done(self, delivery: Delivery, state: DeliveryState, error: str | None = None,
                      warning: str | None = None, next_attempt: float | None = None) -> bool:
        """Record one attempt under the sender's claim: delivered, failed for good, or pending again until
        ``next_attempt``. A delivery superseded meanwhile stays superseded unless it was in fact delivered."""
        now = time.time()
        keep = state != DeliveryState.DELIVERED
        new_state = sa.case((D.c.state == DeliveryState.SUPERSEDED.value, D.c.state), else_=state.value) if keep \
            else state.value
        return self.db.run("record a delivery", lambda c: c.execute(
            D.update().where(self._ours_delivery(delivery)).values(
                state=new_state, attempts=D.c.attempts + 1, last_error=error, warning=warning, claim=None,
                claimed_until=None, next_attempt=next_attempt if next_attempt is not None else D.c.next_attempt,
                delivered_at=now if state == DeliveryState.DELIVERED else None)).rowcount == 1)

    def unclaim(self, delivery: Delivery) -> None:
        self.db.run("release a delivery", lambda c: c.execute(
            D.update().where(self._ours_delivery(delivery)).values(claim=None, claimed_until=None)))

    def expedite(self, destination: str, now: float) -> int:
        """A destination answers again: its pending deliveries are due now, not at their back-off."""
        return self.db.run("expedite deliveries", lambda c: c.execute(
            D.update().where((D.c.destination == destination) & (D.c.state == _PENDING) & (D.c.next_attempt > now))
            .values(next_attempt=now)).rowcount)

    def release_held(self, job_id: str) -> int:
        """A person released the job's held deliveries: pending and due now. Their ``created`` restarts too, so the
        give-up age (give_up_deliveries) counts from the release, not from the hours the SEG waited for review."""
        now = time.time()
        return self.db.run("release held deliveries", lambda c: c.execute(
            D.update().where((D.c.job_id == job_id) & (D.c.state == _HELD))
            .values(state=_PENDING, created=now, next_attempt=now)).rowcount)

    def discard_held(self, job_id: str, reason: str) -> int:
        """A person discarded the job's held deliveries: never sent, ``reason`` recorded on each."""
        return self.db.run("discard held deliveries", lambda c: c.execute(
            D.update().where((D.c.job_id == job_id) & (D.c.state == _HELD))
            .values(state=DeliveryState.DISCARDED.value, last_error=reason)).rowcount)

    def give_up_deliveries(self, created_before: float, reason: str) -> list[Delivery]:
        def body(c: Connection) -> list[Delivery]:
            rows = c.execute(sa.select(*_DELIVERY).where(
                (D.c.state == _PENDING) & (D.c.created < created_before)
                & (D.c.claimed_until.is_(None) | (D.c.claimed_until < time.time())))
                .with_for_update(skip_locked=True)).all()
            for r in rows:
                c.execute(D.update().where((D.c.id == r.id) & (D.c.state == _PENDING)).values(
                    state=DeliveryState.FAILED.value, claim=None, claimed_until=None,
                    last_error=sa.func.coalesce(D.c.last_error + "; ", "") + reason))
            return [_delivery(r) for r in rows]
        return self.db.run("give up deliveries", body)

    def release_delivery_claims(self) -> int:
        return self.db.run("release delivery claims", lambda c: c.execute(
            D.update().where((D.c.state == _PENDING) & (D.c.claim.is_not(None) | D.c.claimed_until.is_not(None)))
            .values(claim=None, claimed_until=None)).rowcount)

    def next_due(self, destination: str) -> float | None:
        return self.db.read("read the outbox", lambda c: c.execute(
            sa.select(sa.func.min(D.c.next_attempt)).where((D.c.destination == destination)
                                                           & (D.c.state == _PENDING))).scalar())

    def pending_destinations(self) -> set[str]:
        return set(self.db.read("read the outbox", lambda c: c.execute(
            sa.select(D.c.destination).distinct().where(D.c.state == _PENDING)).scalars().all()))

    def outbox_stats(self) -> tuple[dict[tuple[str, str], int], float | None]:
        """Deliveries by (destination, state) (held ones under ``held``), and the creation time of the oldest
        pending one (a SEG waiting for review is not the outbox falling behind)."""
        def body(c: Connection) -> tuple[dict[tuple[str, str], int], float | None]:
            rows = c.execute(sa.select(D.c.destination, D.c.state, sa.func.count())
                             .group_by(D.c.destination, D.c.state)).all()
            oldest = c.execute(sa.select(sa.func.min(D.c.created)).where(D.c.state == _PENDING)).scalar()
            return {(d, s): n for d, s, n in rows}, oldest
        return self.db.read("read the outbox", body)
