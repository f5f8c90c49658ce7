"""What the shared job store costs: one job's whole life in the store (create, stage, claim, 3 heartbeats, 3
progress reports, succeed with a delivery, the outbox's claim and done) on PostgreSQL, against the embedded SQLite
store measured in the same run (the named baseline), from 1 and from several threads at once (API replicas and
workers are several writers). A throw-away PostgreSQL cluster is started on a free port (tests/postgres.py).

    python bench/store_ops.py --jobs 300 --threads 1,4
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401 - paths
from postgres import start_cluster

from server.core.database import Database, StoreBusy
from server.core.vocabulary import DeliveryState, DestinationChoice, InputKind, Output, ResultFile
from server.jobs.model import JobResult, JobSpec, Origin, StagedInput
from server.jobs.sql_store import SqlJobStore

SPEC = JobSpec("m", (Output.DICOM_SEG,), "1.2.3", ("pacs",), DestinationChoice.NAMED, Origin("upload"))
RESULT = JobResult((ResultFile.SEG,), {"infer": 1.0}, ())


def one_job(store: SqlJobStore, destination: str) -> None:
    job = store.create(SPEC)
    store.mark_staged(job.id, StagedInput(InputKind.DICOM, ("a.dcm",), "1.2.3", "x", SPEC.origin), SPEC, [])
    claim = store.claim(job.id, "bench", 30)
    for i in range(3):
        try:  # one short try each, as the executor makes them (the next beat tries again)
            store.heartbeat(claim, 30)
            store.report_progress(claim, i, 3)
        except StoreBusy:
            pass
    store.succeed(claim, RESULT, (destination,))
    for d in store.claim_deliveries(destination, time.time(), 60, 8):
        store.delivery_done(d, DeliveryState.DELIVERED)


def run(store: SqlJobStore, jobs: int, threads: int) -> float:
    """Jobs per second with ``threads`` writers (each its own destination, as senders of different PACS)."""
    per = jobs // threads
    start = threading.Barrier(threads + 1)

    def worker(n: int) -> None:
        start.wait()
        for _ in range(per):
            one_job(store, f"pacs{n}")
    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return per * threads / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--threads", default="1,4")
    args = parser.parse_args()
    cluster = start_cluster()
    rows = []
    try:
        for threads in [int(t) for t in args.threads.split(",")]:
            sqlite = SqlJobStore(Database(f"sqlite:///{Path(tempfile.mkdtemp()) / 'jobs.sqlite3'}"))
            postgres = SqlJobStore(Database(cluster.new_database()))
            one_job(sqlite, "warm")
            one_job(postgres, "warm")
            a, b = run(sqlite, args.jobs, threads), run(postgres, args.jobs, threads)
            rows.append((threads, a, b))
            print(f"{threads} thread(s): SQLite {a:.0f} jobs/s, PostgreSQL {b:.0f} jobs/s ({b / a:.2f}x SQLite)")
            sqlite.close()
            postgres.close()
    finally:
        cluster.stop("immediate")
    print("SUMMARY " + "; ".join(f"{t} thread(s): PostgreSQL {b:.0f} jobs/s = {b / a:.2f}x SQLite ({a:.0f})"
                                 for t, a, b in rows))


if __name__ == "__main__":
    main()
