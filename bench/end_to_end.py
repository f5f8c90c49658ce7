"""The demo bundle through the HTTP API: seconds per stage and the server's peak RSS.

Inputs: the real example CT (NIfTI), and DICOM series generated from it on 512x512x300 and 512x512x1000 grids.
The server is started here (``ctseg serve`` on a free 127.0.0.1 port) and stopped at the end.

    .venv/bin/python bench/end_to_end.py [--cases nifti,dicom300,dicom1000,outputs300]

``outputs300``: the same 512x512x300 series twice, with ``outputs=both`` (the baseline, same run) and with every
output (nifti,dicom-seg,rtstruct,sr,sc): what the RTSTRUCT, the SR and the key image add, stage by stage.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import SimpleITK as sitk
from _common import DEMO_BUNDLE, EXAMPLE_CT, Server, dicom_series_files, resampled_ct


def run_case(server: Server, name: str, files: list[tuple[str, bytes]], outputs: str) -> dict:
    multipart = [("files", (n, data, "application/octet-stream")) for n, data in files]
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v1/segmentations", files=multipart, params={"outputs": outputs}, timeout=600)
    upload = time.perf_counter() - t0
    r.raise_for_status()
    location = server.url + r.headers["Location"]
    while True:
        job = httpx.get(location, timeout=10).json()
        if job["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    total = time.perf_counter() - t0
    if job["state"] != "succeeded":
        raise RuntimeError(f"{name}: {job['error']}")
    stages = {"upload": round(upload, 2), **{k: round(v, 2) for k, v in job["timings"].items()}}
    print(f"{name}: total {total:.1f} s | " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f" | server peak RSS {server.peak_rss_mb():.0f} MB")
    return {"total": total, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(DEMO_BUNDLE))
    ap.add_argument("--input", default=str(EXAMPLE_CT))
    ap.add_argument("--cases", default="nifti,dicom300,dicom1000")
    args = ap.parse_args()
    cases = args.cases.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as storage, Server(Path(args.bundle), Path(storage)) as server:
        ready = server.wait_ready()
        print(f"cold start to /readyz: {ready:.2f} s")
        if "nifti" in cases:
            results["nifti"] = run_case(server, f"NIfTI {Path(args.input).name} {sitk.ReadImage(args.input).GetSize()}",
                                        [(Path(args.input).name, Path(args.input).read_bytes())], "nifti")
        for case, slices in (("dicom300", 300), ("dicom1000", 1000)):
            if case in cases:
                files = dicom_series_files(resampled_ct(Path(args.input), (512, 512, slices)))
                results[case] = run_case(server, f"DICOM 512x512x{slices}", files, "both")
                del files
        if "outputs300" in cases:
            files = dicom_series_files(resampled_ct(Path(args.input), (512, 512, 300)))
            base = run_case(server, "DICOM 512x512x300, outputs=both", files, "both")
            every = run_case(server, "DICOM 512x512x300, every output", files, "nifti,dicom-seg,rtstruct,sr,sc")
            added = {k: v for k, v in every["stages"].items() if k not in base["stages"]}
            print(f"every output adds {every['total'] - base['total']:.2f} s to the job ({every['total'] / base['total']:.2f}x "
                  "outputs=both): " + ", ".join(f"{k} {v:.2f} s" for k, v in added.items()))
            results["outputs300_both"], results["outputs300_every"] = base, every
            del files
        rss = server.peak_rss_mb()
    summary = " ".join(f"{k}_s={v['total']:.1f}" for k, v in results.items())
    print(f"SUMMARY end_to_end cold_start_s={ready:.2f} {summary} server_peak_rss_mb={rss:.0f}")


if __name__ == "__main__":
    main()
