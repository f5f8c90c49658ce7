"""The embedded job queue: worker processes on this machine (the default), or threads of the API process.

Processes, because preprocessing (SimpleITK resampling), NIfTI compression and DICOM encoding hold the GIL for
tenths of a second at a time: in threads they stall the event loop and status requests wait behind them. A worker
process also fails alone: if the kernel kills it (out of memory) its run is given back to the queue (up to
``job_max_attempts``), a new worker takes its place and the service keeps answering.

Workers die with the service: each watches its parent and exits the moment the parent is gone (a SIGKILL of the
API process included), so an orphan never finishes a job that the restarted service runs again; and were one to
try, its writes carry a stale attempt and change nothing (server/jobs/executor.py).
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from models.logs import RedactingFormatter
from server.core.settings import Settings
from server.inference.engine import Engine, engines_from_settings
from server.jobs.executor import JobExecutor
from server.jobs.files import JobFiles
from server.jobs.model import Claim
from server.jobs.queue import DoneFn, LostFn
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import JobStore

log = logging.getLogger(__name__)

PARENT_CHECK_S = 0.1
CRASH_LOOP = (5, 60.0)  # more than 5 worker deaths within 60 s: stop replacing them


class WorkerStartError(RuntimeError):
    """A worker process could not load the bundles or open its sessions."""


def open_store(settings: Settings) -> SqliteJobStore:
    return SqliteJobStore(settings.storage_dir, settings.db_busy_timeout_s, settings.db_patience_s)


class ThreadWorkers:
    """Jobs in a thread pool of the API process, sharing its engines and job store."""

    def __init__(self, settings: Settings, engines: dict[str, Engine], store: JobStore, files: JobFiles,
                 on_done: DoneFn) -> None:
        self.start_error: str | None = None
        self.engines = engines
        self.executor = JobExecutor(settings, engines, store, files)
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="ctseg-job")
        self.on_done = on_done
        self._waiting: set[str] = set()  # submitted, not started: the sweeper's re-submissions are not piled up
        self._lock = threading.Lock()

    def start(self) -> None:
        for engine in self.engines.values():
            log.info("warmed up %s in %.2f s", engine.bundle.name, engine.warm_up())

    def submit(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._waiting:
                return
            self._waiting.add(job_id)
        self.pool.submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
        with self._lock:
            self._waiting.discard(job_id)
        try:
            self.executor.run(job_id)
        finally:
            self.on_done(job_id)

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        return True


class _PipeLogHandler(logging.handlers.QueueHandler):
    """Sends a worker's log records to the API process, which hands them to its own loggers: one log."""

    def __init__(self, send: Callable[[tuple[str, Any]], None]) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.send = send

    def enqueue(self, record: logging.LogRecord) -> None:
        self.send(("log", record))


def _die_with(parent: int) -> None:
    """Exit at once when the parent is gone (re-parented: getppid changes). A thread, so it acts mid-inference."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)  # nothing of a run may outlive the service that owns it
            time.sleep(PARENT_CHECK_S)
    threading.Thread(target=watch, name="ctseg-parent-watch", daemon=True).start()


def worker_main(settings_data: dict[str, Any], conn: mpc.Connection, parent: int) -> None:
    """A worker process: load and warm the engines, then run the jobs the API process sends until ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when workers stop
    _die_with(parent)
    lock = threading.Lock()

    def send(message: tuple[str, Any]) -> None:
        with lock:  # log records may come from any thread
            conn.send(message)

    settings = Settings(**settings_data)
    root = logging.getLogger()
    handler = _PipeLogHandler(send)  # records go to the API process formatted, tracebacks without messages
    handler.setFormatter(RedactingFormatter("%(message)s", messages=settings.log_exception_messages))
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied module, naming source UIDs
    try:
        if settings.worker_niceness:
            os.nice(settings.worker_niceness)  # the API process's event loop goes first on a busy CPU
        engines = engines_from_settings(settings)
        for engine in engines.values():
            engine.warm_up()
        executor = JobExecutor(settings, engines, open_store(settings), JobFiles(settings.storage_dir))
    except Exception as err:
        send(("error", f"{type(err).__name__}: {err}"))
        return
    send(("ready", None))
    while True:
        try:
            job_id = conn.recv()
        except EOFError:  # the API process went away
            return
        if job_id is None:
            return
        executor.run(job_id, on_claimed=lambda claim: send(("claimed", (claim.job_id, claim.attempt, claim.owner))))
        send(("done", job_id))


@dataclass
class _Worker:
    process: BaseProcess
    conn: mpc.Connection
    ready: bool = False
    job: str | None = None
    claim: Claim | None = None


