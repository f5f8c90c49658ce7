"""The segmentation service: engines, the job store, the workers, the outbox and the DICOM node.

Every job, whatever brought its input, goes the same way: :meth:`SegmentationService.open_job` (a ``staging``
record and an empty input folder), the caller fills the folder (upload, C-STORE, pull),
:meth:`SegmentationService.stage_and_enqueue` checks it once (server/staging.py) and queues it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from server.dicom_listener import DicomListener
from server.engine import Engine, engines_from_settings
from server.errors import InputError, NotFound, PayloadTooLarge, QueueFull, ServiceUnavailable
from server.incoming import IncomingSeries, IncomingStore
from server.job_input import Origin
from server.jobs import Job, JobState, JobStore
from server.metrics import Metrics
from server.nodes import DimseNode, Route
from server.outbox import Outbox
from server.settings import Settings
from server.sources import retrieve
from server.staging import stage
from server.vocabulary import ErrorKind, InputKind, OriginKind, Output
from server.workers import ProcessWorkers, ThreadWorkers, Workers

log = logging.getLogger(__name__)

OUTPUT_FILES = {"labelmap.nii.gz", "seg.dcm", "preview.png", "volumes.json"}


@dataclass(frozen=True)
class JobRequest:
    """What is asked of a job before its input is known."""

    model: str | None
    outputs: tuple[Output, ...]
    series_uid: str | None
    origin: Origin
    destinations: tuple[str, ...] | None = None  # None: the default rule (sender, else the default destinations)


class SegmentationService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # In process mode these engines give the bundles' facts only; the workers open the sessions.
        self.engines = engines_from_settings(settings)
        self.default_model = settings.default_model or next(iter(self.engines))
        if self.default_model not in self.engines:
            raise NotFound(f"default model {self.default_model!r} is not among the loaded bundles {sorted(self.engines)}")
        for route in settings.routes:
            if route.model is not None and route.model not in self.engines:
                raise NotFound(f"a route names model {route.model!r}, which is not among {sorted(self.engines)}")
        self.store = JobStore(settings.storage_dir)
        self.workers: Workers
        if settings.worker_mode == "process":
            self.workers = ProcessWorkers(settings, self._finished, self._crashed)
        else:
            self.workers = ThreadWorkers(settings, self.engines, self.store, self._finished)
        self.outbox = Outbox(settings, self.store, self.metrics)
        self.listener: DicomListener | None = None
        if settings.dicom_port is not None:
            self.listener = DicomListener(settings, IncomingStore(settings.storage_dir), self.metrics, self.route_received)
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._waiting: set[str] = set()  # received series that wait for room in the queue
        self.ready = False

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        # Uploads, received instances and results hold patient data: readable by the service user only. Set before
        # the worker processes start, which inherit it.
        os.umask(0o077)
        self.settings.storage_dir.chmod(0o700)
        queued, interrupted = self.store.recover()
        if interrupted:
            log.warning("%d job(s) were interrupted by the last stop and are marked failed", len(interrupted))
        self.workers.start()
        for engine in self.engines.values():
            engine.ready = True  # warmed up by the workers (or by ThreadWorkers.start in this process)
        for job_id in queued:
            self._enqueue(job_id)
        self.cleanup()
        self.outbox.start()
        if self.listener is not None:
            self.listener.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        if self.listener is not None:
            self.listener.stop()
        self.outbox.stop()
        self.workers.stop()
        self.store.close()

    def cleanup(self) -> int:
        expired = self.store.expired(self.settings.retention_hours * 3600)
        for job_id in expired:
            self.store.delete(job_id)
        return len(expired)

    # ---------------------------------------------------------------------------------------- jobs
    def engine(self, name: str | None) -> Engine:
        key = name or self.default_model
        if key not in self.engines:
            raise NotFound(f"unknown model {key!r}; available: {', '.join(sorted(self.engines))}")
        return self.engines[key]

    def _destinations_for(self, request: JobRequest) -> list[str]:
        known = {d.name for d in self.settings.destinations}
        if request.destinations is not None:
            unknown = [n for n in request.destinations if n not in known]
            if unknown:
                raise InputError(f"unknown destination(s) {', '.join(map(repr, unknown))}; configured: "
                                 f"{', '.join(sorted(known)) or 'none (CTSEG_DESTINATIONS)'}")
            return list(dict.fromkeys(request.destinations))
        if request.origin.kind == OriginKind.DIMSE:  # back to the sender when it is a destination
            sender = [d.name for d in self.settings.destinations
                      if isinstance(d, DimseNode) and d.ae_title == request.origin.calling_ae_title]
            if sender:
                return sender[:1]
        return list(self.settings.default_destinations)

    def open_job(self, request: JobRequest) -> Job:
        """A ``staging`` job whose input folder the caller fills; then :meth:`stage_and_enqueue`."""
        engine = self.engine(request.model)
        destinations = self._destinations_for(request)
        if self.workers.start_error:
            raise ServiceUnavailable(f"no worker can run jobs ({self.workers.start_error}); see the service log")
        if self.store.active() >= self.settings.max_queue:
            raise QueueFull(f"the queue is full ({self.settings.max_queue} jobs waiting or running); retry later")
        params = {"outputs": [o.value for o in request.outputs], "series_uid": request.series_uid,
                  "destinations_named": request.destinations is not None}
        job = self.store.create(engine.bundle.name, params, request.origin, destinations)
        self.input_dir(job.id).mkdir()
        return job

    def input_dir(self, job_id: str) -> Path:
        return self.store.job_dir(job_id) / "input"

    def stage_and_enqueue(self, job: Job) -> Job:
        """Check the job's input once, record what was chosen, queue it. Raises the input's error."""
        engine = self.engine(job.model)
        staged = stage(self.input_dir(job.id), job.origin or Origin(OriginKind.UPLOAD), job.params.get("series_uid"),
                       {engine.bundle.modality}, self.settings.zip_limits())
        outputs = list(job.outputs_requested)
        destinations = list(job.destinations)
        if staged.kind == InputKind.NIFTI and destinations:
            if job.params.get("destinations_named"):
                raise InputError("destinations receive a DICOM-SEG, which needs DICOM input: a NIfTI file carries no "
                                 "source instances to reference")
            destinations = []  # default destinations take the SEGs of DICOM jobs only
        if destinations and Output.DICOM_SEG.value not in outputs:
            outputs.append(Output.DICOM_SEG.value)  # a destination is a request for the SEG
        self.store.update(job.id, params={**job.params, "outputs": outputs}, destinations=destinations)
        self.store.staged(job.id, staged)
        self._enqueue(job.id)
        self.metrics.queue_depth.set(self.store.active())
        return self.get(job.id)

    def discard(self, job_id: str) -> None:
        """A job whose input never got staged, removed with its files (the client got the error)."""
        self.store.delete(job_id)

    def fail_staging(self, job_id: str, error: Exception) -> None:
        """A job whose input was refused, kept as a failed record (for inputs nobody is waiting on: C-STORE)."""
        shutil.rmtree(self.input_dir(job_id), ignore_errors=True)
        kind = ErrorKind.INPUT if isinstance(error, (InputError, PayloadTooLarge)) else ErrorKind.INTERNAL
        message = str(error) if kind == ErrorKind.INPUT else f"internal error: {type(error).__name__}"
        self.store.fail(job_id, kind, message)
        log.warning("job %s failed on its input: %s", job_id, message)

    def pull(self, request: JobRequest, source: str, study_uid: str, series_uid: str) -> Job:
        """Retrieve a series from a configured source into a new job and queue it."""
        node = next((s for s in self.settings.sources if s.name == source), None)
        if node is None:
            known = ", ".join(s.name for s in self.settings.sources) or "none (CTSEG_SOURCES)"
            raise NotFound(f"unknown source {source!r}; configured: {known}")
        job = self.open_job(request)
        try:
            retrieve(node, study_uid, series_uid, self.input_dir(job.id), self.settings.dicom_ae_title)
            return self.stage_and_enqueue(job)
        except BaseException:
            self.discard(job.id)
            raise

    def route_received(self, series: IncomingSeries, route: Route | None) -> None:
        """A received series is complete (server/dicom_listener.py): run it, or say why not."""
        listener = self.listener
        if listener is None:
            raise RuntimeError("route_received needs the DICOM listener")
        origin = Origin(OriginKind.DIMSE, calling_ae_title=series.calling_ae_title)
        if route is None and not series.aborted:
            listener.incoming.drop(series.series_uid)
            self.metrics.dicom_series.labels("unrouted").inc()
            log.info("received %s series of %d slice(s) from %s: no route takes it; dropped", series.modality or "?",
                     series.frames, series.calling_ae_title)
            return
        request = JobRequest(route.model if route else None, (Output.DICOM_SEG,), series.series_uid, origin,
                             tuple(route.destinations) if route and route.destinations is not None else None)
        try:
            job = self.open_job(request)
        except ServiceUnavailable as err:  # full queue or no worker: the series waits and is tried again
            if series.series_uid not in self._waiting:  # one line per series, not one per routing round
                self._waiting.add(series.series_uid)
                log.warning("a received series waits: %s", err)
            return
        self._waiting.discard(series.series_uid)
        if not listener.incoming.take(series.series_uid, self.input_dir(job.id)):
            self.discard(job.id)
            return
        if series.aborted:
            self.metrics.dicom_series.labels("aborted").inc()
            self.fail_staging(job.id, InputError(
                "not run: the association that sent this series ended without release (sender stopped or "
                "connection cut), so the series may be incomplete; send it again"))
            return
        self.metrics.dicom_series.labels("routed").inc()
        try:
            self.stage_and_enqueue(self.get(job.id))
            log.info("job %s queued: %s series of %d slice(s) received from %s", job.id, series.modality,
                     series.frames, series.calling_ae_title)
        except Exception as err:  # noqa: BLE001 - every refusal is recorded on the job
            self.fail_staging(job.id, err)

    def _enqueue(self, job_id: str) -> None:
        with self._lock:
            self._events[job_id] = threading.Event()
        self.workers.submit(job_id)

    def wait(self, job_id: str, timeout: float) -> bool:
        event = self._events.get(job_id)
        return True if event is None else event.wait(timeout)

    def cancel(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no segmentation job {job_id}")
        self.store.delete(job_id)  # a running job notices at its next progress report and stops
        event = self._events.pop(job_id, None)
        if event:
            event.set()

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no segmentation job {job_id}")
        return job

    def result_path(self, job_id: str, name: str) -> Path:
        job = self.get(job_id)
        if name not in OUTPUT_FILES:
            raise NotFound(f"no result named {name!r}")
        if job.state != JobState.SUCCEEDED:
            raise NotFound(f"job {job_id} is {job.state.value}; results exist once it has succeeded")
        if name not in job.outputs:
            raise NotFound(f"job {job_id} has no {name} (outputs requested: {', '.join(job.outputs_requested)})")
        return self.store.job_dir(job_id) / name

    # ---------------------------------------------------------------------------------------- completion
    def _finished(self, job_id: str) -> None:
        """A worker is done with the job (whatever its state): metrics, deliveries, and wake a waiting request."""
        final = self.store.get(job_id)
        if final is not None:
            self.metrics.jobs_finished.labels(state=final.state.value).inc()
            if final.timings:
                self.metrics.inference_seconds.observe(sum(final.timings.values()))
        self.metrics.queue_depth.set(self.store.active())
        self.outbox.wake()
        event = self._events.pop(job_id, None)
        if event:
            event.set()

    def _crashed(self, job_id: str, exit_code: int | None) -> None:
        """The worker process holding the job stopped: fail it with the reason, or queue it again if not begun."""
        job = self.store.get(job_id)
        if job is not None and job.state == JobState.QUEUED:
            self.workers.submit(job_id)
            return
        if job is not None and job.state == JobState.RUNNING:
            how = "killed (out of memory?)" if exit_code == -9 else f"exit code {exit_code}"
            self.store.fail(job_id, ErrorKind.INTERNAL, f"the worker process running this job stopped ({how}); "
                                                        "submit it again")
            shutil.rmtree(self.input_dir(job_id), ignore_errors=True)
        self._finished(job_id)
