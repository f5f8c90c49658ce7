"""Trust and memory on the DICOM port, with a real ``ctseg serve`` and real senders (pynetdicom in a subprocess,
bound to a chosen loopback address): a calling AE title claimed from another address gets no SEG back; an SR and a
presentation state beside the CT are accepted and dropped; an instance over the size cap aborts its association;
a deflate bomb sent by C-STORE, a 200 MB C-FIND identifier and a 200 MB PDU leave the API process small; an instance
is received into receiving/; a series partly from an unverified association gets no SEG back; peer allow-list."""

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


def test_an_instance_over_the_size_cap_aborts_its_association_and_leaves_nothing(intensity_bundle, tmp_path):
    """Aborted as it passes the cap: a capped file stops changing, and the sweep of receiving/ would remove it while
    the peer still sends (the answer would then be 0xA700, not 0xA701)."""
    server = node(intensity_bundle, tmp_path, None, CTSEG_DICOM_MAX_INSTANCE_MB="1")
    small, big = ct_series()[:2]
    big.Rows = big.Columns = 1024  # 2 MB of pixels: over the 1 MB cap
    big.PixelData = np.zeros((1024, 1024), np.int16).tobytes()
    try:
        server.start()
        answer = send(server.dicom_port, write_files([small, big], tmp_path / "two"))
        assert answer == {"aborted": False, "statuses": [0x0000, None]}  # no answer to the big one: aborted
        incoming = list((tmp_path / "storage" / "incoming").rglob("*.dcm"))
        assert len(incoming) == 1 and incoming[0].stat().st_size < 2**20  # only the small one is kept
        wait_for(lambda: not list((tmp_path / "storage" / "receiving").iterdir()), 10, 0.2, "the partial file removed")
        assert "aborted: an instance over CTSEG_DICOM_MAX_INSTANCE_MB (1 MB)" in server.log.read_text()
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


# Messages no C-STORE sender sends, from one association (pynetdicom's own encoder, so the PDUs are well formed):
#   find SIZE_MB: a C-FIND-RQ with a SIZE_MB identifier on the Verification context, fragmented to the offered PDU;
#   pdu SIZE_MB: one P-DATA-TF PDU declaring SIZE_MB, streamed;
#   hold FILE: a C-STORE of FILE that pauses 3 s after its command and first data fragment (prints "holding").
# Prints {"established": bool, "aborted": bool} (aborted: by the peer, or the connection cut).
RAW_SENDER = """
import json, socket, struct, sys, time
from io import BytesIO
from pathlib import Path
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification, StudyRootQueryRetrieveInformationModelFind
mode, port, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ae = AE(ae_title="MODALITY")
ae.add_requested_context(Verification)
if mode == "hold":
    meta = read_file_meta_info(arg)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
assoc = ae.associate("127.0.0.1", port, ae_title="CTSEG")
if not assoc.is_established:
    print(json.dumps({"established": False, "aborted": assoc.is_aborted}))
    sys.exit(0)
status = None
try:
    if mode == "find":
        req = C_FIND()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
        req.Identifier = BytesIO(bytes(int(arg) << 20))
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
    elif mode == "pdu":
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBL", 4, 0, int(arg) << 20))
        chunk = bytes(1 << 20)
        for _ in range(int(arg)):
            raw.sendall(chunk)
    else:
        send_pdu, sent = assoc.dul.send_pdu, []
        def pausing(primitive):
            send_pdu(primitive)
            if isinstance(primitive, P_DATA):
                sent.append(1)
                if len(sent) == 2:
                    print("holding", flush=True)
                    time.sleep(3)
        assoc.dul.send_pdu = pausing
        answer = assoc.send_c_store(Path(arg))
        status = int(answer.Status) if "Status" in answer else None
except OSError:
    pass
deadline = time.monotonic() + 60
while mode != "hold" and assoc.is_alive() and not assoc.is_aborted and time.monotonic() < deadline:
    time.sleep(0.1)
aborted = assoc.is_aborted or not assoc.is_alive()
if not aborted:
    assoc.release()
print(json.dumps({"established": True, "aborted": aborted, "status": status}))
"""


