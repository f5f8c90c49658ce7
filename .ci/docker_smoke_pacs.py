"""The compose PACS pair: send a generated CT to Orthanc, have Orthanc forward it to ctseg (one REST call), and
wait for the SEG to come back into the same study (found through QIDO-RS)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_factory import series_from_image, to_bytes  # noqa: E402
from phantoms import make_phantom  # noqa: E402


def main(orthanc: str, timeout_s: float = 180.0) -> int:
    image, _ = make_phantom((96, 80, 40), (3.0, 3.0, 3.0), "axial", seed=2)
    datasets = series_from_image(image)
    study_uid = datasets[0].StudyInstanceUID
    with httpx.Client(base_url=orthanc, timeout=120) as client:
        for _ in range(60):  # the published port accepts connections before Orthanc inside answers them
            try:
                if client.get("/system").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        for ds in datasets:
            client.post("/instances", content=to_bytes(ds)).raise_for_status()
        study = next(i["ID"] for i in client.post("/tools/lookup", content=study_uid).json() if i["Type"] == "Study")
        start = time.monotonic()
        r = client.post("/modalities/ctseg/store", json={"Resources": [study], "Synchronous": True})
        if r.status_code != 200:
            print(f"docker-smoke: Orthanc could not send the study to ctseg: {r.status_code} {r.text[:300]}")
            return 1
        sent = time.monotonic()
        while time.monotonic() - sent < timeout_s:
            try:  # a fresh connection each time: Orthanc drops idle keep-alive connections
                found = httpx.get(f"{orthanc}/dicom-web/studies/{study_uid}/series", params={"Modality": "SEG"},
                                  timeout=30)
            except httpx.TransportError:
                time.sleep(1)
                continue
            if found.status_code == 200 and found.content and found.json():
                print(f"docker-smoke: SEG in Orthanc's study {time.monotonic() - sent:.1f} s after the forward "
                      f"(forward took {sent - start:.1f} s; includes ctseg's quiet period)")
                return 0
            time.sleep(1)
    print(f"docker-smoke: no SEG in Orthanc's study within {timeout_s:.0f} s")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
