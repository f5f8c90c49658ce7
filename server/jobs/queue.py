"""The seam between the service and where jobs run: submit a queued job's id, and it runs once somewhere.

The job's record stays authoritative (a run claims it with a compare-and-set and fences every write with its
attempt), so a queue may deliver an id twice or lose one: a duplicate finds the job claimed and does nothing, a
lost one is found queued by the sweeper and submitted again. ``LocalWorkers`` (server/jobs/local_queue.py) runs
jobs in worker processes of this machine; a distributed queue implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from server.jobs.model import Claim

DoneFn = Callable[[str], None]  # a run of this job ended (whatever its outcome)
LostFn = Callable[[Claim, str], None]  # the worker holding this claim died (why, in words: server/jobs/memory.py)


class JobQueue(Protocol):
    start_error: str | None  # set when no worker can run any more

    def start(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def stop(self) -> None: ...
    @property
    def healthy(self) -> bool: ...