def raw_send(mode: str, port: int, arg: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", RAW_SENDER, mode, str(port), arg], check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_200_mb_c_find_identifier_or_pdu_aborts_its_association_and_leaves_the_api_process_small(
        intensity_bundle, tmp_path):
    server = node(intensity_bundle, tmp_path, None)
    try:
        server.start()
        before = vm_hwm_kb(server.proc.pid)
        for mode in ("find", "pdu"):
            answer = raw_send(mode, server.dicom_port, "200")
            grew_mb = (vm_hwm_kb(server.proc.pid) - before) / 1024
            assert grew_mb < 100, f"the API process peaked {grew_mb:.0f} MB higher on a 200 MB {mode}"
            assert answer["established"] and answer["aborted"], (mode, answer)
        log = server.log.read_text()
        assert "aborted: data sets of messages other than C-STORE over 1 MiB" in log
        assert "aborted: a PDU of 209715200 bytes" in log
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
        ct = ct_series()
        assert send(server.dicom_port, write_files(ct, tmp_path / "after")) == {"aborted": False,
                                                                                "statuses": [0] * len(ct)}
        assert one_job(server)["state"] == "succeeded"
    finally:
        server.kill()


def test_an_instance_is_received_into_storage_receiving_as_it_arrives(intensity_bundle, tmp_path):
    """The receive-to-disk patch of pynetdicom at work: were it to stop working (a pynetdicom release renaming what
    it patches), the instance would be held in memory, or written to the default temp folder."""
    server = node(intensity_bundle, tmp_path, None)
    ct = ct_series()[0]
    ct.Rows = ct.Columns = 1024  # 2 MB: three PDUs of the 1 MB offered
    ct.PixelData = np.zeros((1024, 1024), np.int16).tobytes()
    (file,) = write_files([ct], tmp_path / "one")
    receiving = tmp_path / "storage" / "receiving"
    try:
        server.start()
        sender = subprocess.Popen([sys.executable, "-c", RAW_SENDER, "hold", str(server.dicom_port), str(file)],
                                  stdout=subprocess.PIPE, text=True)
        assert sender.stdout is not None
        assert sender.stdout.readline().strip() == "holding"
        partial = wait_for(lambda: [p for p in receiving.iterdir() if p.stat().st_size > 2**20 // 2], 2.5, 0.05,
                           "half the instance in receiving/ while the sender holds")
        assert len(partial) == 1 and partial[0].stat().st_size < ct.Rows * ct.Columns * 2
        out, _ = sender.communicate(timeout=60)
        assert json.loads(out.strip().splitlines()[-1]) == {"established": True, "aborted": False, "status": 0}
        assert len(list((tmp_path / "storage" / "incoming").rglob("*.dcm"))) == 1
        assert not list(receiving.iterdir())
    finally:
        server.kill()


def test_a_series_partly_from_an_unverified_association_gets_no_seg_back_to_the_sender(intensity_bundle, tmp_path):
    """The verified sender is kept only while every instance came from it: here the last association is the real
    destination's, the first one claimed its AE title from another address."""
    orthanc = Orthanc(tmp_path / "orthanc").start()
    server = node(intensity_bundle, tmp_path, None, CTSEG_DESTINATIONS=json.dumps([dimse_destination("pacs", orthanc)]),
                  CTSEG_DICOM_STABLE_SECONDS="4")
    ct = ct_series()
    files = write_files(ct, tmp_path / "series")
    try:
        server.start()
        assert send(server.dicom_port, files[:15], Orthanc.AE_TITLE, "127.0.0.2")["statuses"] == [0] * 15
        assert send(server.dicom_port, files[15:], Orthanc.AE_TITLE, "127.0.0.1")["statuses"] == [0] * 15
        job = one_job(server)
        assert job["state"] == "succeeded" and job["input"]["files"] == len(ct), job
        assert job["destinations"] == [] and job["deliveries"] == [], job
        assert seg_instances_in(orthanc, ct[0].StudyInstanceUID) == []
    finally:
        server.kill()
        orthanc.stop()


ECHO = """
import sys
from pynetdicom import AE
from pynetdicom.sop_class import Verification
ae = AE(ae_title="MODALITY")
ae.add_requested_context(Verification)
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="CTSEG", bind_address=(sys.argv[2], 0))
print("rejected" if assoc.is_rejected else "established" if assoc.is_established else "other")
if assoc.is_established:
    assoc.release()
"""


def test_allowed_peers_reject_an_association_from_another_address(intensity_bundle, tmp_path):
    server = node(intensity_bundle, tmp_path, None, CTSEG_DICOM_ALLOWED_PEERS="127.0.0.1/32, 10.0.0.0/8")
    try:
        server.start()
        answers = {bind: subprocess.run([sys.executable, "-c", ECHO, str(server.dicom_port), bind], check=True,
                                        capture_output=True, text=True, timeout=60).stdout.strip()
                   for bind in ("127.0.0.2", "127.0.0.1")}
        assert answers == {"127.0.0.2": "rejected", "127.0.0.1": "established"}
        assert "DICOM association from 127.0.0.2 rejected: not in CTSEG_DICOM_ALLOWED_PEERS" in server.log.read_text()
    finally:
        server.kill()
