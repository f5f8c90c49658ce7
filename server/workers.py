"""Where jobs run: worker processes (the default) or threads of the API process.

Processes, because preprocessing (SimpleITK resampling), NIfTI compression and DICOM encoding hold the GIL for
tenths of a second at a time: in threads they stall the event loop and status requests wait behind them. A worker
process also fails alone: if the kernel kills it (out of memory) its job is marked failed with the reason, a new
worker takes its place and the service keeps answering. Each worker opens its own ONNX Runtime sessions and reads
and writes jobs through the SQLite job store; the API process assigns jobs to idle workers over a pipe each, so
it always knows which job a worker holds. Threads (``worker_mode=thread``) remain for debugging and the smallest
memory footprint.
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
from typing import Any, Protocol

from server.engine import Engine, engines_from_settings
from server.job_executor import JobExecutor
from server.jobs import JobStore
from server.settings import Settings

log = logging.getLogger(__name__)

DoneFn = Callable[[str], None]
CrashFn = Callable[[str, int | None], None]  # job id, the worker's exit code


class WorkerStartError(RuntimeError):
    """A worker process could not load the bundles or open its sessions."""


class Workers(Protocol):
    start_error: str | None  # set when no worker can run any more

    def start(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def stop(self) -> None: ...
    @property
    def healthy(self) -> bool: ...



class ThreadWorkers:
    """Jobs in a thread pool of the API process, sharing its engines and job store."""

    def __init__(self, settings: Settings, engines: dict[str, Engine], store: JobStore, on_done: DoneFn) -> None:
        self.start_error: str | None = None
        self.engines = engines
        self.executor = JobExecutor(settings, engines, store)
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="ctseg-job")
        self.on_done = on_done

    def start(self) -> None:
        for engine in self.engines.values():
            log.info("warmed up %s in %.2f s", engine.bundle.name, engine.warm_up())

    def submit(self, job_id: str) -> None:
        self.pool.submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
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


def worker_main(settings_data: dict[str, Any], conn: mpc.Connection) -> None:
    """A worker process: load and warm the engines, then run the jobs the API process sends until ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when workers stop
    lock = threading.Lock()

    def send(message: tuple[str, Any]) -> None:
        with lock:  # log records may come from any thread
            conn.send(message)

    settings = Settings(**settings_data)
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(send)]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied module, naming source UIDs
    try:
        if settings.worker_niceness:
            os.nice(settings.worker_niceness)  # the API process's event loop goes first on a busy CPU
        engines = engines_from_settings(settings)
        for engine in engines.values():
            engine.warm_up()
        executor = JobExecutor(settings, engines, JobStore(settings.storage_dir))
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
        executor.run(job_id)
        send(("done", job_id))


@dataclass
class _Worker:
    process: BaseProcess
    conn: mpc.Connection
    ready: bool = False
    job: str | None = None


class ProcessWorkers:
    """``settings.concurrency`` worker processes, each running one job at a time."""

    def __init__(self, settings: Settings, on_done: DoneFn, on_crash: CrashFn, start_timeout_s: float = 300.0) -> None:
        self.settings = settings
        self.settings_data = settings.model_dump()
        self.on_done, self.on_crash = on_done, on_crash
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
        process = self._ctx.Process(target=worker_main, args=(self.settings_data, child), name="ctseg-worker",
                                    daemon=True)
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
            self._pending.append(job_id)
            self._dispatch()

    def _dispatch(self) -> None:  # under the lock
        for worker in self._workers:
            if not self._pending:
                return
            if worker.ready and worker.job is None and worker.process.is_alive():
                worker.job = self._pending.popleft()
                try:
                    worker.conn.send(worker.job)
                except OSError:  # it died just now: _replace hands the job back through on_crash
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

    def _receive(self, worker: _Worker) -> None:
        try:
            kind, value = worker.conn.recv()
        except (EOFError, OSError):
            return  # it died: its sentinel says so and _replace handles it
        if kind == "log":
            logging.getLogger(value.name).handle(value)
        elif kind == "done":
            with self._lock:
                worker.job = None
                self._dispatch()
            self.on_done(value)
        elif kind == "ready":
            with self._lock:
                worker.ready = True
                self._dispatch()
        elif kind == "error":
            self.start_error = value
            log.error("a replacement worker process could not start: %s", value)

    def _replace(self, dead: _Worker) -> None:
        with self._lock:
            if dead not in self._workers:
                return
            self._workers.remove(dead)
            job, code = dead.job, dead.process.exitcode
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < 60.0] + [now]
            if len(self._deaths) > 5 and self.start_error is None:
                self.start_error = f"{len(self._deaths)} worker processes stopped within a minute; not restarting"
                log.error(self.start_error)
            if self.start_error is None:
                self._workers.append(self._spawn())
        log.error("worker process %s stopped with exit code %s%s", dead.process.pid, code,
                  f" while running job {job}" if job else "")
        if job is not None:
            self.on_crash(job, code)

    def stop(self) -> None:
        self._stopping = True
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=2.0)
            if worker.process.is_alive():  # mid-job: the job is marked interrupted at the next start
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
