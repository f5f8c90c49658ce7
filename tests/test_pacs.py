"""ctseg as a DICOM node, end to end against a real Orthanc and real dcmtk tools, all on 127.0.0.1.

Each test starts and stops its own Orthanc (tests/pacs.py) and its own ctseg (in process through the ASGI app, or
as a real ``ctseg serve`` process where it is killed).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from fastapi.testclient import TestClient

from dicom_factory import compress_jpeg2000, series_from_image, to_bytes, write_files
from common import free_port, require_tool, wait_for
from pacs import HALF_A_SERIES_SENDER, Orthanc, dicomweb_node, dimse_destination
from server.app import create_app
from server.core.settings import Settings
from test_api import phantom

STORESCU = shutil.which("storescu")
ECHOSCU = shutil.which("echoscu")
REPO = Path(__file__).resolve().parents[1]


def ctseg_settings(bundle: Path, storage: Path, **overrides) -> Settings:
    values = dict(bundle_dirs=[bundle], storage_dir=storage, dicom_port=free_port(), dicom_host="127.0.0.1",
                  dicom_stable_seconds=1.0, delivery_retry_base_s=0.5, delivery_retry_max_s=2.0)
    return Settings(**{**values, **overrides})


def ct_series(**kw):  # 30 axial slices: over the default route's 20
    image, _ = phantom()
    return series_from_image(image, **kw)


def jobs(client: TestClient) -> list[dict]:
    r = client.get("/v1/segmentations")
    assert r.status_code == 200
    return r.json()["jobs"]


def wait_seg_in_orthanc(orthanc: Orthanc, study_uid: str, timeout: float = 90.0) -> dict:
    return wait_for(lambda: (s := orthanc.seg_series(study_uid)) and s[0], timeout, 0.25, "SEG series in Orthanc")


def seg_from_orthanc(orthanc: Orthanc, study_uid: str) -> pydicom.Dataset:
    series = wait_seg_in_orthanc(orthanc, study_uid)
    series_uid = series["0020000E"]["Value"][0]
    instances = orthanc.seg_instances(study_uid, series_uid)
    assert len(instances) == 1
    sop = instances[0]["00080018"]["Value"][0]
    return pydicom.dcmread(io.BytesIO(orthanc.retrieve_instance(study_uid, series_uid, sop)))


def referenced_instances(seg: pydicom.Dataset) -> set[str]:
    return {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}


@pytest.mark.parametrize("jpeg2000", [False, True], ids=["uncompressed", "jpeg2000"])
def test_storescu_to_the_listener_then_seg_back_in_the_study(intensity_bundle, tmp_path, jpeg2000):
    storescu = require_tool(STORESCU, "dcmtk's storescu (Debian package dcmtk)")
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        settings = ctseg_settings(intensity_bundle, tmp_path / "storage",
                                  destinations=[dicomweb_node("pacs", orthanc)], default_destinations=["pacs"])
        datasets = ct_series()
        if jpeg2000:
            for ds in datasets:
                compress_jpeg2000(ds)
        files = write_files(datasets, tmp_path / "series")
        with TestClient(create_app(settings)) as client:
            proposal = ["-xv"] if jpeg2000 else []
            proc = subprocess.run([storescu, "-v", *proposal, "-aet", "MODALITY", "-aec", "CTSEG", "127.0.0.1",
                                   str(settings.dicom_port), *map(str, files)], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            if jpeg2000:  # accepted as sent: the PACS does not have to transcode
                assert "JPEG 2000 (Lossless only) -> JPEG 2000 (Lossless only)" in proc.stdout + proc.stderr
            last_received = time.monotonic()
            seg = seg_from_orthanc(orthanc, datasets[0].StudyInstanceUID)
            assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
            assert referenced_instances(seg) == {ds.SOPInstanceUID for ds in datasets}
            job = wait_for(lambda: [j for j in jobs(client) if j["deliveries"] and
                                    j["deliveries"][0]["state"] == "delivered"], 30)[0]
            assert job["input"]["origin"] == {"kind": "dimse", "calling_ae_title": "MODALITY", "source": None}
            assert job["input"]["series_uid"] == datasets[0].SeriesInstanceUID and job["input"]["files"] == 30
            assert job["deliveries"][0]["destination"] == "pacs" and job["deliveries"][0]["attempts"] == 1
            print(f"last instance -> SEG in Orthanc: {time.monotonic() - last_received:.2f} s "
                  f"(quiet period {settings.dicom_stable_seconds} s)")
    finally:
        orthanc.stop()


def test_orthanc_forwards_a_study_and_the_seg_goes_back_to_the_sender(intensity_bundle, tmp_path):
    ctseg_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"ctseg": ("CTSEG", ctseg_port)}).start()
    try:
        # No default destination: the SEG goes back to the sender because its AE title is a configured destination.
        settings = ctseg_settings(intensity_bundle, tmp_path / "storage", dicom_port=ctseg_port,
                                  destinations=[dimse_destination("orthanc", orthanc)])
        datasets = ct_series()
        for ds in datasets:
            orthanc.upload(to_bytes(ds))
        with TestClient(create_app(settings)) as client:
            study = orthanc.study_id(datasets[0].StudyInstanceUID)
            r = requests.post(f"{orthanc.url}/modalities/ctseg/store", json={"Resources": [study], "Synchronous": True},
                              timeout=120)
            assert r.status_code == 200, r.text
            seg = seg_from_orthanc(orthanc, datasets[0].StudyInstanceUID)
            assert referenced_instances(seg) == {ds.SOPInstanceUID for ds in datasets}
            job = jobs(client)[0]
            assert job["input"]["origin"]["calling_ae_title"] == "ORTHANC" and job["destinations"] == ["orthanc"]
    finally:
        orthanc.stop()


@pytest.mark.parametrize("destination_kind", ["dicomweb", "dimse"])
def test_pull_by_uid_from_orthanc_and_seg_stored_back(intensity_bundle, tmp_path, destination_kind):
    ctseg_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"ctseg": ("CTSEG", ctseg_port)}).start()
    try:
        destination = dicomweb_node("pacs", orthanc) if destination_kind == "dicomweb" else dimse_destination("pacs", orthanc)
        settings = ctseg_settings(intensity_bundle, tmp_path / "storage", dicom_port=None,
                                  sources=[dicomweb_node("pacs-web", orthanc)], destinations=[destination])
        target = ct_series()
        other = ct_series(study_uid=target[0].StudyInstanceUID, series_number=3)  # same study, another series
        for ds in target[::2]:
            compress_jpeg2000(ds)  # retrieved as stored: the reader decodes it
        for ds in target + other:
            orthanc.upload(to_bytes(ds))
        study_uid, series_uid = target[0].StudyInstanceUID, target[0].SeriesInstanceUID
        with TestClient(create_app(settings)) as client:
            r = client.post("/v1/segmentations", params={"destinations": "pacs", "wait": "true"},
                            json={"source": "pacs-web", "study_uid": study_uid, "series_uid": series_uid})
            assert r.status_code == 200, r.text
            job = r.json()
            assert job["input"]["origin"] == {"kind": "pull", "calling_ae_title": None, "source": "pacs-web"}
            assert job["input"]["files"] == len(target) and "dicom-seg" in job["outputs_requested"]
            seg = seg_from_orthanc(orthanc, study_uid)
            assert referenced_instances(seg) == {ds.SOPInstanceUID for ds in target}
            delivered = wait_for(lambda: (d := client.get(f"/v1/segmentations/{job['id']}").json()["deliveries"])
                                 and d[0]["state"] == "delivered" and d[0], 30)
            assert delivered["delivered_at"] and delivered["attempts"] == 1

            missing = client.post("/v1/segmentations", json={"source": "pacs-web", "study_uid": study_uid,
                                                              "series_uid": "1.2.3.4.5.6.7"})
            assert missing.status_code == 404 and "1.2.3.4.5.6.7" in missing.json()["detail"]
            unknown = client.post("/v1/segmentations", json={"source": "nowhere", "study_uid": study_uid,
                                                              "series_uid": series_uid})
            assert unknown.status_code == 404 and "unknown source 'nowhere'" in unknown.json()["detail"]
            orthanc.stop()
            down = client.post("/v1/segmentations", json={"source": "pacs-web", "study_uid": study_uid,
                                                           "series_uid": series_uid})
            assert down.status_code == 502 and "pacs-web" in down.json()["detail"]
            assert [j["id"] for j in jobs(client)] == [job["id"]]  # refused pulls leave no job behind
    finally:
        orthanc.stop()


def test_pull_by_cget_from_orthanc(intensity_bundle, tmp_path):
    orthanc_dir = tmp_path / "orthanc"
    orthanc = Orthanc(orthanc_dir, modalities={"ctseg": ("CTSEG", free_port())}).start()
    try:
        source = {**dimse_destination("pacs-dimse", orthanc)}
        settings = ctseg_settings(intensity_bundle, tmp_path / "storage", dicom_port=None, sources=[source])
        target = ct_series()
        for ds in target:
            orthanc.upload(to_bytes(ds))
        with TestClient(create_app(settings)) as client:
            r = client.post("/v1/segmentations", params={"wait": "true", "outputs": "both"},
                            json={"source": "pacs-dimse", "study_uid": target[0].StudyInstanceUID,
                                  "series_uid": target[0].SeriesInstanceUID})
            assert r.status_code == 200, r.text
            seg = pydicom.dcmread(io.BytesIO(client.get(f"/v1/segmentations/{r.json()['id']}/seg.dcm").content))
            assert referenced_instances(seg) == {ds.SOPInstanceUID for ds in target}
            missing = client.post("/v1/segmentations", json={"source": "pacs-dimse", "study_uid": "1.2.3",
                                                              "series_uid": "1.2.3.4"})
            assert missing.status_code == 404 and "1.2.3.4" in missing.json()["detail"]
    finally:
        orthanc.stop()


def test_pacs_down_then_up_gets_the_seg_once(intensity_bundle, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")  # configured, not started: the PACS is down
    settings = ctseg_settings(intensity_bundle, tmp_path / "storage", dicom_port=None,
                              destinations=[dicomweb_node("pacs", orthanc)], default_destinations=["pacs"])
    datasets = ct_series()
    try:
        with TestClient(create_app(settings)) as client:
            files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
            r = client.post("/v1/segmentations", files=files, params={"wait": "true"})
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            pending = wait_for(lambda: (d := client.get(f"/v1/segmentations/{job_id}").json()["deliveries"][0])
                               ["attempts"] >= 2 and d, 30)
            assert pending["state"] == "pending" and "cannot reach" in pending["last_error"] and pending["next_attempt"]
            metrics = client.get("/metrics").text
            assert 'ctseg_deliveries{destination="pacs",state="pending"} 1.0' in metrics
            assert "ctseg_outbox_depth 1.0" in metrics
            orthanc.start()
            delivered = wait_for(lambda: (d := client.get(f"/v1/segmentations/{job_id}").json()["deliveries"][0])
                                 ["state"] == "delivered" and d, 30)
            assert delivered["last_error"] is None
            seg_from_orthanc(orthanc, datasets[0].StudyInstanceUID)
            time.sleep(2 * settings.delivery_retry_max_s)  # any second send would land by now
            assert orthanc.new_instance_changes() == 1
            assert "ctseg_outbox_depth 0.0" in client.get("/metrics").text
    finally:
        orthanc.stop()


def serve(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ctseg", "serve"], cwd=REPO, env={**os.environ, **env},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def test_ctseg_killed_with_a_seg_in_the_outbox_delivers_it_once_after_restart(intensity_bundle, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")  # down while ctseg holds the SEG
    port = free_port()
    env = {"CTSEG_BUNDLE_DIRS": str(intensity_bundle), "CTSEG_STORAGE_DIR": str(tmp_path / "storage"),
           "CTSEG_PORT": str(port), "CTSEG_HOST": "127.0.0.1", "CTSEG_DELIVERY_RETRY_BASE_S": "0.5",
           "CTSEG_DELIVERY_RETRY_MAX_S": "2", "CTSEG_DESTINATIONS": json.dumps([dicomweb_node("pacs", orthanc)]),
           "CTSEG_DEFAULT_DESTINATIONS": "pacs"}
    api = f"http://127.0.0.1:{port}"
    server = serve(env, tmp_path / "ctseg.log")
    try:
        wait_for(lambda: _ready(api), 90, 0.2, "ctseg ready")
        datasets = ct_series()
        files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
        job = requests.post(f"{api}/v1/segmentations", files=files, params={"wait": "true"}, timeout=120).json()
        wait_for(lambda: requests.get(f"{api}/v1/segmentations/{job['id']}", timeout=5).json()
                 ["deliveries"][0]["attempts"] >= 1, 30)
        os.killpg(server.pid, signal.SIGKILL)  # the API process and its workers, with the SEG still pending
        server.wait()
        orthanc.start()
        server = serve(env, tmp_path / "ctseg.log")
        wait_for(lambda: _ready(api), 90, 0.2, "ctseg ready after the restart")
        delivered = wait_for(lambda: (d := requests.get(f"{api}/v1/segmentations/{job['id']}", timeout=5).json()
                                      ["deliveries"][0])["state"] == "delivered" and d, 60)
        assert delivered["attempts"] >= 2
        seg_from_orthanc(orthanc, datasets[0].StudyInstanceUID)
        time.sleep(4)
        assert orthanc.new_instance_changes() == 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        orthanc.stop()


def _ready(api: str) -> bool:
    try:
        return requests.get(f"{api}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_series_whose_sender_is_killed_mid_association_is_not_run(intensity_bundle, tmp_path, caplog):
    settings = ctseg_settings(intensity_bundle, tmp_path / "storage", dicom_incomplete_hold_minutes=0.1,
                              dicom_reassembly_minutes=0)
    files = write_files(ct_series(), tmp_path / "series")
    with TestClient(create_app(settings)) as client:
        proc = subprocess.run([sys.executable, "-c", HALF_A_SERIES_SENDER, "die", str(settings.dicom_port),
                               *map(str, files)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        time.sleep(3)
        assert jobs(client) == []  # it waits to be sent again complete
        assert 'ctseg_dicom_series_waiting{reason="incomplete"} 1.0' in client.get("/metrics").text
        job = wait_for(lambda: jobs(client) and jobs(client)[0], 30, 0.2, "a job record for the series")
        assert job["state"] == "failed" and "ended without release" in job["error"]
        assert "not sent again complete" in job["error"]
        assert job["input"]["origin"]["kind"] == "dimse" and job["progress"]["windows_total"] == 0
        # its instances are kept only for the reassembly window (0 here), in case a complete resend comes
        wait_for(lambda: not list((tmp_path / "storage" / "incoming").iterdir()), 10, 0.1)
        assert "ended without release" in caplog.text


def test_calling_ae_title_not_allowed_is_rejected_at_association(intensity_bundle, tmp_path):
    echoscu = require_tool(ECHOSCU, "dcmtk's echoscu (Debian package dcmtk)")
    settings = ctseg_settings(intensity_bundle, tmp_path / "storage", dicom_allowed_ae_titles=["ORTHANC"])
    with TestClient(create_app(settings)) as client:
        allowed = subprocess.run([echoscu, "-aet", "ORTHANC", "-aec", "CTSEG", "127.0.0.1", str(settings.dicom_port)],
                                 capture_output=True, text=True, timeout=30)
        assert allowed.returncode == 0, allowed.stderr  # C-ECHO answered
        refused = subprocess.run([echoscu, "-aet", "INTRUDER", "-aec", "CTSEG", "127.0.0.1", str(settings.dicom_port)],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and "Association Rejected" in refused.stdout + refused.stderr
        wrong_called = subprocess.run([echoscu, "-aet", "ORTHANC", "-aec", "NOTCTSEG", "127.0.0.1",
                                       str(settings.dicom_port)], capture_output=True, text=True, timeout=30)
        assert wrong_called.returncode != 0
        assert 'ctseg_dicom_associations_total{outcome="rejected"} 2.0' in client.get("/metrics").text


def test_a_series_with_a_slice_missing_fails_visibly(intensity_bundle, tmp_path, caplog):
    storescu = require_tool(STORESCU, "dcmtk's storescu (Debian package dcmtk)")
    settings = ctseg_settings(intensity_bundle, tmp_path / "storage", dicom_reassembly_minutes=0)
    datasets = ct_series()
    files = write_files(datasets[:12] + datasets[13:], tmp_path / "series")
    small = write_files(ct_series(series_number=7)[:5], tmp_path / "scout")  # under the route's 20 slices
    with TestClient(create_app(settings)) as client:
        for batch in (files, small):
            proc = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "CTSEG", "127.0.0.1",
                                   str(settings.dicom_port), *map(str, batch)], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
        job = wait_for(lambda: (j := jobs(client)) and j[0]["state"] == "failed" and j[0], 30, 0.2)
        assert "1 slice(s) missing" in job["error"] and job["error_kind"] == "input"
        assert f"job {job['id']} failed on its input (the reason is on the job)" in caplog.text
        assert "1 slice(s) missing" not in caplog.text  # an input's reason can name its series: kept off the log
        wait_for(lambda: "no route takes it; not run" in caplog.text, 10)
        assert len(jobs(client)) == 1  # the 5-slice series ran nothing and is not kept
        wait_for(lambda: not list((tmp_path / "storage" / "incoming").iterdir()), 10)
        assert not (tmp_path / "storage" / "jobs" / job["id"] / "input").exists()
