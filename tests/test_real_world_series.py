"""Series as real scanners send them, through the real API: a localizer (scout) and a reformat inside the CT
series, slice spacing that drifts within the per-gap tolerance, several Enhanced CT instances, and several
acquisitions (phases) of the same slices, chosen by the request or by the route of a received series.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from common import require_tool, wait_for
from dicom_factory import enhanced_from_image, series_from_image, to_bytes, write_files
from fastapi.testclient import TestClient
from phantoms import make_phantom
from pydantic import ValidationError
from test_api import phantom, read_labelmap, read_seg
from test_dicom_node import STORESCU
from test_pacs import ctseg_settings

from server.app import create_app
from server.core.nodes import Route
from server.core.settings import Settings

Files = list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def client(intensity_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("real-world") / "storage"
    with TestClient(create_app(Settings(bundle_dirs=[intensity_bundle], storage_dir=storage, sw_overlap=0.25))) as c:
        yield c


def files_of(datasets: list[pydicom.Dataset]) -> Files:
    return [(f"IM{i:04d}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]


def post(client: TestClient, files: Files, **params):  # type: ignore[no-untyped-def]
    return client.post("/v1/segmentations", files=[("files", (n, d, "application/octet-stream")) for n, d in files],
                       params={"wait": "true", **params})


def referenced(seg: pydicom.Dataset) -> set[str]:
    return {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}


def same_series(datasets: list[pydicom.Dataset], like: pydicom.Dataset) -> list[pydicom.Dataset]:
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = like.StudyInstanceUID, like.SeriesInstanceUID
        ds.FrameOfReferenceUID = like.FrameOfReferenceUID
    return datasets


def test_localizer_and_a_reformat_in_the_series_are_left_out_with_a_note(client):
    axial = series_from_image(phantom("axial")[0])
    scout = same_series(series_from_image(phantom("coronal")[0])[:1], axial[0])[0]
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    reformat = same_series(series_from_image(phantom("sagittal")[0])[5:6], axial[0])[0]
    reformat.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]  # no LOCALIZER: left out by its orientation
    r = post(client, files_of([scout, *axial[:12], reformat, *axial[12:]]), outputs="both")
    assert r.status_code == 200, r.text[:500]
    job = r.json()
    assert job["input"]["files"] == len(axial)
    assert "1 localizer (scout) image(s) were left out of the volume" in job["notes"]
    assert any(n.startswith("1 image(s) with a different ImageOrientationPatient") for n in job["notes"]), job["notes"]
    assert not any(scout.SOPInstanceUID in n or "IM0" in n for n in job["notes"])  # counts, no UIDs or file names
    assert referenced(read_seg(client, job["id"])) == {ds.SOPInstanceUID for ds in axial}
    assert read_labelmap(client, job["id"]).GetSize()[2] == len(axial)


def with_gaps(datasets: list[pydicom.Dataset], gaps: list[float]) -> list[pydicom.Dataset]:
    x, y, z = (float(v) for v in datasets[0].ImagePositionPatient)
    for ds, offset in zip(datasets, np.concatenate([[0.0], np.cumsum(gaps)])):
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y:.4f}", f"{z + offset:.4f}"]
    return datasets


def test_spacing_that_drifts_within_the_per_gap_tolerance_is_refused_naming_the_worst_offset(client):
    # 15 gaps of 2.5 mm then 14 of 2.6 mm: each gap within 5 % of the median, yet the grid the volume assumes
    # (2.548 mm from first to last slice) puts slice 16 0.72 mm away from where it is.
    drifting = with_gaps(series_from_image(phantom("axial")[0]), [2.5] * 15 + [2.6] * 14)
    r = post(client, files_of(drifting))
    assert r.status_code == 422, r.text[:500]
    body = r.json()
    assert "slice positions drift off a uniform grid: slice 16 of 30" in body["detail"], body["detail"]
    assert body["drift"]["slice"] == 16 and body["drift"]["offset_mm"] == pytest.approx(-0.724, abs=0.002)
    assert body["drift"]["tolerance_mm"] == pytest.approx(0.51, abs=0.01)
    # positions that jitter by up to 0.05 mm around a uniform 2.5 mm grid are no drift: accepted
    jitter = np.random.default_rng(1).uniform(-0.05, 0.05, 30)
    jittering = with_gaps(series_from_image(phantom("axial")[0]), list(2.5 + np.diff(jitter)))
    assert post(client, files_of(jittering)).status_code == 200


def test_several_enhanced_ct_instances_are_refused_at_staging(client):
    image, _ = phantom("axial")
    lower, upper = enhanced_from_image(image[:, :, :15]), enhanced_from_image(image[:, :, 15:])
    same_series([upper], lower)
    jobs_before = client.get("/v1/segmentations").json()["jobs"]
    r = post(client, [("a.dcm", to_bytes(lower)), ("b.dcm", to_bytes(upper))], outputs="both")
    assert r.status_code == 422, r.text[:500]  # before any inference: no job left behind
    assert "the series holds 2 multi-frame (Enhanced CT) instance(s)" in r.json()["detail"]
    assert "job" not in r.json() and client.get("/v1/segmentations").json()["jobs"] == jobs_before
    singles = same_series(series_from_image(image[:, :, 15:]), lower)
    r = post(client, [("a.dcm", to_bytes(lower)), *files_of(singles)], outputs="both")
    assert r.status_code == 422 and "1 multi-frame (Enhanced CT) instance(s) and 15 single-frame" in r.json()["detail"]


def two_phases() -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    """Arterial and venous acquisitions of the same slices in one series (as some scanners export them)."""
    arterial = series_from_image(phantom("axial")[0])
    venous = same_series(series_from_image(make_phantom((40, 36, 30), (2.0, 2.0, 2.5), seed=4, noise=3.0)[0]),
                         arterial[0])
    for number, time_of_day, phase in ((1, "120000", arterial), (2, "120130.5", venous)):
        for ds in phase:
            ds.AcquisitionNumber, ds.AcquisitionTime, ds.ContentTime = number, time_of_day, time_of_day
    return arterial, venous


def test_two_phase_series_lists_its_phases_then_segments_the_one_asked_for(client):
    arterial, venous = two_phases()
    files = files_of(venous[::-1] + arterial)  # order of the files does not matter
    r = post(client, files)
    assert r.status_code == 422, r.text[:500]
    body = r.json()
    assert "the series holds 2 acquisitions (phases)" in body["detail"]
    assert body["phases"] == [
        {"number": 1, "slices": 30, "acquisition_number": 1, "time": "12:00:00"},
        {"number": 2, "slices": 30, "acquisition_number": 2, "time": "12:01:30"},
    ]
    r = post(client, files, phase="first", outputs="dicom-seg")
    assert r.status_code == 200, r.text[:500]
    job = r.json()
    assert job["input"]["files"] == 30 and job["input"]["phase"] == "first"
    assert any("phase 1 of them (30 slices, phase=first)" in n for n in job["notes"]), job["notes"]
    assert referenced(read_seg(client, job["id"])) == {ds.SOPInstanceUID for ds in arterial}
    r = post(client, files, phase="2", outputs="dicom-seg")
    assert r.status_code == 200, r.text[:500]
    assert referenced(read_seg(client, r.json()["id"])) == {ds.SOPInstanceUID for ds in venous}
    assert client.get(f"/v1/segmentations/{r.json()['id']}").json()["input"]["phase"] == "2"  # kept in the record
    r = post(client, files, phase="3")
    assert r.status_code == 422 and "phase 3 was asked for; the series holds 2" in r.json()["detail"]
    r = post(client, files, phase="middle")
    assert r.status_code == 422 and "phase must be first, last or a phase number" in r.json()["detail"]


def test_phases_of_a_study_across_midnight_keep_their_order(client):
    """23:59:30 on one day, then 00:01:00 on the next: the first is the earlier one, not the later time of day."""
    arterial, venous = two_phases()
    for when, day, phase in (("235930", "20261201", arterial), ("000100", "20261202", venous)):
        for ds in phase:
            ds.AcquisitionTime = ds.ContentTime = when
            ds.AcquisitionDate = ds.ContentDate = day
            del ds.AcquisitionNumber  # the times alone tell the acquisitions apart
    files = files_of(venous + arterial)
    r = post(client, files)
    assert r.status_code == 422, r.text[:500]
    assert [p["time"] for p in r.json()["phases"]] == ["23:59:30", "00:01:00"]
    r = post(client, files, phase="first", outputs="dicom-seg")
    assert r.status_code == 200, r.text[:500]
    assert referenced(read_seg(client, r.json()["id"])) == {ds.SOPInstanceUID for ds in arterial}


def test_a_route_chooses_the_phase_of_a_received_series(intensity_bundle, tmp_path):
    storescu = require_tool(STORESCU, "dcmtk's storescu (Debian package dcmtk)")
    with pytest.raises(ValidationError, match="phase must be first, last or a phase number"):
        Route(phase="newest")
    arterial, venous = two_phases()
    files = write_files(arterial + venous, tmp_path / "series")
    settings = ctseg_settings(intensity_bundle, tmp_path / "storage", routes=[Route(phase="last")],
                              dicom_allowed_ae_titles=["MODALITY"])
    with TestClient(create_app(settings)) as client:
        proc = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "CTSEG", "127.0.0.1", str(settings.dicom_port),
                               *map(str, files)], capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        started = time.monotonic()
        job = wait_for(lambda: [j for j in client.get("/v1/segmentations").json()["jobs"]
                                if j["state"] not in ("staging", "queued", "running")], 60, 0.2)[0]
        assert job["state"] == "succeeded", job
        assert job["input"]["files"] == 30 and job["input"]["phase"] == "last"
        assert referenced(read_seg(client, job["id"])) == {ds.SOPInstanceUID for ds in venous}
        assert time.monotonic() - started < 60
