"""The queue of several machines: procrastinate on the shared PostgreSQL, one queue per model (``seg.<model>``).

API replicas and DICOM receivers defer a queued job's id; workers (``CTSEG_ROLE=worker``, one per GPU) take ids
from the queues of the models they hold, so a worker keeps its model loaded. procrastinate carries ids, never
decisions: the job's own row stays authoritative. A worker runs an id through the same executor as the single
box (claim with a compare-and-set on the state and attempt, lease with heartbeat, every write fenced), so an id
delivered twice finds the job claimed and does nothing, and procrastinate's own view of a job ("doing" after its
worker was SIGKILLed) decides nothing: the lease runs out, an API replica's sweeper requeues the run and defers the
id again. The sweeper also re-defers queued jobs whose entry was lost. A queueing lock per job id keeps at most one
entry waiting for it, so those re-deferrals never pile up.

procrastinate's schema is applied by Alembic revision 0002 (``ctseg db upgrade``), with the rest of the database.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from server.core.settings import Settings
from server.jobs.files import JobFiles
from server.jobs.model import JobState
from server.jobs.store import JobStore

if TYPE_CHECKING:
    import procrastinate

log = logging.getLogger(__name__)
TASK = "ctseg.run_job"


def queue_name(model: str) -> str:
    return f"seg.{model}"


def _conninfo(settings: Settings) -> str:
    url = settings.database_url.get_secret_value() if settings.database_url else ""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def make_app(settings: Settings, worker: bool = False) -> procrastinate.App:
    import procrastinate

    connector = (procrastinate.PsycopgConnector(conninfo=_conninfo(settings)) if worker
                 else procrastinate.SyncPsycopgConnector(conninfo=_conninfo(settings)))
    return procrastinate.App(connector=connector)


class SharedQueue:
    """:class:`server.jobs.queue.JobQueue` for API replicas and DICOM receivers: defer, never run."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings, self.store = settings, store
        self.start_error: str | None = None
        self.degraded: str | None = None
        self.app = make_app(settings)
        self._open = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self.app.open()
            self._open = True

    def submit(self, job_id: str) -> None:
        import procrastinate.exceptions

        job = self.store.get(job_id)
        if job is None or job.state != JobState.QUEUED:
            return
        try:
            self.app.configure_task(TASK, queue=queue_name(job.spec.model), queueing_lock=job_id).defer(job_id=job_id)
        except procrastinate.exceptions.AlreadyEnqueued:
            pass  # an entry for it waits already
        except procrastinate.exceptions.ConnectorException:
            log.warning("job %s could not be queued now (the database did not answer); the sweeper tries again",
                        job_id)

    def stop(self) -> None:
        with self._lock:
            if self._open:
                self.app.close()
                self._open = False

    @property
    def healthy(self) -> bool:
        return True


def run_worker(settings: Settings) -> int:
    """``ctseg serve`` with ``CTSEG_ROLE=worker``: take job ids from the queues of this worker's models and run each
    through the executor, one at a time, until SIGTERM (the job running then is finished first: give the pod a
    termination grace period above the longest job)."""
    from server.inference.engine import engines_from_settings
    from server.jobs.executor import JobExecutor
    from server.jobs.local_queue import open_store

    engines = engines_from_settings(settings)
    if settings.worker_models:
        missing = sorted(set(settings.worker_models) - set(engines))
        if missing:
            log.error("CTSEG_WORKER_MODELS names %s, not among this worker's bundles %s", missing, sorted(engines))
            return 2
        engines = {name: e for name, e in engines.items() if name in settings.worker_models}
    for engine in engines.values():
        log.info("warmed up %s in %.2f s", engine.bundle.name, engine.warm_up())
    store = open_store(settings)
    executor = JobExecutor(settings, engines, store, JobFiles(settings.storage_dir))
    app = make_app(settings, worker=True)

    @app.task(name=TASK)
    def run_job(job_id: str) -> None:
        executor.run(job_id)

    queues = [queue_name(m) for m in engines]
    log.info("worker %s takes jobs from %s", executor.owner, ", ".join(queues))
    try:  # procrastinate's signal handlers: SIGTERM finishes the running job, then stops
        with app.open():
            app.run_worker(queues=queues, concurrency=1, install_signal_handlers=True, listen_notify=True,
                           name=executor.owner)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0
