"""The job core under single faults, with real processes: claims, leases and fencing, workers that die with the
service, one service per storage folder, a database locked by another connection, a full disk inside SQLite."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import requests
from fastapi.testclient import TestClient

from common import REPO, Serve, alive, free_port, wait_for
from dicom_factory import series_from_image, to_bytes
from pacs import Orthanc, dicomweb_node
from phantoms import make_phantom
from server.app import create_app
from server.core.settings import Settings
from server.jobs.lock import StorageLocked
from test_faults import big_nifti


def long_series() -> list:
    image, _ = make_phantom((160, 160, 120), (1.0, 1.0, 1.0), "axial", seed=0, noise=3.0)
    return series_from_image(image)


def test_a_second_service_on_the_same_storage_folder_refuses_to_start(intensity_bundle, tmp_path):
    storage = tmp_path / "storage"
    first = Serve(intensity_bundle, storage, tmp_path / "first.log").start()
    try:
        proc = subprocess.run([sys.executable, "-m", "ctseg", "serve", "--port", str(free_port())], cwd=REPO,
                              env={**first.env}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert "is in use by another ctseg service" in proc.stderr and f"pid {first.proc.pid}" in proc.stderr
        assert first._ready()  # the first one never noticed
        with pytest.raises(StorageLocked):  # and in-process the same: the app does not start
            with TestClient(create_app(Settings(bundle_dirs=[intensity_bundle], storage_dir=storage))):
                pass
    finally:
        first.kill()
    # once the first is gone (even by SIGKILL), the folder is free
    Serve(intensity_bundle, storage, tmp_path / "second.log").start().kill()


def api_killed_mid_job(bundle, tmp_path, check=None, **env: str) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of the API process alone while its worker runs a job: the orphan delivers nothing; after the restart
    the job ends once and Orthanc holds one SEG. ``check(job_id)`` looks further (e.g. into PostgreSQL)."""
    orthanc = Orthanc(tmp_path / "orthanc").start()
    storage = tmp_path / "storage"
    server = Serve(bundle, storage, tmp_path / "ctseg.log", CTSEG_SW_OVERLAP="0.75",
                   CTSEG_DESTINATIONS=json.dumps([dicomweb_node("pacs", orthanc)]), CTSEG_DEFAULT_DESTINATIONS="pacs",
                   **env)
    try:
        server.start()
        datasets = long_series()
        files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
        job = requests.post(server.url + "/v1/segmentations", files=files, timeout=120).json()["id"]
        wait_for(lambda: server.job(job)["state"] == "running", 60, 0.02, "the job running")
        workers = server.worker_pids()
        assert workers
        server.kill_api_only()  # SIGKILL of the API process; its worker is mid-job
        wait_for(lambda: not any(alive(pid) for pid in workers), 5, 0.05, "the orphaned worker gone")
        time.sleep(2)
        assert orthanc.instance_count() == 0  # the orphan delivered nothing
        server.start()
        record = server.wait_finished(job)
        assert record["state"] == "succeeded" and record["attempt"] == 2, record
        wait_for(lambda: server.job(job)["deliveries"][0]["state"] == "delivered", 60, 0.2, "the SEG delivered")
        time.sleep(3)
        assert len(orthanc.seg_series(datasets[0].StudyInstanceUID)) == 1
        assert orthanc.new_instance_changes() == 1  # one SEG, stored once
        if check is not None:
            check(job)
    finally:
        server.kill()
        orthanc.stop()


def test_the_api_process_killed_alone_its_worker_dies_and_the_job_ends_once(intensity_bundle, tmp_path):
    api_killed_mid_job(intensity_bundle, tmp_path)


def test_a_paused_worker_past_its_lease_changes_nothing(intensity_bundle, tmp_path):
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage", sw_overlap=0.75,
                        concurrency=2, job_lease_s=1.5)
    with TestClient(create_app(settings)) as c:
        service = c.app.state.service
        location = c.post("/v1/segmentations", files=[("files", ("ct.nii.gz", big_nifti()))]).headers["Location"]
        job_id = location.rsplit("/", 1)[-1]
        wait_for(lambda: c.get(location).json()["progress"]["windows_done"] > 0, 60, 0.02, "the job running")
        (paused, _), = [(pid, j) for pid, j in service.queue.running().items() if j == job_id]
        os.kill(paused, signal.SIGSTOP)  # a frozen worker: no heartbeat, no progress, no exit
        try:
            taken = wait_for(lambda: (j := c.get(location).json())["attempt"] == 2 and j["state"] == "running" and j,
                             30, 0.05, "another worker running the job")
            assert any("stopped renewing its lease" in n for n in taken["notes"])
        finally:
            os.kill(paused, signal.SIGCONT)  # it wakes up, believing it still runs attempt 1
        assert service.wait(job_id, 120)
        job = c.get(location).json()
        assert job["state"] == "succeeded" and job["attempt"] == 2
        folder = service.files.job_dir(job_id)
        wait_for(lambda: sorted(p.name for p in folder.iterdir()) == ["run-2"], 30, 0.1,
                 "the stale run's files removed")
        assert c.get(f"{location}/labelmap.nii.gz").status_code == 200
        time.sleep(2)  # whatever the stale run still tries, the record stays as the current run left it
        assert c.get(location).json() == job


def test_a_locked_database_delays_a_result_and_never_loses_it(intensity_bundle, tmp_path):
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage", sw_overlap=0.75,
                        db_busy_timeout_s=0.2, job_lease_s=600)
    with TestClient(create_app(settings)) as c:
        location = c.post("/v1/segmentations", files=[("files", ("ct.nii.gz", big_nifti()))]).headers["Location"]
        wait_for(lambda: c.get(location).json()["state"] == "running", 60, 0.02, "the job running")
        run = c.app.state.service.files.run_dir(location.rsplit("/", 1)[-1], 1)
        other = sqlite3.connect(tmp_path / "storage" / "jobs.sqlite3", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another connection holds the write lock past the job's end
        try:
            wait_for(lambda: (run / "preview.png").is_file(), 120, 0.05, "the results written")
            time.sleep(3)  # the run now waits to record its success, past many busy timeouts
            assert c.get(location).json()["state"] == "running"  # readers go on; the result waits
        finally:
            other.execute("COMMIT")
            other.close()
        job = wait_for(lambda: (j := c.get(location).json())["state"] != "running" and j, 60, 0.1, "job finished")
        assert job["state"] == "succeeded" and job["attempt"] == 1, job
        assert c.get(f"{location}/labelmap.nii.gz").status_code == 200
