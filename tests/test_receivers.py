"""Several DICOM receivers (CTSEG_ROLE=dicom) behind one address, sharing a real PostgreSQL and one storage folder:
a series may come over parallel associations at different receivers; it is run once, whole, only after every
association that carried it closed; a receiver that dies with an association open leaves that part cut off until
the series is sent again, and the resend gives one SEG, in a real Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from common import Serve, free_port
from dicom_factory import write_files
from pacs import Orthanc, dicomweb_node
from test_dicom_node import seg_instances_in, storescu
from test_pacs import ct_series, referenced_instances, seg_from_orthanc
from test_scale_out import Worker

# Sends its files over one association, says SENT, and holds the association open until a line on stdin.
HOLDING_SENDER = """
import sys, time
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from pydicom.uid import ExplicitVRLittleEndian
port, files = int(sys.argv[1]), sys.argv[2:]
ae = AE(ae_title="MODALITY")
ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
assoc = ae.associate("127.0.0.1", port, ae_title="CTSEG")
assert assoc.is_established
for path in files:
    assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
print("SENT", flush=True)
sys.stdin.readline()
assoc.release()
print("RELEASED", flush=True)
"""


def receivers(tmp_path, bundle, url: str, orthanc: Orthanc) -> tuple[list[Serve], Worker]:
    env = {"CTSEG_DATABASE_URL": url, "CTSEG_ROLE": "dicom", "CTSEG_JOB_LEASE_S": "3",
           "CTSEG_DICOM_STABLE_SECONDS": "1", "CTSEG_DELIVERY_RETRY_BASE_S": "0.5", "CTSEG_DELIVERY_RETRY_MAX_S": "2",
           "CTSEG_DESTINATIONS": json.dumps([dicomweb_node("pacs", orthanc)]), "CTSEG_DEFAULT_DESTINATIONS": "pacs"}
    nodes = []
    for n in range(2):
        port = free_port()
        node = Serve(bundle, tmp_path / "shared", tmp_path / f"receiver{n}.log", CTSEG_DICOM_PORT=str(port), **env)
        node.dicom_port = port  # type: ignore[attr-defined]
        nodes.append(node.start())
    base = {**nodes[0].env}
    for key in ("CTSEG_PORT", "CTSEG_DICOM_PORT"):
        base.pop(key)
    return nodes, Worker(base, tmp_path / "worker.log").start()


def hold(port: int, files) -> subprocess.Popen:
    sender = subprocess.Popen([sys.executable, "-c", HOLDING_SENDER, str(port), *map(str, files)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sender.stdout.readline().strip() == "SENT"
    return sender


def test_a_series_over_parallel_associations_at_two_receivers_runs_once_whole_after_both_closed(
        intensity_bundle, tmp_path, pg_cluster):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    datasets = ct_series()
    files = write_files(datasets, tmp_path / "series")
    nodes, worker = [], None
    try:
        nodes, worker = receivers(tmp_path, intensity_bundle, pg_cluster.new_database(), orthanc)
        first = hold(nodes[0].dicom_port, files[: len(files) // 2])  # open at receiver 0
        storescu(nodes[1].dicom_port, files[len(files) // 2:])  # the rest at receiver 1, released
        time.sleep(4)  # several quiet periods: receiver 0's association is still open
        assert nodes[0].jobs() == [] and nodes[1].jobs() == []
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "RELEASED"
        seg = seg_from_orthanc(orthanc, datasets[0].StudyInstanceUID)
        assert referenced_instances(seg) == {ds.SOPInstanceUID for ds in datasets}
        (job,) = nodes[1].jobs()  # one job, routed by one of the receivers, seen by both
        assert [j["id"] for j in nodes[0].jobs()] == [job["id"]]
        assert job["state"] == "succeeded" and job["input"]["files"] == len(datasets)
        time.sleep(3)
        assert len(seg_instances_in(orthanc, datasets[0].StudyInstanceUID)) == 1
        assert orthanc.new_instance_changes() == 1
    finally:
        for p in [*nodes, *([worker] if worker else [])]:
            p.kill()
        orthanc.stop()


def test_a_receiver_killed_with_its_part_open_leaves_the_series_cut_off_until_it_is_sent_again(
        intensity_bundle, tmp_path, pg_cluster):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    datasets = ct_series()
    files = write_files(datasets, tmp_path / "series")
    nodes, worker = [], None
    try:
        nodes, worker = receivers(tmp_path, intensity_bundle, pg_cluster.new_database(), orthanc)
        first = hold(nodes[0].dicom_port, files[: len(files) // 2])
        storescu(nodes[1].dicom_port, files[len(files) // 2:])
        nodes[0].kill()  # receiver 0 dies with its association open: nobody will close it
        first.kill()
        time.sleep(10)  # past the association's renewal deadline (2 leases) and several quiet periods
        assert nodes[1].jobs() == []  # the part receiver 0 held is cut off: not run
        assert seg_instances_in(orthanc, datasets[0].StudyInstanceUID) == []
        storescu(nodes[1].dicom_port, files)  # the sender's retry, whole, to the receiver that lives
        seg = seg_from_orthanc(orthanc, datasets[0].StudyInstanceUID)
        assert referenced_instances(seg) == {ds.SOPInstanceUID for ds in datasets}
        (job,) = nodes[1].jobs()
        assert job["state"] == "succeeded" and job["input"]["files"] == len(datasets)
        time.sleep(3)
        assert orthanc.new_instance_changes() == 1
    finally:
        for p in [*nodes, *([worker] if worker else [])]:
            p.kill()
        orthanc.stop()
