"""How many SEGs a PACS outage loses: Orthanc is down for ``--minutes`` while jobs keep finishing.

ctseg (real ``ctseg serve``, demo bundle, default retry settings unless given) sends every SEG to Orthanc over
STOW-RS. Orthanc is stopped, ``--jobs`` DICOM series are posted spread over the outage (optionally ctseg is killed
with SIGKILL half-way and started again), Orthanc comes back, and the script waits until no delivery is pending.
Counted in Orthanc itself: SEG instances stored (lost = jobs - stored) and store events (duplicates = events -
stored). Baseline: the number of jobs that succeeded.

    .venv/bin/python bench/pacs_outage.py --minutes 10 --jobs 20 [--kill-midway]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
from _common import DEMO_BUNDLE, Server
from dicom_factory import series_from_image, to_bytes
from pacs import Orthanc, dicomweb_node
from phantoms import make_phantom


def post_series(server: Server, seed: int) -> str:
    image, _ = make_phantom((96, 80, 40), (3.0, 3.0, 3.0), "axial", seed=seed)
    files = [("files", (f"IM{i:04d}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(series_from_image(image))]
    r = httpx.post(server.url + "/v1/segmentations", files=files, timeout=300)
    r.raise_for_status()
    return r.json()["id"]


def deliveries(server: Server, limit: int) -> list[dict]:
    jobs = httpx.get(server.url + "/v1/segmentations", params={"limit": limit}, timeout=10).json()["jobs"]
    return [d for j in jobs for d in j["deliveries"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--kill-midway", action="store_true", help="SIGKILL ctseg half-way through the outage")
    ap.add_argument("--retry-max-s", type=float, default=300.0, help="CTSEG_DELIVERY_RETRY_MAX_S (default 300)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        orthanc = Orthanc(root / "orthanc")
        env = {"CTSEG_DESTINATIONS": json.dumps([dicomweb_node("pacs", orthanc)]), "CTSEG_DEFAULT_DESTINATIONS": "pacs",
               "CTSEG_DELIVERY_RETRY_MAX_S": str(args.retry_max_s), "CTSEG_LOG_LEVEL": "ERROR"}
        server = Server(DEMO_BUNDLE, root / "storage", **env)
        server.wait_ready(120)
        start = time.monotonic()
        outage = args.minutes * 60
        killed = False
        for k in range(args.jobs):
            while time.monotonic() - start < k * outage / args.jobs:
                time.sleep(0.5)
            post_series(server, seed=k)
            if args.kill_midway and not killed and k >= args.jobs // 2:
                time.sleep(5)
                os.kill(server.proc.pid, signal.SIGKILL)  # the API process; its workers exit with it
                server.proc.wait()
                server = Server(DEMO_BUNDLE, root / "storage", **env)
                server.wait_ready(120)
                killed = True
        while time.monotonic() - start < outage:
            time.sleep(1)
        pending = [d for d in deliveries(server, args.jobs + 10) if d["state"] == "pending"]
        print(f"outage of {args.minutes:g} min over: {len(pending)} deliveries pending, attempts "
              f"{sorted(d['attempts'] for d in pending)}")
        orthanc.start()
        back, back_wall = time.monotonic(), time.time()
        while any(d["state"] == "pending" for d in deliveries(server, args.jobs + 10)):
            if time.monotonic() - back > args.retry_max_s * 1.2 + 120:
                break
            time.sleep(2)
        drained = time.monotonic() - back
        final = deliveries(server, args.jobs + 10)
        stored = len(httpx.post(orthanc.url + "/tools/find", json={"Level": "Instance", "Query": {"Modality": "SEG"}},
                                timeout=30).json())
        events = orthanc.new_instance_changes()
        server.__exit__()
        orthanc.stop()
    delivered = sum(d["state"] == "delivered" for d in final)
    times = sorted(d["delivered_at"] for d in final if d["delivered_at"])
    first = times[0] - back_wall if times else float("nan")
    spread = times[-1] - times[0] if times else float("nan")
    print(f"Orthanc back: first SEG delivered after {first:.1f} s (the breaker's next check), the rest within "
          f"{spread:.1f} s of it")
    print(f"Orthanc back: all deliveries settled in {drained:.0f} s; delivered {delivered}/{args.jobs}, "
          f"SEGs in Orthanc {stored}, store events {events}{' (ctseg SIGKILLed mid-outage)' if killed else ''}")
    print(f"SUMMARY pacs_outage minutes={args.minutes:g} jobs={args.jobs} seg_stored={stored} lost={args.jobs - stored} "
          f"duplicates={events - stored} drain_s={drained:.0f} first_s={first:.1f} spread_s={spread:.1f} "
          f"killed_midway={int(killed)}")


if __name__ == "__main__":
    main()
