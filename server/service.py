"""The segmentation service: engines, the job store and the workers that run jobs off the event loop."""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from server.engine import Engine, engines_from_settings
from server.errors import NotFound, QueueFull, ServiceUnavailable
from server.jobs import Job, JobState, JobStore
from server.metrics import Metrics
from server.settings import Settings
from server.workers import ProcessWorkers, ThreadWorkers, Workers

log = logging.getLogger(__name__)

OUTPUT_FILES = {"labelmap.nii.gz", "seg.dcm", "preview.png", "volumes.json"}


@dataclass
class Submission:
    model: str
    input_kind: str  # nifti | dicom
    outputs: list[str]  # nifti, dicom-seg
    series_uid: str | None


class SegmentationService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # In process mode these engines give the bundles' facts only; the workers open the sessions.
        self.engines = engines_from_settings(settings)
        self.default_model = settings.default_model or next(iter(self.engines))
        if self.default_model not in self.engines:
            raise NotFound(f"default model {self.default_model!r} is not among the loaded bundles {sorted(self.engines)}")
        self.store = JobStore(settings.storage_dir)
        self.workers: Workers
        if settings.worker_mode == "process":
            self.workers = ProcessWorkers(settings, self._finished, self._crashed)
        else:
            self.workers = ThreadWorkers(settings, self.engines, self.store, self._finished)
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.ready = False

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        queued, interrupted = self.store.recover()
        if interrupted:
            log.warning("%d job(s) were interrupted by the last stop and are marked failed", len(interrupted))
        self.workers.start()
        for engine in self.engines.values():
            engine.ready = True  # warmed up by the workers (or by ThreadWorkers.start in this process)
        for job_id in queued:
            self._enqueue(job_id)
        self.cleanup()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
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

    def active_jobs(self) -> int:
        counts = self.store.counts()
        return counts[JobState.QUEUED.value] + counts[JobState.RUNNING.value]

    def create_job(self, sub: Submission) -> Job:
        if self.workers.start_error:
            raise ServiceUnavailable(f"no worker can run jobs ({self.workers.start_error}); see the service log")
        if self.active_jobs() >= self.settings.max_queue:
            raise QueueFull(f"the queue is full ({self.settings.max_queue} jobs waiting or running); retry later")
        return self.store.create(sub.model, sub.input_kind, {"outputs": sub.outputs, "series_uid": sub.series_uid})

    def enqueue(self, job: Job) -> None:
        self._enqueue(job.id)
        self.metrics.queue_depth.set(self.active_jobs())

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
            raise NotFound(f"job {job_id} has no {name} (outputs requested: {', '.join(job.params.get('outputs', []))})")
        return self.store.job_dir(job_id) / name

    # ---------------------------------------------------------------------------------------- completion
    def _finished(self, job_id: str) -> None:
        """A worker is done with the job (whatever its state): metrics, and wake a waiting request."""
        final = self.store.get(job_id)
        if final is not None:
            self.metrics.jobs_finished.labels(state=final.state.value).inc()
            if final.timings:
                self.metrics.inference_seconds.observe(sum(final.timings.values()))
        self.metrics.queue_depth.set(self.active_jobs())
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
            self.store.update(job_id, state=JobState.FAILED, error_kind="internal",
                              error=f"the worker process running this job stopped ({how}); submit it again")
            shutil.rmtree(self.store.job_dir(job_id) / "input", ignore_errors=True)
        self._finished(job_id)
