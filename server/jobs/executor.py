"""Runs one job from its stored input to its result files and final state; the same code in a thread or a process.

A run starts with a claim (queued -> running, attempt + 1) and holds a lease that a heartbeat thread renews every
third of ``job_lease_s``. Every write of the run carries its attempt: when the job was cancelled, superseded, or
given to another run because this one stopped renewing (a paused or partitioned worker), the write changes
nothing, the run stops at its next progress report and removes what it wrote. Results go to the run's own folder
(server/jobs/files.py), durably, before the success that points at them is committed; a lock held by another
connection delays that commit (server/core/database.py) and never turns a finished job into a failed one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from server.core.database import StoreBusy
from server.core.errors import InputError, NotFound, PayloadTooLarge, storage_full
from server.core.nodes import DimseNode
from server.core.settings import Settings
from server.core.vocabulary import ErrorKind, Output, ResultFile
from server.inference.engine import Engine
from server.inference.pipeline import run_pipeline
from server.jobs.files import JobFiles
from server.jobs.memory import is_allocation_failure, out_of_memory_message
from server.jobs.model import Claim, Job, JobResult
from server.jobs.store import JobStore

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """This run no longer holds the job (cancelled, superseded, or given to another run)."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Renews a claim's lease until stopped; ``lost`` once a renewal changed nothing."""

    def __init__(self, store: JobStore, claim: Claim, lease_s: float) -> None:
        self.store, self.claim, self.lease_s = store, claim, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"ctseg-lease-{claim.job_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.store.heartbeat(self.claim, self.lease_s):
                    log.warning("job %s: run %d lost its lease; stopping", self.claim.job_id, self.claim.attempt)
                    self.lost.set()
                    return
            except StoreBusy:
                continue  # the database is locked for everyone: nobody can take the job meanwhile
            except Exception:  # keep beating: a failed renewal only shortens the lease
                log.exception("job %s: lease renewal failed", self.claim.job_id)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost()


def fail_lost_run(store: JobStore, files: JobFiles, claim: Claim, kind: ErrorKind, message: str) -> bool:
    """A run whose worker process died, failed now instead of given back to the queue (it ran out of memory and
    would again). Fenced like any write of the run: a run that committed first keeps its result."""
    if not store.fail(claim, kind, message):
        return False
    files.remove_run(claim.job_id, claim.attempt)
    files.remove_input(claim.job_id)
    return True


