"""The outbox and the PACS clients against real peers: a black-holed destination beside a healthy Orthanc, a DIMSE
peer that stores with warning statuses (a pynetdicom SCP, the way PACS gateways answer), and Orthanc's C-GET with
failed sub-operations."""

from __future__ import annotations

import io
import socket
import time

import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import LabelMapSegmentationStorage, SegmentationStorage

from common import free_port, wait_for
from dicom_factory import series_from_image, to_bytes
from pacs import Orthanc, dicomweb_node, dimse_destination
from server.app import create_app
from server.core.settings import Settings
from test_api import phantom
from test_pacs import ct_series


def small_series():
    image, _ = phantom(shape=(24, 24, 24))
    return series_from_image(image)


def upload(client: TestClient, datasets) -> dict:
    files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
    r = client.post("/v1/segmentations", files=files, params={"wait": "true"})
    assert r.status_code == 200, r.text
    return r.json()


class BlackHole:
    """A TCP port that accepts connections (the kernel completes the handshake) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def test_a_black_holed_destination_does_not_delay_a_healthy_one(intensity_bundle, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    hole = BlackHole()
    dead = {"name": "dead", "kind": "dimse", "host": "127.0.0.1", "port": hole.port, "ae_title": "NOBODY",
            "timeout_s": 5}
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage",
                        destinations=[dead, dicomweb_node("pacs", orthanc)], default_destinations=["dead", "pacs"],
                        delivery_retry_base_s=1.0, delivery_retry_max_s=30.0)
    try:
        with TestClient(create_app(settings)) as client:
            latencies = []
            for _ in range(20):
                job = upload(client, small_series())
                done = time.time()
                delivered = wait_for(lambda: [d for d in client.get(f"/v1/segmentations/{job['id']}").json()
                                              ["deliveries"] if d["destination"] == "pacs" and d["state"] == "delivered"],
                                     30, 0.02, "the healthy destination's SEG")[0]
                latencies.append(delivered["delivered_at"] - done)
            print(f"healthy destination latency: median {sorted(latencies)[10]:.2f} s, max {max(latencies):.2f} s")
            assert max(latencies) < 3.0, latencies  # a timeout at the dead one costs 5 s; 20 of them 100 s
            assert orthanc.new_instance_changes() == 20
            dead_rows = [d for j in client.get("/v1/segmentations").json()["jobs"] for d in j["deliveries"]
                         if d["destination"] == "dead"]
            assert len(dead_rows) == 20 and all(d["state"] == "pending" for d in dead_rows)
            tried = sum(d["attempts"] for d in dead_rows)
            assert tried <= 8, tried  # the breaker: one probe at a time while it does not answer
            # (its first attempt may still be waiting out the 5 s timeout when 20 small jobs finished sooner)
            wait_for(lambda: 'ctseg_destination_up{destination="dead"} 0.0' in client.get("/metrics").text, 15, 0.2,
                     "the dead destination reported down")
    finally:
        hole.close()
        orthanc.stop()


class WarningPeer:
    """A DIMSE storage SCP that keeps each SEG and answers with a given warning status."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses, self.received = list(statuses), []
        self.ae = AE(ae_title="WARNPACS")
        for sop in (SegmentationStorage, LabelMapSegmentationStorage):
            self.ae.add_supported_context(sop, ExplicitVRLittleEndian)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        self.received.append(event.dataset.SOPInstanceUID)
        return self.statuses.pop(0) if self.statuses else 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_warning_statuses_that_mean_stored_are_deliveries_with_the_warning_kept(intensity_bundle, tmp_path):
    peer = WarningPeer([0x0107, 0x0116])
    node = {"name": "gateway", "kind": "dimse", "host": "127.0.0.1", "port": peer.port, "ae_title": "WARNPACS"}
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage", destinations=[node],
                        default_destinations=["gateway"])
    try:
        with TestClient(create_app(settings)) as client:
            warnings = []
            for _ in range(2):
                job = upload(client, small_series())
                d = wait_for(lambda: (d := client.get(f"/v1/segmentations/{job['id']}").json()["deliveries"][0])
                             ["state"] != "pending" and d, 30, 0.05)
                assert d["state"] == "delivered" and d["attempts"] == 1, d
                warnings.append(d["warning"])
            assert "Attribute List Error (0x0107)" in warnings[0]
            assert "Attribute Value Out of Range (0x0116)" in warnings[1]
            assert len(peer.received) == 2  # each sent once, not retried
    finally:
        peer.stop()


