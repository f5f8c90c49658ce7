"""Each destination receives the objects it names (issue 21, point 5), tracked one delivery per object: a PACS
(real Orthanc, DICOMweb) configured for the SEG, the SR, the key image and the RTSTRUCT, and a planning system (a
second real Orthanc, C-STORE) for the RTSTRUCT only; a DIMSE destination that refuses the LABELMAP SEG class gets
the BINARY SEG."""

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
from test_pacs import ct_series

from server.core.nodes import DimseNode


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
    destinations = [dicomweb_node("pacs", pacs) | {"objects": "dicom-seg,sr,sc,rtstruct"},
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
        assert deliveries == [("pacs", "rtstruct.dcm"), ("pacs", "sc.dcm"), ("pacs", "seg.dcm"), ("pacs", "sr.dcm"),
                              ("tps", "rtstruct.dcm")]
        time.sleep(2)
        sc = pydicom.dcmread(io.BytesIO(requests.get(f"{server.url}/v1/segmentations/{job}/sc.dcm", timeout=10).content))
        assert modalities(pacs, study) == {"SEG": 1, "SR": 1, "RTSTRUCT": 1, sc.Modality: 1}  # by STOW-RS
        assert modalities(tps, study) == {"RTSTRUCT": 1}
        assert pacs.new_instance_changes() == 4 and tps.new_instance_changes() == 1  # the RTSTRUCT by C-STORE
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


# A C-STORE SCP that accepts the BINARY Segmentation Storage class only (as dcm4chee does by default for the
# LABELMAP one): it writes each instance it receives to a folder, prints READY, and runs until killed.
BINARY_ONLY_SCP = """
import sys
from pathlib import Path
from pynetdicom import AE, evt
from pynetdicom.sop_class import SegmentationStorage, Verification
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
port, folder = int(sys.argv[1]), Path(sys.argv[2])
def on_store(event):
    ds = event.dataset
    ds.file_meta = event.file_meta
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return 0x0000
ae = AE(ae_title="BINONLY")
ae.add_supported_context(SegmentationStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
ae.add_supported_context(Verification)
server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
print("READY", flush=True)
import time
while True:
    time.sleep(1)
"""


def test_a_destination_refusing_labelmap_seg_at_association_gets_the_binary_seg_with_a_note(intensity_bundle,
                                                                                           tmp_path):
    import subprocess
    import sys

    from common import free_port

    from server.core.vocabulary import SegType
    from server.imaging.sop import SEG_STORAGE

    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen([sys.executable, "-c", BINARY_ONLY_SCP, str(port), str(received)], stdout=subprocess.PIPE,
                           text=True)
    assert scp.stdout.readline().strip() == "READY"
    node = {"name": "strict", "kind": "dimse", "host": "127.0.0.1", "port": port, "ae_title": "BINONLY"}
    server = Serve(intensity_bundle, tmp_path / "storage", tmp_path / "ctseg.log", CTSEG_SEG_TYPE="LABELMAP",
                   CTSEG_DESTINATIONS=json.dumps([node]), CTSEG_DEFAULT_DESTINATIONS="strict")
    datasets = ct_series()
    try:
        server.start()
        files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
        job = requests.post(server.url + "/v1/segmentations", files=files, timeout=120).json()["id"]
        assert server.wait_finished(job)["state"] == "succeeded"
        (delivery,) = wait_for(lambda: (d := server.job(job)["deliveries"]) and d[0]["state"] != "pending" and d, 60,
                               0.3, "the delivery settled")
        assert delivery["state"] == "delivered" and "refused Label Map Segmentation Storage" in delivery["warning"]
        (stored,) = received.glob("*.dcm")
        seg = pydicom.dcmread(stored)
        assert seg.SOPClassUID == SEG_STORAGE[SegType.BINARY] and seg.SegmentationType == "BINARY"
        assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
        kept = pydicom.dcmread(io.BytesIO(requests.get(f"{server.url}/v1/segmentations/{job}/seg.dcm",
                                                       timeout=10).content))
        assert kept.SOPClassUID == SEG_STORAGE[SegType.LABELMAP]  # the job's own SEG is the one asked for
    finally:
        server.kill()
        scp.kill()