class JobExecutor:
    def __init__(self, settings: Settings, engines: dict[str, Engine], store: JobStore, files: JobFiles) -> None:
        self.settings = settings
        self.engines = engines
        self.store = store
        self.files = files
        self.owner = worker_name()

    def run(self, job_id: str, on_claimed: Callable[[Claim], None] | None = None) -> None:
        """Run the job if it is still queued. Never raises for a job's own failure: it becomes the job's state."""
        claim = self.store.claim(job_id, self.owner, self.settings.job_lease_s)
        if claim is None:
            return  # taken by another run, cancelled or superseded meanwhile
        if on_claimed is not None:
            on_claimed(claim)
        job = self.store.get(job_id)
        if job is None:
            return
        with Heartbeat(self.store, claim, self.settings.job_lease_s) as beat:
            try:
                result = self._process(job, claim, beat)
                beat.check()
                if not self._commit(claim, job, result):
                    raise LeaseLost()
            except LeaseLost:
                log.info("job %s: run %d stopped (the job was cancelled, superseded or given to another run)",
                         job_id, claim.attempt)
                self.files.remove_run(job_id, claim.attempt)
                current = self.store.get(job_id)
                if current is None:
                    self.files.remove(job_id)
                elif current.state.finished:
                    self.files.remove_input(job_id)
                return
            except (InputError, PayloadTooLarge) as err:
                self.files.remove_run(job_id, claim.attempt)
                if self.store.fail(claim, ErrorKind.INPUT, str(err)):
                    log.info("job %s failed on its input (%s; the reason is on the job)", job_id, type(err).__name__)
                    self.files.remove_input(job_id)
                return
            except StoreBusy:
                # The results are on disk but the database stayed locked: the lease runs out and another run
                # repeats the job. Never recorded as a failure of the job.
                log.error("job %s: the database stayed locked; the job will run again", job_id)
                self.files.remove_run(job_id, claim.attempt)
                return
            except Exception as err:  # a bug or an environment problem: recorded, never lost
                self.files.remove_run(job_id, claim.attempt)
                if storage_full(err):
                    self._fail_on_full_disk(claim)
                    return
                if is_allocation_failure(err):  # the worker's memory cap (or the machine): it would fail again
                    log.error("job %s failed: out of memory (%s)", job_id, type(err).__name__)
                    message = out_of_memory_message(self.settings.worker_memory_mb,
                                                    f"an allocation failed ({type(err).__name__})")
                    if self.store.fail(claim, ErrorKind.OUT_OF_MEMORY, message):
                        self.files.remove_input(job_id)
                    return
                log.exception("job %s failed", job_id)
                if self.store.fail(claim, ErrorKind.INTERNAL, f"internal error: {type(err).__name__}"):
                    self.files.remove_input(job_id)
                return
        self.files.remove_input(job_id)
        self.files.remove_other_runs(job_id, claim.attempt)
        log.info("job %s succeeded in %.2f s (%s)", job_id, sum(result.timings.values()),
                 ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))

    def _fail_on_full_disk(self, claim: Claim) -> None:
        """The job's record says so; if even that cannot be written, this run's input (the largest part) is freed
        first, but only while this run still holds the job (a read, which needs no space)."""
        log.error("job %s failed: the storage is full", claim.job_id)
        message = ("the storage is full (no space left on device) while this job ran; free space in "
                   "CTSEG_STORAGE_DIR and submit it again")
        try:
            done = self.store.fail(claim, ErrorKind.INTERNAL, message)
        except Exception as err:
            if not storage_full(err):
                raise
            current = self.store.get(claim.job_id)
            if current is None or current.attempt != claim.attempt or current.state.finished:
                return
            self.files.remove_input(claim.job_id)
            done = self.store.fail(claim, ErrorKind.INTERNAL, message)
        if done:
            self.files.remove_input(claim.job_id)

    def _commit(self, claim: Claim, job: Job, result: JobResult) -> bool:
        """Success and the SEG's deliveries in one transaction: the outbox holds it before the job counts as done."""
        deliver_to = tuple((name, obj) for name in job.spec.destinations for obj in self._objects(name)
                           if obj in result.results)
        return self.store.succeed(claim, result, deliver_to)

    def _dimse_seg_destination(self, job: Job) -> bool:
        """A DIMSE destination gets this job's SEG: it may refuse the LABELMAP class at association (dcm4chee does
        by default), and is then sent the BINARY one."""
        for name in job.spec.destinations:
            try:
                node = self.settings.destination(name)
            except KeyError:
                continue
            if isinstance(node, DimseNode) and Output.DICOM_SEG in node.objects:
                return True
        return False

    def _objects(self, destination: str) -> tuple[ResultFile, ...]:
        """What the destination receives (its ``objects``); one no longer configured gets the SEG, as it was asked."""
        try:
            return tuple(o.result for o in self.settings.destination(destination).objects)
        except KeyError:
            return (ResultFile.SEG,)

    def _process(self, job: Job, claim: Claim, beat: Heartbeat) -> JobResult:
        engine = self.engines.get(job.model)
        if engine is None:
            raise NotFound(f"model {job.model!r} is not loaded")
        staged = job.staged
        if staged is None:
            raise RuntimeError(f"job {job.id} was queued without a staged input")
        inputs = [self.files.input_dir(job.id) / name for name in staged.files]  # chosen at staging
        last = [0.0]

        def progress(done: int, total: int) -> None:
            beat.check()
            now = time.perf_counter()
            if now - last[0] > 0.2 or done == total:
                last[0] = now
                try:
                    if not self.store.report_progress(claim, done, total):
                        raise LeaseLost()
                except StoreBusy:
                    pass  # progress is a courtesy; the lease decides

        result = run_pipeline(
            engine, staged.kind, inputs, self.files.run_dir(job.id, claim.attempt), job.spec.outputs,
            staged.series_uid, self.settings.seg_options(), progress, display_name=staged.display_name,
            result_id=job.seg_seed, bounds=self.settings.dicom_bounds(),
            binary_fallback=self._dimse_seg_destination(job),
        )
        return JobResult(tuple(result.produced), result.timings, tuple(job.notes) + tuple(result.notes))
