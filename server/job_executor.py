"""Runs one job from its stored input to its result files and final state; the same code in a thread or a process.

Everything it needs is in the job store (SQLite + files), so it runs as well in a worker process as next to the
event loop. Cancellation is the job's record disappearing: the API deletes it, the executor notices at its next
progress report (a store read, so it works across processes) and removes what it wrote meanwhile.
"""

from __future__ import annotations

import logging
import shutil
import time

from server.engine import Engine
from server.errors import InputError, NotFound, PayloadTooLarge, storage_full
from server.jobs import Job, JobState, JobStore
from server.pipeline import SegOptions, run_pipeline
from server.settings import Settings
from server.vocabulary import ErrorKind

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job was deleted while it ran."""


class JobExecutor:
    def __init__(self, settings: Settings, engines: dict[str, Engine], store: JobStore) -> None:
        self.settings = settings
        self.engines = engines
        self.store = store

    def run(self, job_id: str) -> None:
        """Never raises for a job's own failure: it is recorded as the job's state and error."""
        job = self.store.get(job_id)
        if job is None or job.state != JobState.QUEUED:
            return
        self.store.update(job_id, state=JobState.RUNNING)
        try:
            self._process(job)
        except Cancelled:
            log.info("job %s cancelled", job_id)
            if self.store.get(job_id) is None:  # deleted: results written meanwhile go too
                shutil.rmtree(self.store.job_dir(job_id), ignore_errors=True)
        except (InputError, PayloadTooLarge) as err:
            self._discard_results(job_id)
            self.store.fail(job_id, ErrorKind.INPUT, str(err))
            log.info("job %s failed on its input: %s", job_id, err)
        except Exception as err:  # a bug or an environment problem: recorded, never lost
            if storage_full(err):
                # Free what this job holds first (its input is the largest part), so its record can be written.
                shutil.rmtree(self.store.job_dir(job_id) / "input", ignore_errors=True)
                self._discard_results(job_id)
                log.error("job %s failed: the storage is full", job_id)
                self.store.fail(job_id, ErrorKind.INTERNAL, "the storage is full (no space left on device) while this "
                                                            "job ran; free space in CTSEG_STORAGE_DIR and submit it again")
                return
            log.exception("job %s failed", job_id)
            self._discard_results(job_id)
            self.store.fail(job_id, ErrorKind.INTERNAL, f"internal error: {type(err).__name__}")
        finally:
            shutil.rmtree(self.store.job_dir(job_id) / "input", ignore_errors=True)

    def _discard_results(self, job_id: str) -> None:
        """A failed job keeps its record and nothing else: no half-written or misleading results."""
        for path in self.store.job_dir(job_id).glob("*"):
            if path.is_file():
                path.unlink(missing_ok=True)

    def _check_cancel(self, job_id: str) -> None:
        if self.store.get(job_id) is None:
            raise Cancelled()

    def _process(self, job: Job) -> None:
        engine = self.engines.get(job.model)
        if engine is None:
            raise NotFound(f"model {job.model!r} is not loaded")
        staged = job.staged
        if staged is None:
            raise RuntimeError(f"job {job.id} was queued without a staged input")
        directory = self.store.job_dir(job.id)
        inputs = [directory / "input" / name for name in staged.files]  # chosen at staging; nothing re-decided
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 0.2 or done == total:
                last[0] = now
                self._check_cancel(job.id)
                self.store.update(job.id, progress_done=done, progress_total=total)

        s = self.settings
        result = run_pipeline(
            engine, staged.kind, inputs, directory, job.outputs_requested, staged.series_uid,
            SegOptions(s.seg_type, s.seg_keep_empty_frames, s.seg_compression), progress,
            display_name=staged.display_name, result_id=job.id,
        )
        self._check_cancel(job.id)  # deleted while finishing
        deliver_to = job.destinations if "seg.dcm" in result.produced else []
        # Success and the SEG's deliveries in one transaction: the outbox holds it before the job counts as done.
        if not self.store.succeed(job.id, result.timings, list(staged.notes) + result.notes, result.produced,
                                  deliver_to):
            raise Cancelled()  # deleted between the check and the update: its files go too
        log.info("job %s succeeded in %.2f s (%s)", job.id, sum(result.timings.values()),
                 ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
