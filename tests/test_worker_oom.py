"""Workers that run out of memory fail only their job, naming it, and are not run again; a storm of worker deaths
opens the restart breaker, which backs off and closes by itself: the next normal job succeeds, no restart needed.

Real processes: ``ctseg serve`` (tests/common.py Serve), a real memory cap (RLIMIT_DATA in the worker) that a
large volume exceeds, and workers SIGKILLed from outside as the kernel's OOM killer would.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk

from common import Serve, _cmdline, wait_for
from phantoms import make_phantom
from server.core.settings import Settings
from server.jobs.local_queue import ProcessWorkers, _Worker
from server.jobs.memory import OomCounter, classify_death
from test_api import nifti_bytes, phantom


def workers(server: Serve) -> list[int]:
    """The worker processes proper (not multiprocessing's resource tracker)."""
    return [pid for pid in server.worker_pids() if b"spawn_main" in _cmdline(pid)]


def ready(server: Serve) -> tuple[int, str]:
    r = requests.get(server.url + "/readyz", timeout=5)
    return r.status_code, r.json()["status"]


def submit(server: Serve, body: bytes) -> requests.Response:
    return requests.post(server.url + "/v1/segmentations", files={"files": ("ct.nii.gz", body)}, timeout=120)


def oversized_volume() -> bytes:
    """512 x 512 x 320 voxels at 0.5 mm: a small upload (air compresses), far within the input limits, that needs
    about 800 MB in a worker (300 MB of it the bundle and runtime)."""
    image = sitk.GetImageFromArray(np.full((320, 512, 512), -1000, dtype=np.int16))
    image.SetSpacing((0.5, 0.5, 0.5))
    return nifti_bytes(image)


def normal_job_succeeds(server: Serve) -> None:
    image, _ = phantom()
    r = submit(server, nifti_bytes(image))
    assert r.status_code == 202, r.text
    job = server.wait_finished(r.json()["id"])
    assert job["state"] == "succeeded", job


def test_jobs_past_the_memory_cap_fail_as_out_of_memory_and_the_next_job_succeeds(intensity_bundle, tmp_path):
    server = Serve(intensity_bundle, tmp_path / "storage", tmp_path / "ctseg.log", CTSEG_WORKER_MEMORY_MB="640")
    try:
        server.start()
        (worker,) = workers(server)
        body = oversized_volume()
        for _ in range(2):  # repeated: each fails alone, once
            r = submit(server, body)
            assert r.status_code == 202, r.text
            job = server.wait_finished(r.json()["id"])
            assert job["state"] == "failed" and job["error_kind"] == "out-of-memory", job
            assert job["error"].startswith("out of memory") and "CTSEG_WORKER_MEMORY_MB=640" in job["error"]
            assert job["attempt"] == 1  # not run again: it would need the same memory
            assert not (tmp_path / "storage" / "jobs" / job["id"] / "input").exists()
        assert workers(server) == [worker]  # the cap failed an allocation; the worker lives on
        assert ready(server) == (200, "ready")
        normal_job_succeeds(server)
    finally:
        server.kill()


def kill_the_worker(server: Serve) -> None:
    (pid,) = wait_for(lambda: ready(server)[0] == 200 and workers(server), 60, 0.05, "a ready worker")
    os.kill(pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, 0.02, "the killed worker reaped by the service")


def kill_mid_job(server: Serve, body: bytes) -> str:
    wait_for(lambda: ready(server)[0] == 200, 60, 0.05, "a ready worker")
    job = submit(server, body).json()["id"]
    wait_for(lambda: server.job(job)["state"] == "running", 60, 0.02, "the job running")
    kill_the_worker(server)
    return job


def assert_failed_naming_the_kill(server: Serve, job_id: str) -> None:
    """Whatever counter there is (none, the host's, the cgroup's that did not rise): a kill -9, not out of memory;
    given back to the queue, and here no attempt is left."""
    job = server.wait_finished(job_id)
    assert job["state"] == "failed" and job["attempt"] == 1, job
    assert job["error_kind"] == "interrupted" and "worker process running it stopped (killed" in job["error"], job


def test_a_storm_of_worker_kills_backs_off_and_recovers_without_a_restart(intensity_bundle, tmp_path):
    server = Serve(intensity_bundle, tmp_path / "storage", tmp_path / "ctseg.log", CTSEG_SW_OVERLAP="0.75",
                   CTSEG_JOB_MAX_ATTEMPTS="1", CTSEG_WORKER_RESTART_BACKOFF_S="2")
    big, _ = make_phantom((160, 160, 120), (1.0, 1.0, 1.0), "axial", seed=0, noise=3.0)
    body = nifti_bytes(big)
    try:
        server.start()
        api_pid = server.proc.pid
        t0 = time.monotonic()
        first = kill_mid_job(server, body)
        for _ in range(5):  # six deaths within a minute: the old breaker stopped for good here
            kill_the_worker(server)
        assert time.monotonic() - t0 < 60, "the kills took more than a minute: the old breaker would not trip"
        status, text = wait_for(lambda: (s := ready(server)) and "degraded" in s[1] and s, 10, 0.02, "degraded")
        assert status == 503 and "6 worker processes stopped within a minute" in text, text
        assert "not restarting for 2 s" in text, text
        small, _ = phantom()
        refused = submit(server, nifti_bytes(small))  # no worker for a few seconds: retry later, not a 500
        assert refused.status_code == 503 and refused.headers["Retry-After"], refused.text
        wait_for(lambda: ready(server) == (200, "ready"), 60, 0.1, "the breaker closed after its back-off")
        second = kill_mid_job(server, body)  # one death after the storm: judged afresh, the worker is replaced
        assert_failed_naming_the_kill(server, first)
        assert_failed_naming_the_kill(server, second)
        wait_for(lambda: ready(server) == (200, "ready"), 60, 0.1, "the killed worker replaced")
        normal_job_succeeds(server)
        assert server.proc.pid == api_pid and server.proc.poll() is None  # the same service, never restarted
        log = Path(tmp_path / "ctseg.log").read_text()
        assert log.count("not restarting for") == 1, log  # the breaker did not open again for the seventh death
    finally:
        server.kill()


def test_which_deaths_are_out_of_memory():
    mb = 2**20
    source = "the memory cgroup's OOM-kill count"
    assert classify_death(-9, 1, source, 900 * mb, 0).out_of_memory  # the kernel counted it
    assert not classify_death(-9, 0, source, 300 * mb, 1000).out_of_memory  # kill -9 by someone
    assert classify_death(-9, 0, source, 950 * mb, 1000).out_of_memory  # at its cap: a user-space OOM killer
    # Nothing conclusive to read (no count, or the host's): an ordinary death, given back, unless near its cap.
    assert not classify_death(-9, None, "no OOM-kill count", None, 0).out_of_memory
    assert not classify_death(-9, None, "the host's OOM-kill count", 300 * mb, 1000).out_of_memory
    assert classify_death(-9, None, "the host's OOM-kill count", 950 * mb, 1000).out_of_memory
    assert not classify_death(1, 1, source, 900 * mb, 0).out_of_memory  # it exited
    assert classify_death(-6, 0, source, 990 * mb, 1000).out_of_memory  # aborted on a failed allocation
    assert not classify_death(-11, 0, source, 100 * mb, 1000).out_of_memory


def killed_worker() -> _Worker:
    """A real process, SIGKILLed and reaped: what the API process sees of a dead worker."""
    process = mp.get_context("spawn").Process(target=time.sleep, args=(60,), daemon=True)
    process.start()
    process.kill()
    process.join(10)
    parent, child = mp.Pipe()
    child.close()
    return _Worker(process, parent)


def counting(path: Path, kills: int) -> None:
    path.write_text(f"low 0\nhigh 0\nmax 3\noom 3\noom_kill {kills}\n")  # cgroup v2 memory.events; vmstat alike


def test_oom_kills_are_matched_with_one_death_and_the_host_count_proves_nothing(intensity_bundle, tmp_path):
    workers = ProcessWorkers(Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage"),
                             lambda job: None, lambda claim, cause: None)
    events = tmp_path / "memory.events"
    counting(events, 0)
    workers._oom, workers._oom_seen = OomCounter(events), 0
    counting(events, 2)  # two OOM kills in the service's cgroup (one of them of some other process in it)
    assert workers._classify(killed_worker()).out_of_memory
    later = workers._classify(killed_worker())  # a kill -9 later: the kills counted before are used up
    assert not later.out_of_memory and "did not change" in later.cause, later
    vmstat = tmp_path / "vmstat"
    counting(vmstat, 0)
    workers._oom, workers._oom_seen = OomCounter(vmstat), 0
    counting(vmstat, 5)  # the host's count rose: some process somewhere was killed, maybe not this worker
    host = workers._classify(killed_worker())
    assert not host.out_of_memory and "cannot be told" in host.cause, host
