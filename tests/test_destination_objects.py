"""Each destination receives the objects it names (issue 21, point 5), tracked one delivery per object: a PACS
(real Orthanc, DICOMweb) configured for the SEG, the SR and the key image, and a planning system (a second real
Orthanc, C-STORE) for the RTSTRUCT only."""

from __future__ import annotations

import io
import json
import time

import pydicom
import pytest
import requests

from common import Serve, wait_for
from dicom_factory import to_bytes
from pacs import Orthanc, dicomweb_node, dimse_destination
from server.core.nodes import DimseNode
from test_pacs import ct_series


def modalities(orthanc: Orthanc, study_uid: str) -> dict[str, int]:
    r = requests.get(f"{orthanc.dicomweb}/studies/{study_uid}/series", timeout=10)
    if r.status_code == 204 or not r.content:
        return {}
    counts: dict[str, int] = {}
    for series in r.json():
        modality = series["00080060"]["Value"][0]
        counts[modality] = counts.get(modality, 0) + 1
    return counts


def test_a_pacs_gets_seg_sr_and_key_image_and_a_planning_system_the_rtstruct_each_tracked(intensity_bundle,
                                                                                          tmp_path):
    pacs, tps = Orthanc(tmp_path / "pacs").start(), Orthanc(tmp_path / "tps").start()
    destinations = [dicomweb_node("pacs", pacs) | {"objects": "dicom-seg,sr,sc"},
                    dimse_destination("tps", tps) | {"objects": ["rtstruct"]}]
    server = Serve(intensity_bundle, tmp_path / "storage", tmp_path / "ctseg.log",
                   CTSEG_DESTINATIONS=json.dumps(destinations), CTSEG_DEFAULT_DESTINATIONS="pacs,tps")
    datasets = ct_series()
    study = datasets[0].StudyInstanceUID
    try:
        server.start()
        files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
        job = requests.post(server.url + "/v1/segmentations", files=files, timeout=120).json()["id"]
        record = server.wait_finished(job)
        assert record["state"] == "succeeded", record
        # the objects the destinations receive are made even though the request asked for the label map only
        assert {"seg.dcm", "sr.dcm", "sc.dcm", "rtstruct.dcm"} <= set(record["results"]), record["results"]
        wait_for(lambda: all(d["state"] == "delivered" for d in server.job(job)["deliveries"]), 90, 0.3,
                 "every object delivered")
        deliveries = sorted((d["destination"], d["object"]) for d in server.job(job)["deliveries"])
        assert deliveries == [("pacs", "sc.dcm"), ("pacs", "seg.dcm"), ("pacs", "sr.dcm"), ("tps", "rtstruct.dcm")]
        time.sleep(2)
        sc = pydicom.dcmread(io.BytesIO(requests.get(f"{server.url}/v1/segmentations/{job}/sc.dcm", timeout=10).content))
        assert modalities(pacs, study) == {"SEG": 1, "SR": 1, sc.Modality: 1}
        assert modalities(tps, study) == {"RTSTRUCT": 1}
        assert pacs.new_instance_changes() == 3 and tps.new_instance_changes() == 1
        (series,) = requests.get(f"{tps.dicomweb}/studies/{study}/series", timeout=10).json()
        (instance,) = tps.seg_instances(study, series["0020000E"]["Value"][0])
        rt = pydicom.dcmread(io.BytesIO(tps.retrieve_instance(
            study, series["0020000E"]["Value"][0], instance["00080018"]["Value"][0])))
        assert rt.Modality == "RTSTRUCT" and rt.StudyInstanceUID == study
    finally:
        server.kill()
        pacs.stop()
        tps.stop()


def test_a_destination_that_names_nifti_or_an_unknown_object_is_refused_at_start():
    base = {"name": "x", "kind": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "X"}
    with pytest.raises(ValueError, match="DICOM objects"):
        DimseNode(**base, objects="nifti")
    with pytest.raises(ValueError, match="unknown output 'stl'"):
        DimseNode(**base, objects="dicom-seg,stl")
    assert DimseNode(**base).objects[0].value == "dicom-seg"
