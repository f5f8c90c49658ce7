"""Jobs in worker processes: the default. A killed worker fails only its job, is replaced, and the API goes on."""

from __future__ import annotations

import os
import signal

import pytest

from common import wait_for
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
