"""Post a generated CT series to a running ctseg container; check the label map and the DICOM-SEG."""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import httpx
import pydicom
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_factory import series_from_image, to_bytes  # noqa: E402
from phantoms import make_phantom  # noqa: E402


def main(base: str) -> int:
    image, _ = make_phantom((96, 80, 40), (3.0, 3.0, 3.0), "axial", seed=1)
    datasets = series_from_image(image)
    files = [("files", (f"IM{i:04d}.dcm", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
    with httpx.Client(base_url=base, timeout=300) as client:
        r = client.post("/v1/segmentations", files=files, params={"outputs": "both", "wait": "true"})
        if r.status_code != 200:
            print(f"docker-smoke: POST answered {r.status_code}: {r.text[:500]}")
            return 1
        job = r.json()
        label_bytes = client.get(f"/v1/segmentations/{job['id']}/labelmap.nii.gz").content
        seg_bytes = client.get(f"/v1/segmentations/{job['id']}/seg.dcm").content
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "l.nii.gz"
        p.write_bytes(label_bytes)
        labels = sitk.ReadImage(str(p))
    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    ok = labels.GetSize() == image.GetSize() and seg.Modality == "SEG" and seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    print(f"docker-smoke: job {job['id']} {job['state']}, timings {job['timings']}, label map {labels.GetSize()} "
          f"(input {image.GetSize()}), SEG with {len(seg.SegmentSequence)} segments: {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
