"""A route's ``outputs``: read by the API's parser when the settings load (a typo is a start-up error naming the
choices), and what a received series' job writes: a route asking for ``dicom-seg,sr`` gives seg.dcm and sr.dcm,
the SR referencing that SEG."""

from __future__ import annotations

import io
import subprocess
import time

import highdicom as hd
import pydicom
import pytest
from common import require_tool, wait_for
from dicom_factory import write_files
from fastapi.testclient import TestClient
from pydantic import ValidationError
from test_dicom_node import STORESCU
from test_pacs import ct_series, ctseg_settings

from server.app import create_app
from server.core.nodes import Route
from server.core.settings import Settings
from server.core.vocabulary import OUTPUT_CHOICES, Output
from server.imaging.sop import COMPREHENSIVE_3D_SR_STORAGE


def test_a_route_reads_outputs_like_the_api_and_defaults_to_the_seg():
    assert Route().outputs == (Output.DICOM_SEG,)  # as before routes had outputs
    assert Route(outputs="dicom-seg, SR").outputs == (Output.DICOM_SEG, Output.SR)
    assert Route(outputs="both,sr").outputs == (Output.NIFTI, Output.DICOM_SEG, Output.SR)
    assert Route(outputs=["rtstruct", "sc"]).outputs == (Output.RTSTRUCT, Output.SC)  # a JSON list is taken too
    with pytest.raises(ValidationError) as err:
        Route(outputs="dicom-seg,rt-struct")
    assert "'rt-struct'" in str(err.value) and all(name in str(err.value) for name in OUTPUT_CHOICES)
    with pytest.raises(ValidationError, match="outputs must name at least one"):
        Route(outputs=" , ")


def test_routes_from_the_environment_carry_their_outputs(monkeypatch, intensity_bundle, tmp_path):
    monkeypatch.setenv("CTSEG_ROUTES", '[{"series_description": "^Abdomen", "outputs": "dicom-seg,rtstruct"}, {}]')
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path)
    assert [r.outputs for r in settings.routes] == [(Output.DICOM_SEG, Output.RTSTRUCT), (Output.DICOM_SEG,)]
    monkeypatch.setenv("CTSEG_ROUTES", '[{"outputs": "dicom-seg,report"}]')
    with pytest.raises(ValidationError, match="unknown output 'report'"):
        Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path)


def test_a_route_with_seg_and_sr_gives_a_received_series_both(intensity_bundle, tmp_path):
    storescu = require_tool(STORESCU, "dcmtk's storescu (Debian package dcmtk)")
    datasets = ct_series()
    files = write_files(datasets, tmp_path / "series")
    settings = ctseg_settings(intensity_bundle, tmp_path / "storage", routes=[Route(outputs="dicom-seg,sr")],
                              dicom_allowed_ae_titles=["MODALITY"])
    with TestClient(create_app(settings)) as client:
        proc = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "CTSEG", "127.0.0.1", str(settings.dicom_port),
                               *map(str, files)], capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        started = time.monotonic()
        job = wait_for(lambda: [j for j in client.get("/v1/segmentations").json()["jobs"]
                                if j["state"] not in ("staging", "queued", "running")], 60, 0.2)[0]
        assert job["state"] == "succeeded", job
        assert job["outputs_requested"] == ["dicom-seg", "sr"]
        assert {"seg.dcm", "sr.dcm"} <= set(job["results"]) and "labelmap.nii.gz" not in job["results"]
        seg = pydicom.dcmread(io.BytesIO(client.get(job["results"]["seg.dcm"]).content))
        sr = hd.sr.srread(io.BytesIO(client.get(job["results"]["sr.dcm"]).content))
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE
        assert sr.StudyInstanceUID == seg.StudyInstanceUID == datasets[0].StudyInstanceUID
        groups = sr.content.get_volumetric_roi_measurement_groups()
        assert groups and {g.referenced_segment.referenced_sop_instance_uid for g in groups} == {seg.SOPInstanceUID}
        assert time.monotonic() - started < 60
