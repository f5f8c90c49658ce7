"""Eight concurrent submissions to a running server: all complete; total time vs 8x one; status latency.

    .venv/bin/python bench/load.py [--n 8]
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


def submit_and_wait(url: str, data: bytes) -> float:
    t = time.perf_counter()
    r = httpx.post(url + "/v1/segmentations", files=[("files", ("ct.nii.gz", data))], timeout=600)
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
    args = ap.parse_args()
    data = Path(args.input).read_bytes()
    with tempfile.TemporaryDirectory() as storage, Server(Path(args.bundle), Path(storage), **dict(kv.split("=", 1) for kv in args.env)) as server:
        server.wait_ready()
        single = submit_and_wait(server.url, data)
        # The prober is its own process, so the latency measured is the server's, not this process's GIL.
        ctx = mp.get_context("spawn")
        stop, results = ctx.Event(), ctx.Queue()
        prober = ctx.Process(target=probe, args=(server.url, stop, results))
        prober.start()
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.n) as pool:
            durations = list(pool.map(lambda _: submit_and_wait(server.url, data), range(args.n)))
        total = time.perf_counter() - t0
        stop.set()
        latencies: list[float] = results.get(timeout=60)
        prober.join()
        rss = server.peak_rss_mb()
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
    print(f"one job alone {single:.1f} s; {args.n} concurrent: all {len(durations)} completed in {total:.1f} s "
          f"({total / (args.n * single):.2f} of {args.n}x one); status p50 {p50:.1f} ms, p99 {p99:.1f} ms "
          f"over {len(latencies)} requests; server peak RSS {rss:.0f} MB")
    print(f"SUMMARY load n={args.n} completed={len(durations)} total_s={total:.1f} vs_n_times_one={total / (args.n * single):.2f} "
          f"status_p50_ms={p50:.1f} status_p99_ms={p99:.1f} server_peak_rss_mb={rss:.0f}")


if __name__ == "__main__":
    main()
