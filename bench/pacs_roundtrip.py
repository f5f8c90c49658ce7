"""Last instance received -> SEG stored in the PACS, for a 512x512x300 CT series, through a real Orthanc.

dcmtk's storescu sends the series (generated from the real example CT) to ctseg's DICOM listener; ctseg segments
it with the demo bundle once the series has been quiet for ``--stable`` seconds and stores the SEG back into Orthanc
with C-STORE; the clock stops when QIDO-RS finds the SEG in the study. Baseline, in the same run: the job's own
processing time (decode to SEG written, from the job record), so the ratio shows what the DICOM path adds.

    .venv/bin/python bench/pacs_roundtrip.py [--slices 300] [--stable 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _common import DEMO_BUNDLE, EXAMPLE_CT, Server, resampled_ct
from dicom_factory import series_from_image, write_files
from pacs import Orthanc, dimse_destination, free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(DEMO_BUNDLE))
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--stable", type=float, default=5.0, help="ctseg's quiet period (CTSEG_DICOM_STABLE_SECONDS)")
    args = ap.parse_args()
    storescu = shutil.which("storescu")
    if storescu is None:
        raise SystemExit("needs dcmtk's storescu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datasets = series_from_image(resampled_ct(EXAMPLE_CT, (512, 512, args.slices)), description="bench")
        files = write_files(datasets, root / "series")
        study_uid = datasets[0].StudyInstanceUID
        del datasets
        dicom_port = free_port()
        orthanc = Orthanc(root / "orthanc", modalities={"ctseg": ("CTSEG", dicom_port)}).start()
        env = {"CTSEG_DICOM_PORT": str(dicom_port), "CTSEG_DICOM_STABLE_SECONDS": str(args.stable),
               "CTSEG_DESTINATIONS": json.dumps([dimse_destination("pacs", orthanc)]),
               "CTSEG_DEFAULT_DESTINATIONS": "pacs"}
        try:
            with Server(Path(args.bundle), root / "storage", **env) as server:
                server.wait_ready(120)
                t0 = time.perf_counter()
                subprocess.run([storescu, "-aet", "MODALITY", "-aec", "CTSEG", "127.0.0.1", str(dicom_port),
                                *map(str, files)], check=True, capture_output=True, timeout=600)
                last = time.perf_counter()
                while not orthanc.seg_series(study_uid):
                    if time.perf_counter() - last > 600:
                        raise SystemExit("no SEG in Orthanc within 600 s")
                    time.sleep(0.1)
                stored = time.perf_counter()
                job = httpx.get(server.url + "/v1/segmentations", timeout=10).json()["jobs"][0]
        finally:
            orthanc.stop()
    processing = sum(job["timings"].values())
    after_quiet = stored - last - args.stable
    print(f"send {args.slices} slices with storescu: {last - t0:.1f} s")
    print("job timings: " + ", ".join(f"{k} {v:.2f}" for k, v in job["timings"].items()) + f" (sum {processing:.1f} s)")
    print(f"last instance -> SEG in Orthanc: {stored - last:.1f} s, minus the quiet period {args.stable:g} s: "
          f"{after_quiet:.1f} s ({after_quiet / processing:.2f}x the job's processing time)")
    print(f"SUMMARY pacs_roundtrip slices={args.slices} last_instance_to_seg_minus_quiet_s={after_quiet:.1f} "
          f"job_processing_s={processing:.1f} ratio_vs_processing={after_quiet / processing:.2f}")


if __name__ == "__main__":
    main()
