"""The SR (TID 1500, server/imaging/sr.py) against dciodvfy and dcmtk's dsrdump, read back with highdicom: one
group per label found, the volume volumes.json gives, and a reference that resolves to the SEG's segment."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from common import require_tool
from dicom_factory import series_from_image, write_files
from pydicom.sr.codedict import codes
from test_api import phantom
from test_dicom_conformance import dciodvfy_errors

from server.core.vocabulary import InputKind, Output
from server.inference.engine import Engine
from server.inference.pipeline import run_pipeline

DSRDUMP = shutil.which("dsrdump")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def results(intensity_bundle, tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("sr")
    files = write_files(series_from_image(phantom("axial")[0]), tmp / "in")
    engine = Engine.from_dir(intensity_bundle, overlap=0.25)
    out = {}
    for name, outputs in (("with-seg", (Output.DICOM_SEG, Output.SR)), ("sr-only", (Output.SR,))):
        run_pipeline(engine, InputKind.DICOM, files, tmp / name, outputs, result_id="sr-test-job")
        out[name] = tmp / name
    return out


def test_dciodvfy_and_dsrdump_accept_the_sr(results):
    path = results["with-seg"] / "sr.dcm"
    assert dciodvfy_errors(path) == []
    proc = subprocess.run([require_tool(DSRDUMP, "dsrdump (Debian package dcmtk)"), str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "Imaging Measurement Report" in proc.stdout, proc.stderr
    assert "error" not in proc.stderr.lower()


def test_one_group_per_label_found_with_volumes_json_and_the_seg_segment(results):
    folder = results["with-seg"]
    volumes = json.loads((folder / "volumes.json").read_text())["labels"]
    seg = pydicom.dcmread(folder / "seg.dcm")
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    sr = hd.sr.srread(folder / "sr.dcm")
    groups = sr.content.get_volumetric_roi_measurement_groups()
    present = {name: item for name, item in volumes.items() if item["voxels"]}
    assert len(present) == 2 and len(groups) == len(present)
    for group in groups:
        item = present[group.tracking_identifier]
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        assert float(volume.value) == item["ml"] and volume.unit.value == "ml"
        mean = next(m for m in group.get_measurements(name=codes.DCM.AttenuationCoefficient)
                    if m.derivation == codes.SCT.Mean)
        assert float(mean.value) == pytest.approx(item["hu_mean"], abs=0.05)
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == seg.SOPClassUID
        number = ref.referenced_segment_numbers[0]
        assert number == item["value"]
        assert segments[number].TrackingUID == group.tracking_uid  # one finding, two objects
        assert segments[number].SegmentLabel == group.tracking_identifier.replace("_", " ")
        flags = {e.value.value for e in group.get_qualitative_evaluations()}
        assert len(flags) == len(item["flags"])
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.PatientID == seg.PatientID
    assert sr.SeriesInstanceUID != seg.SeriesInstanceUID
    device = sr.ContentSequence  # the observer is the algorithm: bundle name and version
    names = {str(i.get("TextValue", "")) for i in device if "TextValue" in i}
    assert "intensity-test 1.0.0" in names


def test_without_the_seg_the_sr_references_the_seg_the_same_result_would_have(results):
    assert not (results["sr-only"] / "seg.dcm").exists()
    with_seg = hd.sr.srread(results["with-seg"] / "sr.dcm")
    alone = hd.sr.srread(results["sr-only"] / "sr.dcm")
    refs = [g.referenced_segment.referenced_sop_instance_uid
            for g in alone.content.get_volumetric_roi_measurement_groups()]
    assert set(refs) == {pydicom.dcmread(results["with-seg"] / "seg.dcm").SOPInstanceUID}
    assert alone.SOPInstanceUID == with_seg.SOPInstanceUID  # one result, one SR: a resend replaces it
    assert alone.SOPClassUID == COMPREHENSIVE_3D_SR
