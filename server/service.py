"""The segmentation service: engines, the job store and the workers that run jobs off the event loop."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from server.engine import Engine, load_engines
from server.errors import InputError, NotFound, PayloadTooLarge, QueueFull
from server.jobs import Job, JobState, JobStore
from server.metrics import Metrics
from server.pipeline import SegOptions, run_pipeline
from server.settings import Settings

log = logging.getLogger(__name__)

OUTPUT_FILES = {"labelmap.nii.gz", "seg.dcm", "preview.png", "volumes.json"}


class Cancelled(Exception):
    pass


@dataclass
class Submission:
    model: str
    input_kind: str  # nifti | dicom
    outputs: list[str]  # nifti, dicom-seg
    series_uid: str | None


class SegmentationService:
    def __init__(self, settings: Settings, engines: dict[str, Engine] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engines = engines if engines is not None else load_engines(
            settings.bundle_dirs, device=settings.device, threads=settings.ort_threads, overlap=settings.sw_overlap,
            batch_size=settings.sw_batch, float16_accumulation=settings.accumulate_float16,
        )
        self.default_model = settings.default_model or next(iter(self.engines))
        if self.default_model not in self.engines:
            raise NotFound(f"default model {self.default_model!r} is not among the loaded bundles {sorted(self.engines)}")
        self.store = JobStore(settings.storage_dir)
        self.executor = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="ctseg-job")
        self._events: dict[str, threading.Event] = {}
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self.ready = False

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for engine in self.engines.values():
            seconds = engine.warm_up()
            log.info("warmed up %s in %.2f s", engine.bundle.name, seconds)
        queued, interrupted = self.store.recover()
        if interrupted:
            log.warning("%d job(s) were interrupted by the last stop and are marked failed", len(interrupted))
        for job_id in queued:
            self._enqueue(job_id)
        self.cleanup()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self.executor.shutdown(wait=False, cancel_futures=True)
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
        if self.active_jobs() >= self.settings.max_queue:
            raise QueueFull(f"the queue is full ({self.settings.max_queue} jobs waiting or running); retry later")
        return self.store.create(sub.model, sub.input_kind, {"outputs": sub.outputs, "series_uid": sub.series_uid})

    def enqueue(self, job: Job) -> None:
        self._enqueue(job.id)
        self.metrics.queue_depth.set(self.active_jobs())

    def _enqueue(self, job_id: str) -> None:
        with self._lock:
            self._events[job_id] = threading.Event()
        self.executor.submit(self._run, job_id)

    def wait(self, job_id: str, timeout: float) -> bool:
        event = self._events.get(job_id)
        return True if event is None else event.wait(timeout)

    def cancel(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no segmentation job {job_id}")
        if job.state == JobState.RUNNING:
            self._cancel.add(job_id)
        self.store.delete(job_id)
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

    # ---------------------------------------------------------------------------------------- execution
    def _run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.state != JobState.QUEUED:
            return
        self.store.update(job_id, state=JobState.RUNNING)
        self.metrics.queue_depth.set(self.active_jobs())
        start = time.perf_counter()
        try:
            self._process(job)
        except Cancelled:
            log.info("job %s cancelled", job_id)
            if self.store.get(job_id) is None:  # deleted: results written meanwhile go too
                shutil.rmtree(self.store.job_dir(job_id), ignore_errors=True)
        except (InputError, PayloadTooLarge) as err:
            self.store.update(job_id, state=JobState.FAILED, error=str(err), error_kind="input")
            log.info("job %s failed on its input: %s", job_id, err)
        except Exception as err:  # a bug or an environment problem: recorded, never lost
            log.exception("job %s failed", job_id)
            self.store.update(job_id, state=JobState.FAILED, error=f"internal error: {type(err).__name__}", error_kind="internal")
        finally:
            shutil.rmtree(self.store.job_dir(job_id) / "input", ignore_errors=True)
            self._cancel.discard(job_id)
            final = self.store.get(job_id)
            if final is not None:
                self.metrics.jobs_finished.labels(state=final.state.value).inc()
            self.metrics.inference_seconds.observe(time.perf_counter() - start)
            self.metrics.queue_depth.set(self.active_jobs())
            event = self._events.pop(job_id, None)
            if event:
                event.set()

    def _check_cancel(self, job_id: str) -> None:
        if job_id in self._cancel:
            raise Cancelled()

    def _process(self, job: Job) -> None:
        engine = self.engine(job.model)
        directory = self.store.job_dir(job.id)
        inputs = sorted(p for p in (directory / "input").rglob("*") if p.is_file())  # zips were unpacked on upload
        last = [0.0]

        def progress(done: int, total: int) -> None:
            self._check_cancel(job.id)
            now = time.perf_counter()
            if now - last[0] > 0.2 or done == total:
                last[0] = now
                self.store.update(job.id, progress_done=done, progress_total=total)

        s = self.settings
        result = run_pipeline(
            engine, inputs, directory, job.params.get("outputs", ["nifti"]), job.params.get("series_uid"),
            SegOptions(s.seg_type, s.seg_keep_empty_frames, s.seg_compression), progress,
            display_name=inputs[0].name.split("_", 1)[-1] if inputs else None,
        )
        if self.store.get(job.id) is None:  # deleted while finishing
            raise Cancelled()
        self.store.update(job.id, state=JobState.SUCCEEDED, timings=result.timings, notes=result.notes,
                          outputs=result.produced)
        log.info("job %s succeeded in %.2f s (%s)", job.id, sum(result.timings.values()),
                 ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
