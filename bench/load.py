"""Eight concurrent submissions to a running server: all complete; total time vs 8x one; status latency; peak RSS.

With ``--dicom300`` each submission is a 512x512x300 DICOM series (300 files, about 150 MB, made from the example
CT) and the server's queue limit is set to ``--n``: one more submission while the burst is queued must get a 503
with Retry-After.

    .venv/bin/python bench/load.py [--n 8] [--dicom300]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import tempfile
import multiprocessing as mp
import time
from pathlib import Path

import httpx
import numpy as np
from _common import DEMO_BUNDLE, EXAMPLE_CT, Server


Files = list[tuple[str, bytes]]


def submit_and_wait(url: str, files: Files) -> float:
    t = time.perf_counter()
    r = httpx.post(url + "/v1/segmentations", files=[("files", f) for f in files], timeout=600)
    r.raise_for_status()
    location = url + r.headers["Location"]
    while httpx.get(location, timeout=10).json()["state"] not in ("succeeded", "failed"):
        time.sleep(0.2)
    if httpx.get(location, timeout=10).json()["state"] != "succeeded":
        raise RuntimeError("a job failed")
    return time.perf_counter() - t


def probe(url: str, stop, results) -> None:  # type: ignore[no-untyped-def]
    """Status requests every 20 ms until told to stop; sends back the latencies."""
    latencies = []
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.get(url + "/v1/segmentations/does-not-exist")
            latencies.append(time.perf_counter() - t)
            time.sleep(0.02)
    results.put(latencies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(DEMO_BUNDLE))
    ap.add_argument("--input", default=str(EXAMPLE_CT))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--env", nargs="*", default=[], help="server settings, e.g. CTSEG_WORKER_MODE=thread")
    ap.add_argument("--dicom300", action="store_true", help="512x512x300 DICOM series instead of the NIfTI")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    if args.dicom300:
        from _common import dicom_series_files, resampled_ct

        data = dicom_series_files(resampled_ct(Path(args.input), (512, 512, 300)))
        env.setdefault("CTSEG_MAX_QUEUE", str(args.n))
    else:
        data = [("ct.nii.gz", Path(args.input).read_bytes())]
    with tempfile.TemporaryDirectory() as storage, Server(Path(args.bundle), Path(storage), **env) as server:
        server.wait_ready()
        single = submit_and_wait(server.url, data)
        # The prober is its own process, so the latency measured is the server's, not this process's GIL.
        ctx = mp.get_context("spawn")
        stop, results = ctx.Event(), ctx.Queue()
        prober = ctx.Process(target=probe, args=(server.url, stop, results))
        prober.start()
        t0 = time.perf_counter()
        over_queue = "not tried"
        with cf.ThreadPoolExecutor(args.n) as pool:
            futures = [pool.submit(submit_and_wait, server.url, data) for _ in range(args.n)]
            if args.dicom300:  # once the burst is queued, one more is past the queue limit
                while httpx.get(server.url + "/v1/segmentations", params={"limit": 50}, timeout=10).json()["jobs"] \
                        and sum(j["state"] in ("staging", "queued", "running") for j in httpx.get(
                            server.url + "/v1/segmentations", params={"limit": 50}, timeout=10).json()["jobs"]) < args.n:
                    time.sleep(0.2)
                extra = httpx.post(server.url + "/v1/segmentations", files=[("files", f) for f in data[:3]], timeout=600)
                over_queue = f"{extra.status_code} Retry-After={extra.headers.get('retry-after')}"
            durations = [f.result() for f in futures]
        total = time.perf_counter() - t0
        stop.set()
        latencies: list[float] = results.get(timeout=60)
        prober.join()
        rss, api_rss = server.peak_rss_mb(), server.peak_rss_mb(api_only=True)
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
    print(f"one job alone {single:.1f} s; {args.n} concurrent: all {len(durations)} completed in {total:.1f} s "
          f"({total / (args.n * single):.2f} of {args.n}x one); status p50 {p50:.1f} ms, p99 {p99:.1f} ms "
          f"over {len(latencies)} requests; peak RSS {rss:.0f} MB (API process {api_rss:.0f} MB); one past the queue limit: {over_queue}")
    print(f"SUMMARY load n={args.n} completed={len(durations)} total_s={total:.1f} vs_n_times_one={total / (args.n * single):.2f} "
          f"status_p50_ms={p50:.1f} status_p99_ms={p99:.1f} server_peak_rss_mb={rss:.0f} api_peak_rss_mb={api_rss:.0f} "
          f"over_queue={over_queue.split()[0]}")


if __name__ == "__main__":
    main()
