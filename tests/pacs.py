"""Real PACS peers for the tests: Debian's Orthanc (with its DICOMweb plugin) and dcmtk, on free 127.0.0.1 ports.

Each test starts and stops its own Orthanc, with a temporary configuration and storage. Where a tool is missing the
test skips saying which; under ``CI=true`` it fails instead, since CI installs them (.ci/install-system-tools.sh).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import requests

from common import free_port, require_tool, wait_for

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


# What a DICOMweb viewer (OHIF) needs from Orthanc's plugin: full metadata of every instance in one request, not
# the main tags only (OHIF reads geometry and the SEG's per-frame functional groups from it).
VIEWER_DICOMWEB = {"StudiesMetadata": "Full", "SeriesMetadata": "Full"}


class Orthanc:
    """One Orthanc process: REST + DICOMweb on ``http_port``, DICOM on ``dicom_port``, AE title ORTHANC.

    ``dicomweb``: more settings of the DICOMweb plugin (a viewer needs ``VIEWER_DICOMWEB``)."""

    AE_TITLE = "ORTHANC"

    def __init__(self, root: Path, modalities: dict[str, tuple[str, int]] | None = None,
                 dicomweb: dict | None = None) -> None:
        require_tool(ORTHANC, "Orthanc (Debian package orthanc)")
        if not DICOMWEB_PLUGIN.is_file():
            require_tool(None, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ctseg-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.AE_TITLE,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", **(dicomweb or {})},
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in (modalities or {}).items()},
            "DicomAlwaysAllowGet": False, "OverwriteInstances": True,  # a resend shows up as a second change
            "StableAge": 1, "ConcurrentJobs": 2, "HttpTimeout": 60, "DicomScuTimeout": 30,
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    def start(self) -> "Orthanc":
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 30.0, what="Orthanc answering on its HTTP port")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.process.returncode}: "
                                 f"{(self.root / 'orthanc.log').read_text()[-2000:]}")
        try:
            return requests.get(f"{self.url}/system", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    # ---- REST helpers
    def upload(self, data: bytes) -> dict:
        r = requests.post(f"{self.url}/instances", data=data, timeout=30)
        r.raise_for_status()
        return r.json()

    def study_id(self, study_uid: str) -> str:
        r = requests.post(f"{self.url}/tools/lookup", data=study_uid, timeout=10)
        r.raise_for_status()
        return next(item["ID"] for item in r.json() if item["Type"] == "Study")

    def seg_series(self, study_uid: str) -> list[dict]:
        """QIDO-RS: the SEG series of a study."""
        r = requests.get(f"{self.dicomweb}/studies/{study_uid}/series", params={"Modality": "SEG"}, timeout=10)
        if r.status_code == 204 or not r.content:
            return []
        r.raise_for_status()
        return r.json()

    def seg_instances(self, study_uid: str, series_uid: str) -> list[dict]:
        r = requests.get(f"{self.dicomweb}/studies/{study_uid}/series/{series_uid}/instances", timeout=10)
        r.raise_for_status()
        return r.json() if r.content else []

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """WADO-RS, one instance as a Part-10 file."""
        r = requests.get(f"{self.dicomweb}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
                         headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30)
        r.raise_for_status()
        boundary = r.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
        part = r.content.split(f"--{boundary}".encode())[1]
        return part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]

    def new_instance_changes(self) -> int:
        """How many times an instance was stored (a resend of the same SOP instance counts again)."""
        r = requests.get(f"{self.url}/changes", params={"since": 0, "limit": 10000}, timeout=10)
        r.raise_for_status()
        return sum(1 for c in r.json()["Changes"] if c["ChangeType"] == "NewInstance")

    def instance_count(self) -> int:
        return int(requests.get(f"{self.url}/statistics", timeout=10).json()["CountInstances"])


def dimse_destination(name: str, orthanc: Orthanc) -> dict:
    return {"name": name, "kind": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": Orthanc.AE_TITLE}


def dicomweb_node(name: str, orthanc: Orthanc) -> dict:
    return {"name": name, "kind": "dicomweb", "url": orthanc.dicomweb, "timeout_s": 10}


# A pynetdicom sender that stores the first half of a series in one association, then ``die`` (SIGKILL itself: the
# sender vanishes mid-association) or ``hold`` (keep the association open, say "HALF", and report how it ended
# when ctseg goes away).
HALF_A_SERIES_SENDER = """
import os, signal, sys, time
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from pydicom.uid import ExplicitVRLittleEndian
mode, port, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ae = AE(ae_title="MODALITY")
ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
assoc = ae.associate("127.0.0.1", port, ae_title="CTSEG")
assert assoc.is_established
for path in files[: len(files) // 2]:
    assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
if mode == "die":
    os.kill(os.getpid(), signal.SIGKILL)
print("HALF", flush=True)
while assoc.is_established:
    time.sleep(0.05)
print("CUT", "aborted" if assoc.is_aborted else "released", flush=True)
"""
