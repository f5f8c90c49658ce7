"""The segmentation service: engines, the job store and queue, the outbox and the DICOM node, wired together.

Every job, whatever brought its input, goes the same way: :meth:`SegmentationService.open_job` (a ``staging``
record and an empty input folder), the caller fills the folder (upload, C-STORE, pull),
:meth:`SegmentationService.stage_and_enqueue` checks it once (server/jobs/staging.py) and queues it. The API's
routes call the methods of this class and nothing below it.

At start the service takes the storage lock (one service per storage folder) and recovers what the last stop left:
runs that were in progress go back to the queue (their workers died with the service), received series that were
being made into jobs are staged again, uploads and pulls that were cut off are failed with the reason (their
client never got an answer), associations that were open count as aborted.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

from server.core.database import Database, StoreBusy
from server.core.durable import private_storage
from server.core.errors import (
    InputError,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServiceUnavailable,
)
from server.core.metrics import Metrics
from server.core.nodes import DimseNode, Route
from server.core.options import PhaseChoice
from server.core.settings import Settings
from server.core.vocabulary import (
    DeliveryState,
    DestinationChoice,
    ErrorKind,
    OriginKind,
    Output,
    ResultFile,
)
from server.dicomnode.arrivals import ArrivalStore, ArrivedSeries
from server.dicomnode.listener import DicomListener
from server.imaging.quality import read_flags
from server.inference.engine import Engine, engines_from_settings
from server.jobs.files import JobFiles
from server.jobs.local_queue import ProcessWorkers, ThreadWorkers, open_store
from server.jobs.lock import StorageLock
from server.jobs.model import (
    Claim,
    Delivery,
    Job,
    JobRequest,
    JobSpec,
    JobState,
    Origin,
    StagedInput,
    settle_outputs,
)
from server.jobs.outbox import Outbox
from server.jobs.queue import JobQueue
from server.jobs.staging import stage
from server.jobs.store import Requeued
from server.pacs import retrieve

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.1
API_READ_PATIENCE_S = 10.0
STAGING_LEASES = 4  # replicas: a staging job nobody touched for this many job leases lost its receiving replica


class NothingHeld(RuntimeError):
    """A release or discard of a job that has no delivery held for review (HTTP 409: the job's state forbids it)."""

    status_code = 409


class SegmentationService:
    def __init__(self, settings: Settings, lock: StorageLock | None = None) -> None:
        self.settings = settings
        private_storage(settings.storage_dir)  # before the stores below make their files
        self.metrics = Metrics()
        # In process mode these engines give the bundles' facts only; the workers open the sessions.
        self.engines = engines_from_settings(settings)
        self.default_model = settings.default_model or next(iter(self.engines))
        if self.default_model not in self.engines:
            raise NotFound(f"default model {self.default_model!r} is not among the loaded bundles {sorted(self.engines)}")
        for route in settings.routes:
            if route.model is not None and route.model not in self.engines:
                raise NotFound(f"a route names model {route.model!r}, which is not among {sorted(self.engines)}")
        self.lock = lock or StorageLock(settings.storage_dir)
        self.ready = False
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._waiting_series: set[str] = set()  # received series that wait for room in the queue
        # Jobs are made in this process only (uploads, pulls, received series; one service per storage folder), so
        # one lock makes the queue limit's check and the job's creation atomic.
        self._admitting = threading.Lock()
        self._staging: set[str] = set()  # jobs whose input this process is receiving (a replica's staging lease)
        self._last_sweep = self._in_touch_since = time.time()

    def _open(self) -> None:
        """Everything that touches the storage folder, once its lock is held."""
        s = self.settings
        # reads answer a client: a database that stays unreachable is a 503 after this long, writes wait longer
        self.store = open_store(s, read_patience_s=API_READ_PATIENCE_S)
        self.files = JobFiles(s.storage_dir)
        self.queue: JobQueue
        if s.replicated:  # API replicas and DICOM receivers: workers elsewhere take the jobs (procrastinate)
            from server.jobs.shared_queue import SharedQueue

            self.queue = SharedQueue(s, self.store)
        elif s.worker_mode == "process":
            self.queue = ProcessWorkers(s, self._finished, self._lost)
        else:
            self.queue = ThreadWorkers(s, self.engines, self.store, self.files, self._finished)
        self.outbox = Outbox(s, self.store, self.files, self.metrics)
        self.arrivals: ArrivalStore | None = None
        self.listener: DicomListener | None = None
        if s.dicom_port is not None and s.role in ("all", "dicom"):
            # the arrival index beside the jobs: in PostgreSQL, receivers on several machines share it
            shared = Database.from_settings(s) if s.database_url else None
            self.arrivals = ArrivalStore(s.storage_dir, s.db_busy_timeout_s, s.db_patience_s, db=shared,
                                         receiver=f"{socket.gethostname()}:{s.dicom_port}",
                                         stale_s=2 * s.job_lease_s)
            self.listener = DicomListener(s, self.arrivals, self.metrics, self.route_received, self.refuse_cut_off)

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if not self.lock.held and not self.settings.replicated:  # replicas share the folder: leases coordinate
            self.lock.acquire()
        self._open()
        self.recover()
        self.queue.start()
        for engine in self.engines.values():
            engine.ready = True  # warmed up by the workers (or by ThreadWorkers.start in this process)
        for job in self.store.in_state(JobState.QUEUED):
            self.queue.submit(job.id)
        self.cleanup()
        self.outbox.start()
        if self.listener is not None:
            self.listener.start()
            self._recover_routing()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="ctseg-sweeper", daemon=True)
        self._sweeper.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self._stopping.set()
        if getattr(self, "store", None) is None:
            self.lock.release()
            return
        if self.listener is not None:
            self.listener.stop()
        self.outbox.stop()
        self.queue.stop()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5.0)
        self.store.close()
        if self.arrivals is not None:
            self.arrivals.close()
        self.lock.release()

    def recover(self) -> None:
        """What the last stop left, found with the storage lock held (so no other service is running it). A
        replica holds no such lock: what other replicas run now is not its leftovers, and expired leases (the
        sweeper) and delivery claims (their own expiry) say what a dead one abandoned."""
        s = self.settings
        if s.replicated:
            return
        for r in self.store.requeue_running("the service stopped while this job ran", s.job_max_attempts):
            self._count_requeue(r, "restart")
        released = self.store.release_delivery_claims()
        if released:
            log.info("%d delivery claim(s) of the last run released", released)
        routing = {job_id for _, job_id in self.arrivals.in_routing()} if self.arrivals is not None else set()
        for job in self.store.in_state(JobState.STAGING):
            if job.id in routing:
                continue  # a received series: staged again once the listener is up (_recover_routing)
            if job.origin.kind == OriginKind.DIMSE:
                if any(self.files.input_dir(job.id).glob("*")):
                    # a received series already in the job's input (moved there by a release before this one):
                    # acknowledged long ago, so staged again here rather than lost
                    self._restage_orphan(job)
                    continue
                self.store.cancel(job.id)  # made before its series was claimed: the series is routed again
                self.files.remove(job.id)
                continue
            if self.store.refuse(job.id, ErrorKind.INTERRUPTED, "interrupted: the service stopped while this "
                                 "job's input was arriving; send it again"):
                log.warning("job %s: its input was cut off by the last stop; failed", job.id)
            self.files.remove_input(job.id)
        known = self.store.all_ids()
        for orphan in self.files.job_ids() - known:
            self.files.remove(orphan)  # a job deleted while a run wrote, or a record never committed

    def _restage_orphan(self, job: Job) -> None:
        try:
            spec, notes, staged = self._stage(job)
            if self.store.mark_staged(job.id, staged, spec, notes):
                log.warning("job %s: its received series was being staged when the service stopped; queued", job.id)
        except Exception as err:  # noqa: BLE001 - recorded on the job
            self.fail_staging(job.id, err)

    def _node(self) -> ArrivalStore:
        if self.arrivals is None:
            raise RuntimeError("received series need the DICOM listener (CTSEG_DICOM_PORT)")
        return self.arrivals

    def _recover_routing(self) -> None:
        arrivals = self._node()
        for series_uid, job_id in arrivals.in_routing():
            job = self.store.get(job_id)
            series = arrivals.get(series_uid)
            if job is None or series is None:
                arrivals.abandon_routing(series_uid)
            elif job.state == JobState.STAGING:
                log.warning("job %s: its received series was being staged when the service stopped; staging it "
                            "again", job_id)
                self.files.remove_input(job_id)
                self._stage_received(job, series)
            else:
                arrivals.routed(series_uid, job_id)

    def cleanup(self) -> int:
        expired = self.store.expired(self.settings.retention_hours * 3600)
        for job_id in expired:
            self.store.cancel(job_id)
            self.files.remove(job_id)
        return len(expired)

    def _sweep_loop(self) -> None:
        every = max(0.2, self.settings.job_lease_s / 3)
        while not self._stopping.wait(every):
            try:
                self.sweep()
            except Exception:  # the next round tries again
                log.exception("sweep failed")

    def sweep(self) -> None:
        """Runs whose lease expired (a paused, cut off or stopped worker) go back to the queue; queued jobs the
        queue may have lost are submitted again (a duplicate finds the job claimed and does nothing).

        A lease is judged expired only after the sweeper itself has been in touch with the store for a whole lease:
        when the database was locked, no heartbeat could land either, and the runs are alive."""
        now = time.time()
        lease = self.settings.job_lease_s
        if now - self._last_sweep > lease / 2:  # this sweep comes late (the store was locked, the machine paused)
            self._in_touch_since = now
        self._last_sweep = now
        if now - self._in_touch_since >= lease:
            try:
                requeued = self.store.requeue_expired(now, self.settings.job_max_attempts)
            except StoreBusy:
                self._in_touch_since = self._last_sweep = time.time()
                return
            for r in requeued:
                self._count_requeue(r, "lease")
        for job in self.store.in_state(JobState.QUEUED):
            if job.updated < now - lease:
                self.queue.submit(job.id)
        if self.settings.replicated:
            self._sweep_staging(now)
        self._last_sweep = time.time()

    def _sweep_staging(self, now: float) -> None:
        """Replicas: keep this process's uploads and pulls alive, and fail those whose replica died mid-input (no
        other replica touched them for ``STAGING_LEASES`` leases); a received series is re-staged by its DICOM
        receiver from its arrival record instead, never failed here."""
        mine = list(self._staging)
        try:
            self.store.touch_staging(mine)
        except StoreBusy:
            return
        cutoff = now - STAGING_LEASES * self.settings.job_lease_s
        for job in self.store.in_state(JobState.STAGING):
            if job.id in mine or job.origin.kind == OriginKind.DIMSE or job.updated >= cutoff:
                continue
            if self.store.refuse(job.id, ErrorKind.INTERRUPTED, "interrupted: the API replica receiving this "
                                 "job's input stopped; send it again"):
                log.warning("job %s: the replica receiving its input stopped; failed", job.id)
                self.files.remove_input(job.id)

    def _count_requeue(self, r: Requeued, reason: str) -> None:
        self.metrics.job_attempts.labels(reason).inc()
        if r.state == JobState.QUEUED:
            log.warning("job %s: run %d ended without a result (%s); queued again", r.job_id, r.attempt, reason)
            if getattr(self, "queue", None) is not None and self.ready:
                self.queue.submit(r.job_id)
        else:
            log.error("job %s: run %d ended without a result (%s); failed after %d run(s)", r.job_id, r.attempt,
                      reason, r.attempt)
            self.files.remove_input(r.job_id)

    # ---------------------------------------------------------------------------------------- jobs
    def engine(self, name: str | None) -> Engine:
        key = name or self.default_model
        if key not in self.engines:
            raise NotFound(f"unknown model {key!r}; available: {', '.join(sorted(self.engines))}")
        return self.engines[key]

    def _spec(self, request: JobRequest, sender: str | None = None) -> JobSpec:
        """The model and destinations a request resolves to (the rule is README's 'which SEGs go where').
        ``sender``: the DIMSE destination a received series verifiably came from (AE title and address, checked by
        the listener); a calling AE title alone never sends a SEG anywhere."""
        engine = self.engine(request.model)
        known = {d.name for d in self.settings.destinations}
        choice, destinations = DestinationChoice.DEFAULT, list(self.settings.default_destinations)
        if request.destinations is not None:
            unknown = [n for n in request.destinations if n not in known]
            if unknown:
                raise InputError(f"unknown destination(s) {', '.join(map(repr, unknown))}; configured: "
                                 f"{', '.join(sorted(known)) or 'none (CTSEG_DESTINATIONS)'}")
            choice, destinations = DestinationChoice.NAMED, list(dict.fromkeys(request.destinations))
        elif request.origin.kind == OriginKind.DIMSE and sender is not None:  # back to the sender
            choice, destinations = DestinationChoice.SENDER, [sender]
        return JobSpec(engine.bundle.name, request.outputs, request.series_uid, tuple(destinations), choice,
                       request.origin, request.phase, request.review)

    def open_job(self, request: JobRequest, supersedes: str | None = None, sender: str | None = None) -> Job:
        """A ``staging`` job whose input folder the caller fills; then :meth:`stage_and_enqueue`."""
        spec = self._spec(request, sender)
        if self.queue.start_error:
            raise ServiceUnavailable(f"no worker can run jobs ({self.queue.start_error}); see the service log")
        with self._admitting:  # the count and the new record as one step: parallel requests never pass the limit
            if self.store.active() >= self.settings.max_queue:
                raise QueueFull(f"the queue is full ({self.settings.max_queue} jobs waiting or running); retry later")
            job = self.store.create(spec, supersedes)
            self._staging.add(job.id)
        try:
            self.files.make_input_dir(job.id)
        except BaseException:
            self.discard(job.id)  # a full disk at mkdir: the record must not hold a queue slot until a restart
            raise
        return job

    def input_dir(self, job_id: str) -> Path:
        return self.files.input_dir(job_id)

    def _stage(self, job: Job) -> tuple[JobSpec, list[str], StagedInput]:
        engine = self.engine(job.model)
        staged = stage(self.files.input_dir(job.id), job.origin, job.spec.series_uid, {engine.bundle.modality},
                       self.settings.zip_limits(), job.spec.phase, self.settings.dicom_bounds())
        outputs, destinations, notes = settle_outputs(staged.kind, job.spec, sent=self._sent(job.spec.destinations))
        spec = JobSpec(job.spec.model, outputs, job.spec.series_uid, destinations, job.spec.destination_choice,
                       job.spec.origin, job.spec.phase, job.spec.review)
        return spec, notes, staged

    def _sent(self, destinations: tuple[str, ...]) -> tuple[Output, ...]:
        """The objects these destinations receive, together (one no longer configured: the SEG)."""
        sent: list[Output] = []
        for name in destinations:
            try:
                objects = self.settings.destination(name).objects
            except KeyError:
                objects = (Output.DICOM_SEG,)
            sent += [o for o in objects if o not in sent]
        return tuple(sent) or (Output.DICOM_SEG,)

    def stage_and_enqueue(self, job: Job) -> Job:
        """Check the job's input once, record what was chosen, queue it. Raises the input's error."""
        spec, notes, staged = self._stage(job)
        self._enqueue(job, staged, spec, notes)
        return self.get(job.id)

    def _enqueue(self, job: Job, staged: StagedInput, spec: JobSpec, notes: list[str]) -> None:
        self._staging.discard(job.id)
        if not self.store.mark_staged(job.id, staged, spec, notes):
            raise NotFound(f"segmentation job {job.id} was removed while its input was checked")
        self.queue.submit(job.id)
        self.metrics.queue_depth.set(self.store.active())

    def discard(self, job_id: str) -> None:
        """A job whose input never got staged, removed with its files (the client got the error). Files first: on a
        full disk they make the room the record's removal needs; a record that still cannot go stays ``staging``
        and is failed at the next start."""
        self._staging.discard(job_id)
        self.files.remove(job_id)
        try:
            self.store.cancel(job_id)
        except Exception as err:  # noqa: BLE001 - the caller's own error is the one to report
            log.error("job %s: its record could not be removed (%s)", job_id, type(err).__name__)

    def fail_staging(self, job_id: str, error: Exception) -> None:
        """A job whose input was refused, kept as a failed record (for inputs nobody is waiting on: C-STORE)."""
        self._staging.discard(job_id)
        self.files.remove_input(job_id)
        kind = ErrorKind.INPUT if isinstance(error, (InputError, PayloadTooLarge)) else ErrorKind.INTERNAL
        message = str(error) if kind == ErrorKind.INPUT else f"internal error: {type(error).__name__}"
        if kind == ErrorKind.INTERNAL:
            log.error("job %s: staging failed", job_id, exc_info=error)
        self.store.refuse(job_id, kind, message)
        log.warning("job %s failed on its input (the reason is on the job)", job_id)

    def pull(self, request: JobRequest, source: str, study_uid: str, series_uid: str) -> Job:
        """Retrieve a series from a configured source into a new job and queue it."""
        node = next((s for s in self.settings.sources if s.name == source), None)
        if node is None:
            known = ", ".join(s.name for s in self.settings.sources) or "none (CTSEG_SOURCES)"
            raise NotFound(f"unknown source {source!r}; configured: {known}")
        job = self.open_job(request)
        try:
            retrieve(node, study_uid, series_uid, self.files.input_dir(job.id), self.settings.dicom_ae_title)
            return self.stage_and_enqueue(job)
        except BaseException:
            self.discard(job.id)
            raise

    # ---------------------------------------------------------------------------------------- received series
    def route_received(self, series: ArrivedSeries, route: Route | None) -> None:
        """A received series is complete and quiet (server/dicomnode/listener.py): run it whole, or say why not."""
        arrivals = self._node()
        if route is None:
            arrivals.evaluated(series.series_uid, series.instances)
            self.metrics.dicom_series.labels("unrouted").inc()
            log.info("received %s series of %d slice(s) from %s: no route takes it; not run", series.modality or "?",
                     series.frames, series.calling_ae_title)
            return
        origin = Origin(OriginKind.DIMSE, calling_ae_title=series.calling_ae_title)
        request = JobRequest(route.model, route.outputs, series.series_uid, origin,
                             tuple(route.destinations) if route.destinations is not None else None,
                             PhaseChoice(route.phase) if route.phase is not None else None, route.review)
        try:
            job = self.open_job(request, supersedes=series.job_id, sender=series.sender)
        except ServiceUnavailable as err:  # full queue or no worker: the series waits and is tried again
            if series.series_uid not in self._waiting_series:  # one line per series, not one per round
                self._waiting_series.add(series.series_uid)
                log.warning("a received series waits: %s", err)
            return
        self._waiting_series.discard(series.series_uid)
        if not arrivals.begin_routing(series.series_uid, job.id, series.instances):
            self.discard(job.id)
            return
        self.metrics.dicom_series.labels("rerouted" if series.job_id else "routed").inc()
        self._stage_received(job, series)

    def _stage_received(self, job: Job, series: ArrivedSeries) -> None:
        """Link the series' instances into the job, stage it, replace the job made of an earlier part, queue it.
        A crash anywhere here is resumed at the next start (the arrival keeps ``staging_job`` until the end); an
        error of this side (a full disk, a locked database) gives the series back to be routed again."""
        arrivals = self._node()
        try:
            arrivals.link_into(series.series_uid, self.files.input_dir(job.id))
            try:
                spec, notes, staged = self._stage(job)
            except (InputError, PayloadTooLarge) as err:  # the series itself is refused: recorded on the job
                self._supersede(job, [])  # the earlier part is not the series either: its SEG is not sent
                self.fail_staging(job.id, err)
                arrivals.routed(series.series_uid, job.id)
                return
            self._supersede(job, notes)
            notes += self._unverified_sender(series)
            self._enqueue(job, staged, spec, notes)
        except Exception:
            log.exception("job %s: a received series could not be made into a job; it is tried again", job.id)
            self.discard(job.id)
            arrivals.abandon_routing(series.series_uid)
            return
        arrivals.routed(series.series_uid, job.id)
        log.info("job %s queued: %s series of %d slice(s) received from %s%s", job.id, series.modality,
                 series.frames, series.calling_ae_title, f", superseding job {job.supersedes}" if job.supersedes else "")

    def _unverified_sender(self, series: ArrivedSeries) -> list[str]:
        """A note when the series came with a DIMSE destination's AE title but not from its address."""
        claimed = [d.name for d in self.settings.destinations
                   if isinstance(d, DimseNode) and d.ae_title == series.calling_ae_title]
        if not claimed or series.sender is not None:
            return []
        names = ", ".join(map(repr, claimed))
        note = (f"no SEG back to the sender: the calling AE title {series.calling_ae_title} is destination {names}'s, "
                "but the association did not come from its address")
        return [note]

    def _supersede(self, job: Job, notes: list[str]) -> None:
        if job.supersedes is None:
            return
        outcome = self.store.supersede(job.supersedes, job.id)
        if outcome is None:
            return
        notes.append(f"supersedes job {job.supersedes}: more instances of the series arrived after it was made "
                     f"(it was {outcome.previous_state.value}); its {outcome.cancelled_deliveries} undelivered SEG(s) "
                     "are not sent")
        if outcome.reuse_seg_uids:
            notes.append(f"job {job.supersedes}'s SEG reached {', '.join(outcome.delivered_to)}: this SEG has the same "
                         "Series and SOP Instance UIDs, so a destination that overwrites instances replaces it; one "
                         "that keeps the first copy keeps the earlier SEG")
        log.warning("job %s supersedes job %s (more instances of its series arrived)", job.id, job.supersedes)

    def refuse_cut_off(self, series: ArrivedSeries) -> None:
        """A series cut off by an aborted association and not sent again within the hold: a failed job says so."""
        arrivals = self._node()
        spec = JobSpec(self.default_model, (Output.DICOM_SEG,), series.series_uid, (), DestinationChoice.DEFAULT,
                       Origin(OriginKind.DIMSE, calling_ae_title=series.calling_ae_title))
        job = self.store.create(spec)
        hold = self.settings.dicom_incomplete_hold_minutes
        self.store.refuse(job.id, ErrorKind.INPUT,
                          "not run: the association that sent this series ended without release (sender stopped or "
                          f"connection cut) and the series was not sent again complete within {hold:g} min; send it "
                          "again")
        log.warning("job %s: a received series cut off by an aborted association was not run", job.id)
        arrivals.cut_off(series.series_uid, series.instances)  # a complete resend still runs it

    # ---------------------------------------------------------------------------------------- reading
    def wait(self, job_id: str, timeout: float) -> bool:
        """Until the job is finished (or gone), polling the store: any process may be running it."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.store.get(job_id)
            if job is None or job.state.finished:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(WAIT_POLL_S)

    def cancel(self, job_id: str) -> None:
        if not self.store.cancel(job_id):  # a running job finds its claim gone at its next write and stops
            raise NotFound(f"no segmentation job {job_id}")
        self.files.remove(job_id)

    def release_held(self, job_id: str) -> Job:
        """A person reviewed the job's result and lets its held deliveries go: the outbox sends them now."""
        if not self.store.release_held(self._nothing_held(job_id, "release").id):
            raise NothingHeld(f"job {job_id} has no delivery waiting for review any more (released or discarded "
                              "meanwhile)")
        log.info("job %s: its held deliveries were released", job_id)
        self.outbox.wake()
        return self.get(job_id)

    def discard_held(self, job_id: str) -> Job:
        """A person reviewed the job's result and refused it: its held deliveries are never sent."""
        if not self.store.discard_held(self._nothing_held(job_id, "discard").id,
                                       "not sent: discarded at review"):
            raise NothingHeld(f"job {job_id} has no delivery waiting for review any more (released or discarded "
                              "meanwhile)")
        log.info("job %s: its held deliveries were discarded", job_id)
        return self.get(job_id)

    def _nothing_held(self, job_id: str, verb: str) -> Job:
        """The job, if it has deliveries held for review; else NotFound or NothingHeld saying why not."""
        job = self.get(job_id)
        if any(d.state == DeliveryState.HELD for d in self.store.deliveries(job_id)):
            return job
        if not job.spec.review:
            why = "its deliveries are not held for review (its route or request did not ask for review)"
        elif not job.state.finished:
            why = f"it is {job.state.value}; its deliveries are held once it has succeeded"
        elif job.state != JobState.SUCCEEDED:
            why = f"it is {job.state.value}, so it has nothing to send"
        else:
            why = "nothing of it is held any more (released or discarded already, or no destination)"
        raise NothingHeld(f"cannot {verb} job {job_id}: {why}")

    def viewer_link(self, job: Job) -> str | None:
        """The job's study in the configured viewer (OHIF's URL form), once it has DICOM input with a study."""
        viewer, staged = self.settings.viewer_url, job.staged
        if not viewer or staged is None or not staged.study_uid:
            return None
        return f"{viewer.rstrip('/')}/viewer?StudyInstanceUIDs={quote(staged.study_uid)}"

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no segmentation job {job_id}")
        return job

    def list_jobs(self, limit: int, state: JobState | None, before: float | None) -> list[Job]:
        return self.store.list(limit, state, before)

    def deliveries(self, job_id: str) -> list[Delivery]:
        return self.store.deliveries(job_id)

    def result_path(self, job_id: str, name: str) -> tuple[Path, ResultFile]:
        job = self.get(job_id)
        try:
            result = ResultFile(name)
        except ValueError:
            raise NotFound(f"no result named {name!r}") from None
        if job.state != JobState.SUCCEEDED:
            raise NotFound(f"job {job_id} is {job.state.value}; results exist once it has succeeded")
        if result not in job.results:
            raise NotFound(f"job {job_id} has no {name} (outputs requested: "
                           f"{', '.join(o.value for o in job.spec.outputs)})")
        return self.files.result_path(job, result), result

    def readiness(self) -> tuple[bool, str]:
        queue = getattr(self, "queue", None)
        ready = self.ready and queue is not None and queue.healthy and all(e.ready for e in self.engines.values())
        degraded = getattr(queue, "degraded", None)  # the workers' restart breaker open or half-open
        if ready:
            return True, f"degraded: {degraded}" if degraded else "ready"
        if queue is not None and queue.start_error:
            return False, f"no worker (degraded, recovers by itself): {queue.start_error}"
        if degraded and self.ready:
            return False, f"degraded: {degraded}"
        return False, "starting"

    def metrics_text(self) -> bytes:
        if self.arrivals is not None:
            for reason, n in self.arrivals.waiting().items():
                self.metrics.dicom_waiting.labels(reason).set(n)
        return self.metrics.render(self.store.counts(), self.store.outbox_stats())

    # ---------------------------------------------------------------------------------------- completion
    def _finished(self, job_id: str) -> None:
        """A run of the job ended (whatever its outcome): metrics, and deliveries may be due."""
        final = self.store.get(job_id)
        if final is not None and final.state.finished:
            self.metrics.jobs_finished.labels(state=final.state.value).inc()
            if final.timings:
                self.metrics.inference_seconds.observe(sum(final.timings.values()))
            if final.state == JobState.SUCCEEDED and ResultFile.VOLUMES in final.results:
                stored = read_flags(self.files.result_path(final, ResultFile.VOLUMES))
                if stored is not None:
                    self.metrics.count_quality_flags(stored.all_flags())
        self.metrics.queue_depth.set(self.store.active())
        self.outbox.wake()

    def _lost(self, claim: Claim, cause: str) -> None:
        """The worker process holding a run died: the run goes back to the queue (up to the attempt limit). An
        out-of-memory death was failed already (not run again), so this changes nothing for it."""
        requeued = self.store.release(claim, f"the worker process running it stopped ({cause})",
                                      self.settings.job_max_attempts)
        if requeued is not None:  # the run still held the job: what it wrote does not count
            self._count_requeue(requeued, "worker")
            self.files.remove_run(claim.job_id, claim.attempt)
        self._finished(claim.job_id)