def test_a_cget_with_failed_sub_operations_is_a_502_and_no_job(intensity_bundle, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"ctseg": ("CTSEG", free_port())}).start()
    try:
        target = ct_series()
        for ds in target:
            orthanc.upload(to_bytes(ds))
        # an instance of another class in the same series (a secondary capture): ctseg does not accept its class,
        # so Orthanc's sub-operation for it fails
        sc = pydicom.dcmread(io.BytesIO(to_bytes(target[0])))
        sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        orthanc.upload(to_bytes(sc))
        settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage",
                            sources=[dimse_destination("pacs-dimse", orthanc)])
        with TestClient(create_app(settings)) as client:
            r = client.post("/v1/segmentations", json={"source": "pacs-dimse", "study_uid": target[0].StudyInstanceUID,
                                                       "series_uid": target[0].SeriesInstanceUID})
            assert r.status_code == 502, r.text
            detail = r.json()["detail"]
            assert "pacs-dimse" in detail and "1 failed" in detail and "a partial series is not run" in detail
            assert "(0xC000)" in detail  # Orthanc 1.10 ends such a C-GET with Unable to Process
            assert client.get("/v1/segmentations").json()["jobs"] == []
    finally:
        orthanc.stop()


class GetPeer:
    """A C-GET SCP (pynetdicom's Query/Retrieve service) holding one series; ``extra`` datasets it also sends are
    of a class ctseg does not take, so their sub-operations fail and the final status is 0xB000."""

    def __init__(self, datasets, extra=()) -> None:
        from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        self.datasets, self.extra = list(datasets), list(extra)
        self.ae = AE(ae_title="GETPACS")
        self.ae.add_supported_context(GET)
        for sop in (CTImageStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(sop, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_GET, self._get)])

    def _get(self, event: evt.Event):  # type: ignore[no-untyped-def]
        items = self.datasets + self.extra
        yield len(items)
        for ds in items:
            yield 0xFF00, ds

    def stop(self) -> None:
        self.server.shutdown()


def test_a_cget_ending_with_failed_sub_operations_warning_is_a_502_naming_the_count(intensity_bundle, tmp_path):
    target = ct_series()
    sc = pydicom.dcmread(io.BytesIO(to_bytes(target[0])))
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    peer = GetPeer(target, [sc])
    source = {"name": "getpacs", "kind": "dimse", "host": "127.0.0.1", "port": peer.port, "ae_title": "GETPACS"}
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage", sources=[source])
    try:
        with TestClient(create_app(settings)) as client:
            r = client.post("/v1/segmentations", json={"source": "getpacs", "study_uid": target[0].StudyInstanceUID,
                                                       "series_uid": target[0].SeriesInstanceUID})
            assert r.status_code == 502, r.text
            detail = r.json()["detail"]
            assert f"sent {len(target)} instance(s)" in detail and "but 1 failed" in detail
            assert "Sub-operations complete, one or more failures or warnings (0xB000)" in detail
            assert client.get("/v1/segmentations").json()["jobs"] == []
            peer.extra = []  # the same source without the odd instance: the series runs
            ok = client.post("/v1/segmentations", params={"wait": "true"},
                             json={"source": "getpacs", "study_uid": target[0].StudyInstanceUID,
                                   "series_uid": target[0].SeriesInstanceUID})
            assert ok.status_code == 200 and ok.json()["input"]["files"] == len(target), ok.text
    finally:
        peer.stop()
