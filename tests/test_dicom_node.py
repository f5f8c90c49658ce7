"""The DICOM node under single faults, with real processes: ctseg killed or stopped mid-association and while a
received series is staged, a series sent in pieces, a full disk inside SQLite. A real Orthanc receives the SEGs
(with ``OverwriteInstances``, so a resend or a replacement shows in its change log)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from common import Serve, fill, free_port, require_tool, wait_for
from dicom_factory import series_from_image, write_files
from pacs import HALF_A_SERIES_SENDER, Orthanc, dicomweb_node
from phantoms import make_phantom
from server.app import create_app
from server.core.settings import Settings
from test_pacs import ct_series, referenced_instances, seg_from_orthanc

STORESCU = shutil.which("storescu")

def storescu(port: int, files, aet: str = "MODALITY") -> None:
    tool = require_tool(STORESCU, "dcmtk's storescu (Debian package dcmtk)")
    proc = subprocess.run([tool, "-aet", aet, "-aec", "CTSEG", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def node(intensity_bundle, tmp_path, orthanc: Orthanc | None, **env: str) -> Serve:
    dicom_port = free_port()
    values = {"CTSEG_DICOM_PORT": str(dicom_port), "CTSEG_DICOM_STABLE_SECONDS": "1",
              "CTSEG_DELIVERY_RETRY_BASE_S": "0.5", "CTSEG_DELIVERY_RETRY_MAX_S": "2"}
    if orthanc is not None:
        values |= {"CTSEG_DESTINATIONS": json.dumps([dicomweb_node("pacs", orthanc)]), "CTSEG_DEFAULT_DESTINATIONS": "pacs"}
    server = Serve(intensity_bundle, tmp_path / "storage", tmp_path / "ctseg.log", **(values | env))
    server.dicom_port = dicom_port  # type: ignore[attr-defined]
    return server


def seg_instances_in(orthanc: Orthanc, study_uid: str) -> list[dict]:
    return [i for s in orthanc.seg_series(study_uid) for i in orthanc.seg_instances(study_uid, s["0020000E"]["Value"][0])]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_ctseg_stopped_mid_association_the_cut_series_is_not_run_and_a_complete_resend_gives_one_seg(
        intensity_bundle, tmp_path, how):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    server = node(intensity_bundle, tmp_path, orthanc)
    datasets = ct_series()
    files = write_files(datasets, tmp_path / "series")
    try:
        server.start()
        sender = subprocess.Popen([sys.executable, "-c", HALF_A_SERIES_SENDER, "hold", str(server.dicom_port),
                                   *map(str, files)], stdout=subprocess.PIPE, text=True)
        assert sender.stdout.readline().strip() == "HALF"
        if how == "SIGKILL":
            server.kill()
        else:
            os.kill(server.proc.pid, signal.SIGTERM)  # a deploy: the API process is asked to stop
            server.proc.wait(timeout=60)
        assert sender.stdout.readline().split()[0] == "CUT"
        sender.wait(timeout=30)
        server.start()
        time.sleep(4)  # several quiet periods
        assert server.jobs() == []  # half a series: not run, not dropped either
        assert seg_instances_in(orthanc, datasets[0].StudyInstanceUID) == []
        storescu(server.dicom_port, files)  # the sender's retry: the whole series, in one association
        seg = seg_from_orthanc(orthanc, datasets[0].StudyInstanceUID)
        assert referenced_instances(seg) == {ds.SOPInstanceUID for ds in datasets}
        (job,) = server.jobs()
        assert job["state"] == "succeeded" and job["input"]["files"] == len(datasets)
        wait_for(lambda: server.job(job["id"])["deliveries"][0]["state"] == "delivered", 30, 0.2)
        time.sleep(3)
        assert len(seg_instances_in(orthanc, datasets[0].StudyInstanceUID)) == 1
        assert orthanc.new_instance_changes() == 1
    finally:
        server.kill()
        orthanc.stop()


def test_a_series_sent_in_two_associations_is_run_whole_and_the_pacs_keeps_one_complete_seg(intensity_bundle,
                                                                                          tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    server = node(intensity_bundle, tmp_path, orthanc)
    datasets = ct_series()
    files = write_files(datasets, tmp_path / "series")
    try:
        server.start()
        storescu(server.dicom_port, files[:22])  # enough for the route on its own
        first = wait_for(lambda: (j := server.jobs()) and j[0]["state"] == "succeeded" and j[0], 60, 0.2)
        time.sleep(2)  # well past the quiet period: the first part is a job of its own by now
        storescu(server.dicom_port, files[22:])
        final = wait_for(lambda: (j := server.jobs()) and len(j) == 2 and j[0]["state"] == "succeeded" and j[0],
                         60, 0.2, "the whole series run")
        assert final["supersedes"] == first["id"] and final["input"]["files"] == len(datasets)
        assert server.job(first["id"])["superseded_by"] == final["id"]
        wait_for(lambda: all(d["state"] == "delivered" for d in server.job(final["id"])["deliveries"]), 30, 0.2)
        time.sleep(3)
        instances = seg_instances_in(orthanc, datasets[0].StudyInstanceUID)
        assert len(instances) == 1  # no SEG of the first part is left beside it
        seg = seg_from_orthanc(orthanc, datasets[0].StudyInstanceUID)
        assert referenced_instances(seg) == {ds.SOPInstanceUID for ds in datasets}
    finally:
        server.kill()
        orthanc.stop()


def long_series():
    image, _ = make_phantom((32, 32, 300), (2.0, 2.0, 1.0), "axial", seed=2, noise=3.0)
    return series_from_image(image)


def kill_inside_staging(server: Serve, database, timeout_s: float = 120.0) -> None:
    """SIGKILL the service while a received series is being made into a job: its arrival names the job
    (``staging_job``) and the job is still ``staging``. Confirmed under SQLite's write lock, which the service needs to
    move the job on, so the kill cannot land a moment too late (an HTTP poll could: staging may end between the
    answer and the signal)."""
    deadline = time.monotonic() + timeout_s
    inside = "SELECT 1 FROM incoming i JOIN jobs j ON j.id = i.staging_job WHERE j.state = 'staging'"
    while time.monotonic() < deadline:
        if database.exists():
            db = sqlite3.connect(database, timeout=30, isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")  # while held, the service cannot move a job on
                if db.execute(inside).fetchone():
                    server.kill()
                    return
                db.execute("ROLLBACK")
            except sqlite3.OperationalError:
                pass  # the schema not made yet: look again
            finally:
                db.close()
        time.sleep(0.002)
    pytest.fail("no received series was seen being staged")


def test_killed_while_a_received_series_is_staged_it_is_staged_again_and_run_whole(intensity_bundle, tmp_path):
    server = node(intensity_bundle, tmp_path, None)
    datasets = long_series()
    files = write_files(datasets, tmp_path / "series")
    try:
        server.start()
        storescu(server.dicom_port, files)
        kill_inside_staging(server, tmp_path / "storage" / "jobs.sqlite3")  # acknowledged long ago: not sent again
        server.start()
        (job,) = wait_for(lambda: (j := server.jobs()) and j, 60, 0.2)
        job = server.wait_finished(job["id"], 300)
        assert job["state"] == "succeeded", job
        assert job["input"]["files"] == len(datasets)
        assert "staging it again" in server.log.read_text()  # the kill did land inside staging
    finally:
        server.kill()


def test_a_full_disk_inside_the_database_answers_out_of_resources(intensity_bundle, small_disk, tmp_path):
    storage = small_disk / "storage"
    incoming = storage / "incoming"  # received files on a roomy disk of their own; the database's disk fills up
    incoming.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(incoming)], check=True)
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=storage, dicom_port=free_port(),
                        dicom_host="127.0.0.1", dicom_stable_seconds=1.0)
    datasets = ct_series()
    files = write_files(datasets, tmp_path / "series")
    try:
        with TestClient(create_app(settings)) as client:
            filler = fill(small_disk)
            tool = require_tool(STORESCU, "dcmtk's storescu (Debian package dcmtk)")
            proc = subprocess.run([tool, "-v", "-aet", "MODALITY", "-aec", "CTSEG", "127.0.0.1",
                                   str(settings.dicom_port), *map(str, files[:3])], capture_output=True, text=True,
                                  timeout=60)
            text = proc.stdout + proc.stderr
            assert "refused: outofresources" in text.lower(), text  # dcmtk's name for 0xA700
            assert "0xc211" not in text.lower()
            assert not list(incoming.rglob("*.dcm"))  # nothing kept that was not acknowledged
            filler.unlink()
            storescu(settings.dicom_port, files)  # room again: the sender's retry is stored
            job = wait_for(lambda: (j := client.get("/v1/segmentations").json()["jobs"]) and
                           j[0]["state"] == "succeeded" and j[0], 60, 0.2)
            assert job["input"]["files"] == len(datasets)
    finally:
        subprocess.run(["umount", "-l", str(incoming)], check=False)
