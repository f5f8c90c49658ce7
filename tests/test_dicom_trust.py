"""Trust and memory on the DICOM port, with a real ``ctseg serve`` and real senders (pynetdicom in a subprocess,
bound to a chosen loopback address): a calling AE title claimed from another address gets no SEG back; an SR and a
presentation state beside the CT are accepted and dropped; an instance over the size cap is refused with its status;
a deflate bomb sent by C-STORE leaves the API process small."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import requests
from common import wait_for
from dicom_factory import write_files
from pacs import Orthanc, dimse_destination
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    generate_uid,
)
from test_dicom_node import node, seg_instances_in
from test_pacs import ct_series

# Sends the files in one association from ``bind`` (an address of 127/8) as the sender did in the field: the data sets
# as they are on disk (pynetdicom's chunked send: a deflated file is never inflated here), and an abort when a file's
# presentation context was refused. Prints {"aborted": bool, "statuses": [...]}.
SENDER = """
import json, sys
from pathlib import Path
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
_config.STORE_SEND_CHUNKED_DATASET = True
port, aet, bind, files = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
metas = [(f, read_file_meta_info(f)) for f in files]
ae = AE(ae_title=aet)
for sop_class, syntax in dict.fromkeys((m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for _, m in metas):
    ae.add_requested_context(sop_class, syntax)
assoc = ae.associate("127.0.0.1", port, ae_title="CTSEG", bind_address=(bind, 0))
assert assoc.is_established, "association not established"
statuses = []
for f, m in metas:
    if not any(cx.abstract_syntax == m.MediaStorageSOPClassUID and cx.transfer_syntax[0] == m.TransferSyntaxUID
               for cx in assoc.accepted_contexts):
        assoc.abort()
        print(json.dumps({"aborted": True, "statuses": statuses}))
        sys.exit(0)
    answer = assoc.send_c_store(Path(f))
    statuses.append(int(answer.Status) if "Status" in answer else None)
assoc.release()
print(json.dumps({"aborted": False, "statuses": statuses}))
"""


def send(port: int, files: list[Path], aet: str = "MODALITY", bind: str = "127.0.0.1") -> dict:
    proc = subprocess.run([sys.executable, "-c", SENDER, str(port), aet, bind, *map(str, files)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_job(server, timeout: float = 120.0) -> dict:
    (job,) = wait_for(lambda: (j := server.jobs()) and j, timeout, 0.2, "a job made of the received series")
    return server.wait_finished(job["id"], timeout)


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def beside_the_ct(ct: Dataset, sop_class: str, modality: str) -> Dataset:
    """A non-image object of the same study (an SR or a presentation state), as a PACS forwards it with the CT."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ct.StudyInstanceUID, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "Phantom^Test", "P1", modality, 9, 1
    return ds


def test_a_calling_ae_title_from_another_address_gets_no_seg_back_the_real_sender_does(intensity_bundle, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()  # the configured DIMSE destination, at 127.0.0.1
    server = node(intensity_bundle, tmp_path, None, CTSEG_DESTINATIONS=json.dumps([dimse_destination("pacs", orthanc)]))
    spoofed, genuine = ct_series(), ct_series()
    try:
        server.start()
        answer = send(server.dicom_port, write_files(spoofed, tmp_path / "spoofed"), Orthanc.AE_TITLE, "127.0.0.2")
        assert answer == {"aborted": False, "statuses": [0] * len(spoofed)}
        job = one_job(server)
        assert job["state"] == "succeeded", job
        assert job["deliveries"] == [] and job["destinations"] == []
        assert any("no SEG back to the sender" in n and "'pacs'" in n for n in job["notes"]), job["notes"]
        assert "which is not their address: no SEG goes back to it" in server.log.read_text()

        send(server.dicom_port, write_files(genuine, tmp_path / "genuine"), Orthanc.AE_TITLE, "127.0.0.1")
        real = wait_for(lambda: (j := server.jobs()) and len(j) == 2 and j[0], 60, 0.2)
        real = server.wait_finished(real["id"])
        assert real["destinations"] == ["pacs"], real
        wait_for(lambda: server.job(real["id"])["deliveries"][0]["state"] == "delivered", 60, 0.2)
        assert len(seg_instances_in(orthanc, genuine[0].StudyInstanceUID)) == 1
        assert seg_instances_in(orthanc, spoofed[0].StudyInstanceUID) == []  # nothing written into that study
    finally:
        server.kill()
        orthanc.stop()


def test_an_sr_and_a_presentation_state_beside_the_ct_are_dropped_and_the_ct_runs(intensity_bundle, tmp_path):
    server = node(intensity_bundle, tmp_path, None)
    ct = ct_series()
    others = [beside_the_ct(ct[0], BasicTextSRStorage, "SR"),
              beside_the_ct(ct[0], GrayscaleSoftcopyPresentationStateStorage, "PR")]
    files = write_files(ct[:15] + others + ct[15:], tmp_path / "study")
    try:
        server.start()
        assert send(server.dicom_port, files) == {"aborted": False, "statuses": [0] * len(files)}
        job = one_job(server)
        assert job["state"] == "succeeded" and job["input"]["files"] == len(ct), job
        assert len(server.jobs()) == 1  # the SR and the PR made no series of their own
        assert ("dropped 1 Basic Text SR Storage, 1 Grayscale Softcopy Presentation State Storage"
                in server.log.read_text())
        assert not list((tmp_path / "storage" / "receiving").iterdir())
    finally:
        server.kill()


def test_an_instance_over_the_size_cap_is_refused_with_its_status(intensity_bundle, tmp_path):
    server = node(intensity_bundle, tmp_path, None, CTSEG_DICOM_MAX_INSTANCE_MB="1")
    small, big = ct_series()[:2]
    big.Rows = big.Columns = 1024  # 2 MB of pixels: over the 1 MB cap
    big.PixelData = np.zeros((1024, 1024), np.int16).tobytes()
    try:
        server.start()
        answer = send(server.dicom_port, write_files([small, big], tmp_path / "two"))
        assert answer == {"aborted": False, "statuses": [0x0000, 0xA701]}  # Refused: Out of Resources, ctseg's code
        incoming = list((tmp_path / "storage" / "incoming").rglob("*.dcm"))
        assert len(incoming) == 1 and incoming[0].stat().st_size < 2**20  # only the small one is kept
        assert not list((tmp_path / "storage" / "receiving").iterdir())
        assert "over CTSEG_DICOM_MAX_INSTANCE_MB (1 MB)" in server.log.read_text()
    finally:
        server.kill()


def deflate_bomb(ct: Dataset, path: Path, side: int = 16000) -> Path:
    """A deflated CT instance declaring side x side 16-bit pixels (512 MB of zeros), about half a megabyte on disk;
    written in chunks, so the test never holds it inflated either."""
    ct = ct.copy()
    del ct.PixelData
    ct.Rows = ct.Columns = side
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ct)
    length = side * side * 2
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, ct.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(16 << 20)
    with path.open("wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(z.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)))
        for _ in range(length // len(zeros)):
            f.write(z.compress(zeros))
        f.write(z.flush())
    return path


def test_a_deflate_bomb_by_c_store_leaves_the_api_process_small_and_serving(intensity_bundle, tmp_path):
    server = node(intensity_bundle, tmp_path, None)
    ct = ct_series()
    bomb = deflate_bomb(ct[0], tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 2**20
    try:
        server.start()
        before = vm_hwm_kb(server.proc.pid)
        answer = send(server.dicom_port, [bomb])
        grew_mb = (vm_hwm_kb(server.proc.pid) - before) / 1024
        assert grew_mb < 100, f"the API process peaked {grew_mb:.0f} MB higher on a 512 MB deflate bomb"
        assert answer == {"aborted": False, "statuses": [0xC000]}  # refused on its declared size, from its header
        assert not list((tmp_path / "storage" / "incoming").rglob("*.dcm"))
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
        assert (vm_hwm_kb(server.proc.pid) - before) / 1024 < 100
    finally:
        server.kill()