class ProcessWorkers:
    """``settings.concurrency`` worker processes, each running one job at a time."""

    def __init__(self, settings: Settings, on_done: DoneFn, on_lost: LostFn, start_timeout_s: float = 300.0) -> None:
        self.settings = settings
        self.settings_data = settings.model_dump()
        self.on_done, self.on_lost = on_done, on_lost
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")  # no fork of a process that holds threads and sessions
        self._lock = threading.Lock()
        self._pending: deque[str] = deque()
        self._workers: list[_Worker] = []
        self._stopping = False
        self._monitor: threading.Thread | None = None
        self.start_error: str | None = None
        self._deaths: list[float] = []

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=worker_main, args=(self.settings_data, child, os.getpid()),
                                    name="ctseg-worker", daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def start(self) -> None:
        t = time.perf_counter()
        self._workers = [self._spawn() for _ in range(self.settings.concurrency)]
        deadline = time.monotonic() + self.start_timeout_s
        for worker in self._workers:
            reason = f"not ready within {self.start_timeout_s:.0f} s"
            while worker.conn.poll(max(0.0, deadline - time.monotonic())):
                try:
                    kind, value = worker.conn.recv()
                except EOFError:
                    worker.process.join(timeout=5.0)
                    kind, value = "error", f"it exited with code {worker.process.exitcode}"
                if kind == "log":
                    logging.getLogger(value.name).handle(value)
                    continue
                worker.ready = kind == "ready"
                reason = value
                break
            if not worker.ready:
                self.stop()
                raise WorkerStartError(f"a worker process could not start: {reason}")
        log.info("%d worker process(es) ready in %.2f s", len(self._workers), time.perf_counter() - t)
        self._monitor = threading.Thread(target=self._watch, name="ctseg-workers", daemon=True)
        self._monitor.start()

    def submit(self, job_id: str) -> None:
        with self._lock:
            if job_id not in self._pending:
                self._pending.append(job_id)
            self._dispatch()

    def _dispatch(self) -> None:  # under the lock
        for worker in self._workers:
            if not self._pending:
                return
            if worker.ready and worker.job is None and worker.process.is_alive():
                worker.job, worker.claim = self._pending.popleft(), None
                try:
                    worker.conn.send(worker.job)
                except OSError:  # it died just now: _replace hands the job back
                    pass

    def _watch(self) -> None:
        while not self._stopping:
            with self._lock:
                workers = list(self._workers)
            by_conn = {w.conn: w for w in workers}
            for ready in mpc.wait([*by_conn, *(w.process.sentinel for w in workers)], timeout=1.0):
                worker = by_conn.get(ready)  # type: ignore[call-overload]
                if worker is not None:
                    self._receive(worker)
            for worker in workers:
                if not worker.process.is_alive() and not self._stopping:
                    self._replace(worker)

    def _receive(self, worker: _Worker) -> bool:
        try:
            kind, value = worker.conn.recv()
        except (EOFError, OSError):
            return False  # it died: its sentinel says so and _replace handles it
        if kind == "log":
            logging.getLogger(value.name).handle(value)
        elif kind == "claimed":
            worker.claim = Claim(*value)
        elif kind == "done":
            with self._lock:
                worker.job, worker.claim = None, None
                self._dispatch()
            self.on_done(value)
        elif kind == "ready":
            with self._lock:
                worker.ready = True
                self._dispatch()
        elif kind == "error":  # it exits now; its replacement counts towards the crash loop like any death
            log.error("a replacement worker process could not start: %s", value)
        return True

    def _replace(self, dead: _Worker) -> None:
        try:  # what it said before it died (its claim, its last log lines)
            while dead.conn.poll(0) and self._receive(dead):
                pass
        except (EOFError, OSError):
            pass
        with self._lock:
            if dead not in self._workers:
                return
            self._workers.remove(dead)
            job, claim, code = dead.job, dead.claim, dead.process.exitcode
            now = time.monotonic()
            limit, window = CRASH_LOOP
            self._deaths = [t for t in self._deaths if now - t < window] + [now]
            if len(self._deaths) > limit and self.start_error is None:
                self.start_error = f"{len(self._deaths)} worker processes stopped within a minute; not restarting"
                log.error(self.start_error)
            if self.start_error is None:
                self._workers.append(self._spawn())
        log.error("worker process %s stopped with exit code %s%s", dead.process.pid, code,
                  f" while running job {job}" if job else "")
        if claim is not None:
            self.on_lost(claim, code)
        elif job is not None:  # sent, not yet claimed: it is still queued
            self.submit(job)

    def stop(self) -> None:
        self._stopping = True
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=2.0)
            if worker.process.is_alive():  # mid-job: its run is given back to the queue at the next start
                worker.process.terminate()
                worker.process.join(timeout=2.0)

    @property
    def healthy(self) -> bool:
        with self._lock:
            return any(w.ready and w.process.is_alive() for w in self._workers)

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid is not None]

    def running(self) -> dict[int, str]:
        """Worker pid -> the job it runs."""
        with self._lock:
            return {w.process.pid: w.job for w in self._workers if w.job is not None and w.process.pid is not None}
