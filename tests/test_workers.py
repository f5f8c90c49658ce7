"""Jobs in worker processes: the default. A killed worker fails only its job, is replaced, and the API goes on."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from common import wait_for
from server.core.database import DB_NAME
from phantoms import make_phantom
from test_api import nifti_bytes, phantom, post
from test_api_errors import make_client




def test_jobs_run_in_worker_processes(intensity_bundle, tmp_path):
    with make_client(intensity_bundle, tmp_path) as c:
        workers = c.app.state.service.queue
        assert workers.pids() and os.getpid() not in workers.pids()
        image, _ = phantom()
        r = post(c, [("ct.nii.gz", nifti_bytes(image))])
        assert r.status_code == 200 and r.json()["state"] == "succeeded"


def test_thread_mode_still_serves(intensity_bundle, tmp_path):
    with make_client(intensity_bundle, tmp_path, worker_mode="thread") as c:
        image, _ = phantom()
        r = post(c, [("ct.nii.gz", nifti_bytes(image))])
        assert r.status_code == 200 and r.json()["state"] == "succeeded"


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_killed_worker_is_replaced_and_its_job_run_again_up_to_the_limit(intensity_bundle, tmp_path, max_attempts):
    big, _ = make_phantom((160, 160, 120), (1.0, 1.0, 1.0), "axial", seed=0, noise=3.0)
    with make_client(intensity_bundle, tmp_path, sw_overlap=0.75, job_max_attempts=max_attempts) as c:
        workers = c.app.state.service.queue
        location = c.post("/v1/segmentations", files=[("files", ("ct.nii.gz", nifti_bytes(big)))]).headers["Location"]
        wait_for(lambda: c.get(location).json()["state"] == "running")
        (pid, job_id), = workers.running().items()
        assert location.endswith(job_id)
        os.kill(pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
        job = wait_for(lambda: (j := c.get(location).json())["state"] in ("failed", "succeeded") and j, 120)
        if max_attempts == 1:
            assert job["state"] == "failed" and job["error_kind"] == "interrupted"
            assert "worker process running it stopped (killed" in job["error"] and "ran 1 time(s)" in job["error"]
            assert not (c.app.state.service.files.job_dir(job_id) / "input").exists()
        else:
            assert job["state"] == "succeeded" and job["attempt"] == 2
            assert any("worker process running it stopped (killed" in n for n in job["notes"])
        wait_for(lambda: c.get("/readyz").status_code == 200 and workers.pids() and pid not in workers.pids())
        image, _ = phantom()
        r = post(c, [("ct.nii.gz", nifti_bytes(image))])
        assert r.status_code == 200 and r.json()["state"] == "succeeded"


def test_a_worker_that_cannot_open_the_model_stops_start_up_with_the_reason(tmp_path):
    import json

    import pytest

    from bundles import write_intensity_bundle
    from models.bundle import write_manifest
    from server.jobs.local_queue import WorkerStartError

    bundle = write_intensity_bundle(tmp_path / "broken")
    (bundle / "model.onnx").write_bytes(b"not an onnx graph")
    write_manifest(bundle, json.loads((bundle / "ctseg.json").read_text()))  # checksums match the broken file
    with pytest.raises(WorkerStartError, match="worker process could not start: .*model.onnx could not be opened"):
        with make_client(bundle, tmp_path):
            pass


def test_a_crash_loop_stops_restarts_and_submissions_get_503(intensity_bundle, tmp_path):
    with make_client(intensity_bundle, tmp_path) as c:
        workers = c.app.state.service.queue
        for _ in range(6):  # more than 5 deaths within a minute
            pid = wait_for(lambda: workers.healthy and workers.pids() and workers.pids()[0])
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: pid not in workers.pids())
        assert workers.start_error and "not restarting" in workers.start_error
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"].startswith("no worker")
        image, _ = phantom()
        r = post(c, [("ct.nii.gz", nifti_bytes(image))])
        assert r.status_code == 503 and "no worker can run jobs" in r.json()["detail"]
        assert r.headers["Retry-After"] == "30"


def trip_the_breaker(workers) -> None:  # type: ignore[no-untyped-def]
    """Six deaths within a minute, each worker killed as soon as it is spawned (a crash loop at start-up)."""
    for _ in range(6):
        pid = wait_for(lambda: workers.pids() and workers.pids()[0], 30, 0.01, "a worker process")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda dead=pid: dead not in workers.pids(), 30, 0.01, "the killed worker noticed")
    assert workers.degraded and "not restarting for 1 s" in workers.degraded, workers.degraded


def test_a_worker_tried_after_the_back_off_that_hangs_is_killed_and_the_breaker_opens_for_longer(
        intensity_bundle, tmp_path):
    with make_client(intensity_bundle, tmp_path, worker_restart_backoff_s=1) as c:
        workers = c.app.state.service.queue
        trip_the_breaker(workers)
        workers.start_timeout_s = 3.0  # the tried worker's start-up deadline
        probe = wait_for(lambda: workers.pids() and workers.pids()[0], 30, 0.01, "the worker tried after 1 s")
        os.kill(probe, signal.SIGSTOP)  # hung: it never says it is ready
        try:
            text = wait_for(lambda: "not restarting for 2 s" in (workers.degraded or "") and workers.degraded, 20,
                            0.05, "the hung worker given up, the breaker open for longer")
        finally:
            if os.path.exists(f"/proc/{probe}"):  # left stopped, it would hold up the exit of this process
                os.kill(probe, signal.SIGKILL)
        assert "stopped within a minute" in text
        workers.start_timeout_s = 300.0
        assert not os.path.exists(f"/proc/{probe}")  # killed and reaped, not left stopped
        wait_for(lambda: workers.healthy and c.get("/readyz").status_code == 200, 60, 0.1, "the breaker closed")
        assert probe not in workers.pids()
        image, _ = phantom()
        r = post(c, [("ct.nii.gz", nifti_bytes(image))])
        assert r.status_code == 200 and r.json()["state"] == "succeeded"


def test_the_monitor_survives_a_locked_database_when_a_worker_dies(intensity_bundle, tmp_path):
    """The end of a dead worker's run cannot be written while another connection holds the write lock: it is
    written once the lock is gone, and the workers are still watched (jobs dispatched, workers replaced)."""
    big, _ = make_phantom((160, 160, 120), (1.0, 1.0, 1.0), "axial", seed=0, noise=3.0)
    with make_client(intensity_bundle, tmp_path, sw_overlap=0.75, job_max_attempts=1, db_busy_timeout_s=0.2,
                     db_patience_s=0.5) as c:
        workers = c.app.state.service.queue
        location = c.post("/v1/segmentations", files=[("files", ("ct.nii.gz", nifti_bytes(big)))]).headers["Location"]
        wait_for(lambda: c.get(location).json()["state"] == "running")
        (pid, _), = workers.running().items()
        holder = sqlite3.connect(tmp_path / "storage" / DB_NAME, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the service cannot write: giving the run back fails (StoreBusy)
        os.kill(pid, signal.SIGKILL)
        time.sleep(2.0)  # past the store's patience: the write failed in the thread that watches the workers
        holder.execute("COMMIT")
        holder.close()
        job = wait_for(lambda: (j := c.get(location).json())["state"] == "failed" and j, 20, 0.1,
                       "the run given back once the lock is gone (well before its lease ran out)")
        assert job["error_kind"] == "interrupted" and "worker process running it stopped (killed" in job["error"]
        wait_for(lambda: workers.healthy and pid not in workers.pids(), 60, 0.1, "the worker replaced")
        image, _ = phantom()
        r = post(c, [("ct.nii.gz", nifti_bytes(image))])
        assert r.status_code == 200 and r.json()["state"] == "succeeded"
