"""Worker memory: the per-worker cap, and telling an out-of-memory death from any other.

A job's peak memory is set by its input (voxels times the model's channels), so a run that ran out of memory runs
out again: the one decision here, :func:`classify_death`, says which deaths were out of memory, and such a run is
failed at once instead of being given back to the queue (server/jobs/local_queue.py). Failing a job for good is
the costly mistake, so only evidence about this service counts.

What can be detected: the exit signal (the kernel's OOM killer sends SIGKILL); the kernel's own count of OOM kills
in the service's memory cgroup (v2 ``memory.events``, v1 ``memory.oom_control``), read at each death, the kills
since the last death being this one's; and the worker's resident memory, sampled about once a second by the API
process. Out of memory: a SIGKILL while the cgroup's count rose, or any signal while the worker was last seen near
its cap (a user-space killer such as systemd-oomd, an abort on a failed allocation). Without a cgroup the only
count is the host's (``/proc/vmstat``), which also rises when the kernel kills another program: inconclusive, as is
no count at all; such a SIGKILL, like an operator's ``kill -9``, is an ordinary death (the run is given back and
the attempt counted, so ``job_max_attempts`` still ends a loop).
"""

from __future__ import annotations

import errno
import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

NEAR_CAP = 0.9  # last seen at 90 % of its cap: the cap is what killed it
_ALLOC_FAILURES = ("bad_alloc", "bad allocation", "cannot allocate memory", "failed to allocate memory",
                   "out of memory")


def apply_cap(memory_mb: int) -> None:
    """Limit this process (a worker, before it loads a bundle) to ``memory_mb`` of private writable memory.

    RLIMIT_DATA, not RLIMIT_AS: since Linux 4.7 it counts the heap and anonymous writable mappings (numpy arrays,
    ONNX Runtime's arenas) and not the address space that shared libraries, thread stacks and allocators reserve
    without using (a worker reserves about four times what it uses). An allocation past it fails in the worker
    (MemoryError), so the job fails naming it and the worker lives on."""
    if memory_mb > 0:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def is_allocation_failure(err: BaseException) -> bool:
    """An exception that says memory could not be had (Python's, or a C++ library's bad_alloc as RuntimeError)."""
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:
        return True
    return isinstance(err, RuntimeError) and any(s in str(err).lower() for s in _ALLOC_FAILURES)


def out_of_memory_message(memory_mb: int, detail: str) -> str:
    """The job's error for a run that ran out of memory: what happened and what to change."""
    where = (f"more memory than a worker may use (CTSEG_WORKER_MEMORY_MB={memory_mb})" if memory_mb > 0
             else "more memory than the machine had free")
    return (f"out of memory: the job needed {where}; {detail}. It was not run again (it would need the same "
            "memory): submit a smaller series, or give the workers more memory")


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a live process, or None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _own_memory_cgroup() -> Path | None:
    """The file holding this process's memory cgroup's OOM-kill count (v2, else v1), when one is mounted."""
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in groups:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        v2 = hierarchy == "0" and controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        for mount in mounts:
            before, dash, after = mount.partition(" - ")
            fields, tail = before.split(), after.split()
            if not dash or len(fields) < 5 or not tail:
                continue
            fstype, options = tail[0], tail[2] if len(tail) > 2 else ""
            if v2 != (fstype == "cgroup2") or (not v2 and "memory" not in options.split(",")):
                continue
            root, point = fields[3], fields[4]
            if not (path == root or path.startswith(root.rstrip("/") + "/")):
                continue
            folder = Path(point) / path[len(root):].lstrip("/")
            counted = folder / ("memory.events" if v2 else "memory.oom_control")
            if counted.is_file():
                return counted
    return None


@dataclass(frozen=True)
class OomCounter:
    """The kernel's count of OOM kills: this service's memory cgroup, or the host's when there is none."""

    path: Path | None

    @classmethod
    def find(cls) -> OomCounter:
        cgroup = _own_memory_cgroup()
        return cls(cgroup if cgroup is not None else (Path("/proc/vmstat") if Path("/proc/vmstat").is_file() else None))

    @property
    def source(self) -> str:
        if self.path is None:
            return "no OOM-kill count"
        return "the host's OOM-kill count" if self.path.name == "vmstat" else "the memory cgroup's OOM-kill count"

    @property
    def conclusive(self) -> bool:
        """Only the service's own cgroup counts kills of its workers; the host's count kills of anything."""
        return self.path is not None and self.path.name != "vmstat"

    def read(self) -> int | None:
        if self.path is None:
            return None
        try:
            for line in self.path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            return None
        return None


@dataclass(frozen=True)
class Death:
    """Why a worker process stopped, in words fit for a job's error (no path, no patient data)."""

    out_of_memory: bool
    cause: str


def classify_death(exit_code: int | None, oom_kills: int | None, source: str, last_rss: int | None,
                   memory_mb: int) -> Death:
    """The one decision: was this death out of memory? ``oom_kills``: how many OOM kills the service's cgroup
    counted since the last death looked at (None: no such count; ``source`` says what there is)."""
    seen = f"last seen using {last_rss / 2**20:.0f} MB" if last_rss else "its memory use not yet sampled"
    near_cap = memory_mb > 0 and last_rss is not None and last_rss >= NEAR_CAP * memory_mb * 2**20
    if exit_code is None or exit_code >= 0:
        return Death(False, f"exit code {exit_code}")
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    if exit_code == -signal.SIGKILL:
        if oom_kills:
            return Death(True, f"killed by the kernel's out-of-memory killer ({source} rose; {seen})")
        if near_cap:
            return Death(True, f"killed by SIGKILL at its memory cap ({seen})")
        if oom_kills is None:
            return Death(False, f"killed by SIGKILL; whether by the kernel's out-of-memory killer cannot be told "
                                f"({source}, not this service's; {seen})")
        return Death(False, f"killed by SIGKILL, not by the kernel's out-of-memory killer ({source} did not "
                            f"change; {seen})")
    if near_cap:  # a library that aborts when an allocation fails (std::bad_alloc uncaught)
        return Death(True, f"stopped by {name} at its memory cap ({seen})")
    return Death(False, f"stopped by {name}")
