"""The embedded job queue: worker processes on this machine (the default), or threads of the API process.

Processes, because preprocessing (SimpleITK resampling), NIfTI compression and DICOM encoding hold the GIL for
tenths of a second at a time: in threads they stall the event loop and status requests wait behind them. A worker
process also fails alone: a worker that dies gives its run back to the queue (up to ``job_max_attempts``), a
new worker takes its place and the service keeps answering. One that ran out of memory (server/jobs/memory.py
says which deaths did) fails its job at once, naming it: a second run would need the same memory.

Worker deaths go through a circuit breaker: more than 5 within a minute (a crash loop, an out-of-memory storm)
open it, and no worker is started for ``worker_restart_backoff_s``, doubled each time it opens again within a
minute of closing (up to ``worker_restart_backoff_max_s``); then one worker is tried (half-open), and the breaker
closes when that worker is ready. A tried worker that dies, or is not ready within ``start_timeout_s`` (it is
killed), opens it again for longer. Closing clears the count of deaths: a storm is judged afresh. The service never
stays without workers until someone restarts it, and the thread that watches the workers survives any error of one
round (a locked database included): what a dead worker's run still needs is retried, else the lease sweeper
(server/service.py) gives the run back when its lease runs out.

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
from server.core.vocabulary import ErrorKind
from server.inference.engine import Engine, engines_from_settings
from server.jobs.executor import JobExecutor, fail_lost_run
from server.jobs.files import JobFiles
from server.jobs.memory import (
    Death,
    OomCounter,
    apply_cap,
    classify_death,
    is_allocation_failure,
    out_of_memory_message,
    rss_bytes,
)
from server.jobs.model import Claim
from server.jobs.queue import DoneFn, LostFn
from server.core.database import Database
from server.jobs.sql_store import SqlJobStore
from server.jobs.store import JobStore

log = logging.getLogger(__name__)

PARENT_CHECK_S = 0.1
CRASH_LOOP = (5, 60.0)  # more than 5 worker deaths within 60 s open the breaker (no new worker for a while)
RSS_SAMPLE_S = 0.5  # how often the API process notes each worker's resident memory


class WorkerStartError(RuntimeError):
    """A worker process could not load the bundles or open its sessions."""


def open_store(settings: Settings, migrate: bool = True, read_patience_s: float | None = None) -> SqlJobStore:
    """The job store the settings name (CTSEG_DATABASE_URL, else SQLite in the storage folder)."""
    return SqlJobStore(Database.from_settings(settings, read_patience_s), migrate)


class ThreadWorkers:
    """Jobs in a thread pool of the API process, sharing its engines and job store."""

    def __init__(self, settings: Settings, engines: dict[str, Engine], store: JobStore, files: JobFiles,
                 on_done: DoneFn) -> None:
        self.start_error: str | None = None
        self.degraded: str | None = None
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
    apply_cap(settings_data["worker_memory_mb"])  # before anything is loaded: the bundles count too
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
        if is_allocation_failure(err):
            send(("error", (f"out of memory while loading the bundles (CTSEG_WORKER_MEMORY_MB="
                            f"{settings.worker_memory_mb} is too small for them): {type(err).__name__}")))
        else:
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
    rss: int | None = None  # resident memory when last sampled (the cause of a death, when it was at its cap)


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
        self.start_error: str | None = None  # set while the breaker is open and no worker can take a job
        self.degraded: str | None = None  # set while the breaker is open or half-open: /readyz says so
        self._deaths: list[float] = []
        self._trips = 0  # times the breaker opened since it last stayed closed a minute: the back-off's exponent
        self._open_until: float | None = None  # monotonic time of the next try while open
        self._probe: _Worker | None = None  # the worker tried while half-open
        self._probe_deadline = 0.0  # monotonic time by which it must be ready, or it is killed
        self._closed_at = float("-inf")
        self._backoff = 0.0
        self._oom = OomCounter.find()
        self._oom_seen = self._oom.read()
        self._sampled = 0.0
        self._store: SqlJobStore | None = None  # for failing the run of a worker that ran out of memory
        self._files = JobFiles(settings.storage_dir)
        self._unsettled: list[tuple[Claim, Death, float]] = []  # dead workers' runs whose store writes failed

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
        """The one thread that dispatches, replaces and probes: an error in one round is logged and the next round
        goes on (were this thread to end, no job would be dispatched again and no worker replaced)."""
        while not self._stopping:
            try:
                self._watch_once()
            except Exception:
                log.exception("watching the worker processes failed; trying again")
                time.sleep(1.0)

    def _watch_once(self) -> None:
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
        self._sample_memory(workers)
        self._half_open()
        self._settle_again()

    def _sample_memory(self, workers: list[_Worker]) -> None:
        now = time.monotonic()
        if now - self._sampled < RSS_SAMPLE_S:
            return
        self._sampled = now
        for worker in workers:
            if worker.process.pid is not None:
                worker.rss = rss_bytes(worker.process.pid) or worker.rss

    def _half_open(self) -> None:
        """After the back-off: one worker is tried; its being ready closes the breaker (``_receive``)."""
        with self._lock:
            if self._stopping:
                return
            probe = self._probe
            if probe is not None and not probe.ready and time.monotonic() > self._probe_deadline:
                self._workers.remove(probe)  # not ready in time (hung): it counts as a death of the tried worker
                self._deaths.append(time.monotonic())
                self._trip(time.monotonic())
                self._refresh()
            elif self._open_until is None:
                return
            else:
                probe = None
        if probe is not None:
            log.error("the worker process tried after the back-off was not ready within %.0f s: killed",
                      self.start_timeout_s)
            probe.process.kill()  # SIGKILL: a stopped process would not act on SIGTERM
            probe.process.join(timeout=5.0)
            probe.conn.close()
            return
        with self._lock:
            if self._stopping or self._open_until is None:
                return
            if time.monotonic() < self._open_until:
                self._refresh()  # the count-down /readyz shows
                return
            self._open_until = None
            self._probe = self._spawn()
            self._probe_deadline = time.monotonic() + self.start_timeout_s
            self._workers.append(self._probe)
            self._refresh()
        log.warning("worker restart back-off over: trying one worker process")

    def _trip(self, now: float) -> None:  # under the lock
        """Opens the breaker: reopened from half-open (the tried worker failed), or within a minute of closing,
        the pause doubles."""
        if self._probe is None and now - self._closed_at > CRASH_LOOP[1]:
            self._trips = 0
        self._trips += 1
        base, cap = self.settings.worker_restart_backoff_s, self.settings.worker_restart_backoff_max_s
        backoff = self._backoff = min(base * 2 ** (self._trips - 1), cap)
        self._open_until, self._probe = now + backoff, None
        log.error("%d worker processes stopped within a minute; not restarting for %g s, then one is tried "
                  "(back-off %d)", len(self._deaths), backoff, self._trips)

    def _close(self) -> None:  # under the lock: the worker tried is ready
        self._probe, self._closed_at = None, time.monotonic()
        self._deaths = []  # the storm is over: the next deaths are judged afresh (_trip still doubles within 60 s)
        while len(self._workers) < self.settings.concurrency:
            self._workers.append(self._spawn())
        log.warning("a worker process started again after the back-off: workers are replaced again")

    def _refresh(self) -> None:  # under the lock: what /readyz and submissions see
        n = len(self._deaths)
        if self._open_until is not None:
            wait = max(0.0, self._open_until - time.monotonic())
            self.degraded = (f"{n} worker processes stopped within a minute; not restarting for {self._backoff:g} s "
                             f"(back-off): one is tried in {wait:.0f} s")
        elif self._probe is not None:
            self.degraded = f"{n} worker processes stopped within a minute; one is being started again"
        else:
            self.degraded = None
        working = any(w.ready and w.process.is_alive() for w in self._workers)
        self.start_error = self.degraded if self._open_until is not None and not working else None

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
                if worker is self._probe:
                    self._close()
                self._refresh()
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
            job, claim = dead.job, dead.claim
            death = self._classify(dead)
            now = time.monotonic()
            limit, window = CRASH_LOOP
            self._deaths = [t for t in self._deaths if now - t < window] + [now]
            if dead is self._probe:  # the worker tried after the back-off died too: a longer one
                self._trip(now)
            elif self._open_until is None and self._probe is None:
                if len(self._deaths) > limit:
                    self._trip(now)
                else:
                    self._workers.append(self._spawn())
            self._refresh()
        log.error("worker process %s stopped (%s)%s", dead.process.pid, death.cause,
                  f" while running job {job}" if job else "")
        if claim is not None:
            self._settle(claim, death, time.monotonic())
        elif job is not None:  # sent, not yet claimed: it is still queued
            self.submit(job)

    def _settle(self, claim: Claim, death: Death, since: float) -> None:
        """The dead worker's run: failed (out of memory) or given back. A store error (locked, busy) keeps it for
        the next round; both writes are fenced by the claim, so a retry after anything else moved the job on
        changes nothing."""
        try:
            if death.out_of_memory:
                self._fail_out_of_memory(claim, death)
            self.on_lost(claim, death.cause)  # gives back a run that still holds the job; counts the end of the run
        except Exception:
            log.exception("job %s: the end of its run could not be recorded; trying again", claim.job_id)
            with self._lock:
                self._unsettled.append((claim, death, since))

    def _settle_again(self) -> None:
        """Past the run's lease the sweeper gives it back (server/service.py sweep): no more retries here."""
        with self._lock:
            due, self._unsettled = self._unsettled, []
        for claim, death, since in due:
            if time.monotonic() - since < self.settings.job_lease_s:
                self._settle(claim, death, since)

    def _classify(self, dead: _Worker) -> Death:  # under the lock
        """The kills counted since the last death are this death's, and no later one's: read and reset here."""
        count = self._oom.read()
        kills = None if count is None or self._oom_seen is None else max(0, count - self._oom_seen)
        self._oom_seen = count
        return classify_death(dead.process.exitcode, kills if self._oom.conclusive else None, self._oom.source,
                              dead.rss, self.settings.worker_memory_mb)

    def _fail_out_of_memory(self, claim: Claim, death: Death) -> None:
        """Not given back to the queue: it would run out of memory again, and kill another worker."""
        if self._store is None:
            self._store = open_store(self.settings)
        message = out_of_memory_message(self.settings.worker_memory_mb, f"its worker process was {death.cause}")
        if fail_lost_run(self._store, self._files, claim, ErrorKind.OUT_OF_MEMORY, message):
            log.error("job %s failed: out of memory (not run again)", claim.job_id)

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
        if self._store is not None:
            self._store.close()

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
