"""Faults: the service killed (SIGKILL) during an upload and during a job, a full disk while results are written,
a corrupt bundle at start-up. Nothing is silently lost or run on partial input, files are cleaned, the service
stays up or refuses to start naming the problem."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from fastapi.testclient import TestClient

from common import Serve, fill, free_port, wait_for
from phantoms import make_phantom
from server.app import create_app
from server.core.settings import Settings
from test_api import nifti_bytes

REPO = Path(__file__).resolve().parents[1]


def big_nifti() -> bytes:
    image, _ = make_phantom((160, 160, 120), (1.0, 1.0, 1.0), "axial", seed=0, noise=3.0)
    return nifti_bytes(image)


def test_killed_during_an_upload_the_job_fails_with_the_reason_and_no_file_is_left(intensity_bundle, tmp_path):
    storage = tmp_path / "storage"
    server = Serve(intensity_bundle, storage, tmp_path / "ctseg.log").start()
    try:
        body = big_nifti()
        boundary = "ctsegboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"ct.nii.gz\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        length = len(head) + len(body) + len(f"\r\n--{boundary}--\r\n")
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((f"POST /v1/segmentations HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                          f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
            sock.sendall(head + body[: len(body) // 2])  # half the file, then the service dies
            time.sleep(0.5)
            server.kill()
        server.start()
        jobs = requests.get(server.url + "/v1/segmentations", timeout=5).json()["jobs"]
        assert len(jobs) == 1 and jobs[0]["state"] == "failed"  # never run on the partial upload, never silently gone
        assert "the service stopped while this job's input was arriving" in jobs[0]["error"]
        assert not [p for p in (storage / "jobs").rglob("*") if p.is_file()]
    finally:
        server.kill()


def test_killed_during_a_job_the_job_runs_again_after_the_restart_and_ends_once(intensity_bundle, tmp_path):
    storage = tmp_path / "storage"
    server = Serve(intensity_bundle, storage, tmp_path / "ctseg.log", CTSEG_SW_OVERLAP="0.75").start()
    try:
        r = requests.post(server.url + "/v1/segmentations", files={"files": ("ct.nii.gz", big_nifti())}, timeout=60)
        job = r.json()["id"]
        wait_for(lambda: requests.get(f"{server.url}/v1/segmentations/{job}", timeout=5).json()["state"] == "running",
                 60, 0.02, "the job running")
        server.kill()
        server.start()
        record = wait_for(lambda: (j := requests.get(f"{server.url}/v1/segmentations/{job}", timeout=5).json())
                          ["state"] in ("succeeded", "failed") and j, 120, 0.2, "the job finished")
        assert record["state"] == "succeeded" and record["attempt"] == 2, record
        assert any("the service stopped while this job ran" in note for note in record["notes"])
        assert not (storage / "jobs" / job / "input").exists()
        assert sorted(p.name for p in (storage / "jobs" / job).iterdir()) == ["run-2"]  # run 1 left nothing
    finally:
        server.kill()


def test_a_full_disk_while_a_job_runs_fails_the_job_clearly_and_the_service_stays_up(intensity_bundle, small_disk):
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=small_disk / "storage", sw_overlap=0.75)
    with TestClient(create_app(settings)) as c:
        location = c.post("/v1/segmentations", files=[("files", ("ct.nii.gz", big_nifti()))]).headers["Location"]
        wait_for(lambda: c.get(location).json()["state"] == "running", 60, 0.02, "the job running")
        filler = fill(small_disk)
        job = wait_for(lambda: (j := c.get(location).json())["state"] in ("failed", "succeeded") and j, 120, 0.1)
        assert job["state"] == "failed" and "the storage is full" in job["error"], job
        assert c.get("/healthz").status_code == 200
        assert not [p for p in (small_disk / "storage" / "jobs").rglob("*") if p.is_file()]
        # with the disk still full, a new upload is a 507 naming the problem, not a 500
        full = c.post("/v1/segmentations", files=[("files", ("ct.nii.gz", big_nifti()))])
        assert full.status_code == 507 and "storage is full" in full.json()["detail"]
        filler.unlink()
        image, _ = make_phantom((48, 48, 40), (2.0, 2.0, 2.0), "axial", seed=1, noise=3.0)
        ok = c.post("/v1/segmentations", files=[("files", ("ct.nii.gz", nifti_bytes(image)))], params={"wait": "true"})
        assert ok.status_code == 200 and ok.json()["state"] == "succeeded"


def test_a_corrupt_bundle_stops_start_up_naming_the_file(intensity_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(intensity_bundle, broken)
    with open(broken / "model.onnx", "r+b") as f:
        f.seek(40)
        f.write(b"\xff\xff\xff\xff")
    manifest = json.loads((broken / "ctseg.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "ctseg", "serve", "--bundles", str(broken), "--port", str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{broken}: checksum mismatch for model.onnx" in proc.stderr
    assert manifest["name"] == "intensity-test"
