"""Several machines, as real processes on one: two API replicas (CTSEG_ROLE=api) and two inference workers
(CTSEG_ROLE=worker) sharing a real PostgreSQL (jobs, outbox, procrastinate's queue ``seg.<model>``) and one storage
folder (the shared volume), delivering to a real Orthanc. Jobs submitted to either replica run once on some worker
and are visible through both; a worker SIGKILLed mid-job loses nothing and sends nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests
import sqlalchemy as sa

from common import REPO, Serve, wait_for
from dicom_factory import series_from_image, to_bytes
from pacs import Orthanc, dicomweb_node
from phantoms import make_phantom
from test_job_core import long_series

LEASE_S = "3"


class Worker:
    """``ctseg serve`` with CTSEG_ROLE=worker: no port; ready once it says which queues it takes."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = {**env, "CTSEG_ROLE": "worker"}, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.proc = subprocess.Popen([sys.executable, "-m", "ctseg", "serve"], cwd=REPO, env=self.env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            return "takes jobs from seg.intensity-test" in self.log.read_text()
        wait_for(ready, 120, 0.2, "worker ready")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def cluster(tmp_path: Path, bundle: Path, url: str, orthanc: Orthanc, workers: int,
            **extra: str) -> tuple[list[Serve], list[Worker]]:
    storage = tmp_path / "shared"
    env = {**extra, "CTSEG_DATABASE_URL": url, "CTSEG_JOB_LEASE_S": LEASE_S, "CTSEG_SW_OVERLAP": "0.75",
           "CTSEG_DESTINATIONS": json.dumps([dicomweb_node("pacs", orthanc)]), "CTSEG_DEFAULT_DESTINATIONS": "pacs"}
    apis = [Serve(bundle, storage, tmp_path / f"api{n}.log", CTSEG_ROLE="api", **env) for n in range(2)]
    base = {**apis[0].env}
    base.pop("CTSEG_PORT")
    pool = [Worker(base, tmp_path / f"worker{n}.log") for n in range(workers)]
    for api in apis:
        api.start()
    for w in pool:
        w.start()
    return apis, pool


@contextmanager
def scaled(tmp_path: Path, bundle: Path, pg: object, workers: int, **extra: str):  # type: ignore[no-untyped-def]
    """A database of its own, an Orthanc, two API replicas and ``workers`` workers; everything killed at the end
    (spare workers a test appends to the pool too), PostgreSQL running again if the test stopped it."""
    url = pg.new_database()  # type: ignore[attr-defined]
    orthanc = Orthanc(tmp_path / "orthanc").start()
    apis: list[Serve] = []
    pool: list[Worker] = []
    try:
        started = cluster(tmp_path, bundle, url, orthanc, workers, **extra)
        apis += started[0]
        pool += started[1]
        yield url, orthanc, apis, pool
    finally:
        for p in [*pool, *apis]:
            p.kill()
        orthanc.stop()
        if not pg._answers():  # type: ignore[attr-defined]
            pg.start()  # type: ignore[attr-defined]


def upload(api: Serve, datasets: list) -> str:
    files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
    r = requests.post(api.url + "/v1/segmentations", files=files, timeout=120)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def owners(url: str) -> dict[str, tuple[str, int]]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, owner, attempt FROM jobs")).all()
    engine.dispose()
    return {r.id: (r.owner, r.attempt) for r in rows}


def test_jobs_sent_to_either_api_replica_run_once_on_the_workers_and_each_seg_is_sent_once(
        intensity_bundle, tmp_path, pg_cluster):
    with scaled(tmp_path, intensity_bundle, pg_cluster, workers=2) as (url, orthanc, apis, _pool):
        studies, jobs = [], []
        for n in range(4):
            image, _ = make_phantom((64, 64, 40), (1.5, 1.5, 2.0), "axial", seed=n, noise=3.0)
            datasets = series_from_image(image)
            studies.append(datasets[0].StudyInstanceUID)
            jobs.append(upload(apis[n % 2], datasets))
        for n, job in enumerate(jobs):
            record = apis[(n + 1) % 2].wait_finished(job, 240)  # read through the other replica
            assert record["state"] == "succeeded" and record["attempt"] == 1, record
        wait_for(lambda: all(apis[0].job(j)["deliveries"][0]["state"] == "delivered" for j in jobs), 90, 0.5,
                 "every SEG delivered")
        time.sleep(3)
        assert [len(orthanc.seg_series(s)) for s in studies] == [1, 1, 1, 1]
        assert orthanc.new_instance_changes() == 4  # four SEGs, each stored once
        ran_on = {owner for owner, _ in owners(url).values()}
        assert len(ran_on) >= 1 and all(owner for owner in ran_on)


def test_a_worker_killed_mid_job_its_job_runs_again_on_another_and_its_seg_is_sent_once(
        intensity_bundle, tmp_path, pg_cluster):
    with scaled(tmp_path, intensity_bundle, pg_cluster, workers=1) as (url, orthanc, apis, pool):
        datasets = long_series()
        job = upload(apis[0], datasets)
        wait_for(lambda: apis[1].job(job)["state"] == "running", 120, 0.05, "the job running")
        first_owner = owners(url)[job][0]
        pool[0].kill()  # SIGKILL: its procrastinate entry stays 'doing'; the job's lease runs out
        spare = Worker(pool[0].env, tmp_path / "spare.log").start()
        pool.append(spare)
        record = apis[1].wait_finished(job, 240)
        assert record["state"] == "succeeded" and record["attempt"] == 2, record
        assert any("ended without a result" in n for n in record["notes"]), record["notes"]
        assert owners(url)[job][0] != first_owner
        wait_for(lambda: apis[0].job(job)["deliveries"][0]["state"] == "delivered", 90, 0.5, "the SEG delivered")
        time.sleep(3)
        assert len(orthanc.seg_series(datasets[0].StudyInstanceUID)) == 1
        assert orthanc.new_instance_changes() == 1


def test_an_api_replica_killed_mid_upload_its_job_is_failed_by_another_and_frees_its_queue_slot(
        intensity_bundle, tmp_path, pg_cluster):
    import http.client
    import threading

    with scaled(tmp_path, intensity_bundle, pg_cluster, workers=0) as (_url, _orthanc, apis, _pool):
        datasets = series_from_image(make_phantom((64, 64, 40), (1.5, 1.5, 2.0), "axial", seed=1)[0])
        boundary = "ctsegboundary"
        parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f{i}\"\r\n"
                  "Content-Type: application/dicom\r\n\r\n").encode() + to_bytes(ds) + b"\r\n"
                 for i, ds in enumerate(datasets)]
        stop = threading.Event()

        def body():
            yield parts[0]
            yield parts[1]
            stop.wait(60)  # the rest never comes: the replica dies first

        def send() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", apis[0].port, timeout=60)
            try:
                conn.request("POST", "/v1/segmentations", body=body(), encode_chunked=True,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
                conn.getresponse()
            except (OSError, http.client.HTTPException):
                pass  # the replica is gone
        threading.Thread(target=send, daemon=True).start()
        staging = wait_for(lambda: [j for j in apis[1].jobs() if j["state"] == "staging"], 30, 0.1,
                           "the upload's job staging")
        job = staging[0]["id"]
        time.sleep(1)
        apis[0].kill()
        stop.set()
        record = apis[1].wait_finished(job, 90)
        assert record["state"] == "failed" and "replica receiving" in record["error"], record
        assert not (tmp_path / "shared" / "jobs" / job / "input").exists()


def test_postgresql_restarted_mid_run_the_api_says_503_and_workers_carry_on_by_themselves(
        intensity_bundle, tmp_path, pg_cluster):
    with scaled(tmp_path, intensity_bundle, pg_cluster, workers=1) as (_url, orthanc, apis, pool):
        image, _ = make_phantom((64, 64, 40), (1.5, 1.5, 2.0), "axial", seed=3, noise=3.0)
        first = upload(apis[0], series_from_image(image))
        assert apis[1].wait_finished(first, 120)["state"] == "succeeded"
        pg_cluster.stop("immediate")
        t = time.monotonic()
        r = requests.get(f"{apis[1].url}/v1/segmentations/{first}", timeout=60)
        assert r.status_code == 503 and "retry" in r.json()["detail"], (r.status_code, r.text)
        assert time.monotonic() - t < 30
        pg_cluster.start()
        restarted = time.monotonic()
        image, _ = make_phantom((64, 64, 40), (1.5, 1.5, 2.0), "axial", seed=4, noise=3.0)
        datasets = series_from_image(image)
        second = upload(apis[0], datasets)
        record = apis[1].wait_finished(second, 90)
        assert record["state"] == "succeeded", record
        assert time.monotonic() - restarted < 60  # the worker reconnected by itself
        assert pool[0].proc.poll() is None
        wait_for(lambda: apis[0].job(second)["deliveries"][0]["state"] == "delivered", 60, 0.5, "the SEG delivered")
        assert orthanc.new_instance_changes() == 2


def running_jobs(url: str) -> list[tuple[str, str]]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, owner FROM jobs WHERE state = 'running'")).all()
    engine.dispose()
    return [(r.id, r.owner) for r in rows]


def test_a_hundred_jobs_on_three_workers_with_two_killed_each_run_to_one_seg(intensity_bundle, tmp_path, pg_cluster):
    """The chaos run: 100 jobs through two API replicas onto three workers, two of which are SIGKILLed mid-job (and
    replaced, as a supervisor would) while jobs keep coming; every job succeeds once, Orthanc gets 100 distinct
    SEGs, none stored twice."""
    import random
    import threading

    rng = random.Random(7)
    killed: list[str] = []  # the jobs that were running in a killed worker
    stop = threading.Event()
    with scaled(tmp_path, intensity_bundle, pg_cluster, workers=3) as (url, orthanc, apis, pool):
        try:
            def chaos() -> None:
                while len(killed) < 2 and not stop.is_set():
                    time.sleep(rng.uniform(2, 5))
                    for job_id, owner in running_jobs(url):
                        victim = next((w for w in pool if w.proc.poll() is None and owner.endswith(f":{w.proc.pid}")),
                                      None)
                        if victim is not None:
                            victim.kill()  # mid-job: its lease runs out, another worker runs it again
                            killed.append(job_id)
                            pool.append(Worker(victim.env, tmp_path / f"spare{len(killed)}.log").start())
                            break
            killer = threading.Thread(target=chaos, daemon=True)
            killer.start()
            jobs = []
            for n in range(100):
                image, _ = make_phantom((48, 48, 32), (2.0, 2.0, 3.0), "axial", seed=100 + n, noise=3.0)
                jobs.append(upload(apis[n % 2], series_from_image(image)))
            records = [apis[1].wait_finished(j, 300) for j in jobs]
            stop.set()
            killer.join(timeout=60)
            assert [r["state"] for r in records].count("succeeded") == 100, [r for r in records if r["state"] != "succeeded"]
            reruns = {r["id"] for r in records if r["attempt"] > 1}
            wait_for(lambda: all(apis[0].job(j)["deliveries"][0]["state"] == "delivered" for j in jobs), 180, 1.0,
                     "every SEG delivered")
            time.sleep(3)
            print(f"chaos: 100 jobs, {len(killed)} worker kills, {len(reruns)} job(s) run again, "
                  f"{orthanc.instance_count()} SEGs in Orthanc, {orthanc.new_instance_changes()} stores")
            assert len(killed) == 2 and set(killed) <= reruns  # each killed run was run again, to success
            assert orthanc.instance_count() == 100  # 100 distinct SEGs, one per job
            assert orthanc.new_instance_changes() == 100  # none stored twice
        finally:
            stop.set()


def test_a_job_whose_worker_dies_on_every_run_fails_after_the_attempt_limit_and_says_why(
        intensity_bundle, tmp_path, pg_cluster):
    """A poison job: every worker that takes it dies (SIGKILLed the moment it runs it, as a crash would); after
    CTSEG_JOB_MAX_ATTEMPTS runs it is failed with the reason, no further worker is lost to it, and the next job
    runs."""
    with scaled(tmp_path, intensity_bundle, pg_cluster, workers=1, CTSEG_JOB_MAX_ATTEMPTS="2") as (url, orthanc, apis, pool):
        poison = upload(apis[0], long_series())
        deaths = 0
        while True:
            record = apis[1].job(poison)
            if record["state"] in ("failed", "succeeded"):
                break
            running = dict(running_jobs(url))
            victim = next((w for w in pool if w.proc.poll() is None
                           and running.get(poison, "").endswith(f":{w.proc.pid}")), None)
            if victim is not None:
                victim.kill()
                deaths += 1
                pool.append(Worker(victim.env, tmp_path / f"next{deaths}.log").start())
            time.sleep(0.05)
        assert record["state"] == "failed" and record["error_kind"] == "interrupted", record
        assert "ran 2 time(s) without a result" in record["error"] and deaths == 2
        image, _ = make_phantom((48, 48, 32), (2.0, 2.0, 3.0), "axial", seed=9, noise=3.0)
        after = upload(apis[0], series_from_image(image))
        assert apis[1].wait_finished(after, 120)["state"] == "succeeded"  # the workers go on
        assert orthanc.new_instance_changes() <= 1  # nothing of the poison job was sent


def test_deliveries_a_killed_api_replica_had_claimed_are_sent_by_the_other_after_their_lease(
        intensity_bundle, tmp_path, pg_cluster):
    """Replica A holds the claim of a delivery and dies (SIGKILL) before sending it; replica B sends it once the
    claim's lease (10 network timeouts, at least 30 s) has run out: one SEG in Orthanc."""
    import os
    import signal

    from server.core.database import Database
    from server.jobs.sql_store import SqlJobStore

    with scaled(tmp_path, intensity_bundle, pg_cluster, workers=1) as (url, orthanc, apis, _pool):
        image, _ = make_phantom((48, 48, 32), (2.0, 2.0, 3.0), "axial", seed=11, noise=3.0)
        files = [("files", (f"f{i}", to_bytes(ds), "application/dicom"))
                 for i, ds in enumerate(series_from_image(image))]
        r = requests.post(apis[0].url + "/v1/segmentations", files=files, params={"review": "true"}, timeout=120)
        job = r.json()["id"]
        assert apis[1].wait_finished(job, 120)["state"] == "succeeded"  # its delivery held: nobody sends it
        for api in apis:  # both replicas frozen: no sender of theirs can take the delivery meanwhile
            os.kill(api.proc.pid, signal.SIGSTOP)
        store = SqlJobStore(Database(url), migrate=False)
        assert store.release_held(job) == 1
        (claimed,) = store.claim_deliveries("pacs", time.time(), 30.0, 8)  # replica A's claim (lease: 30 s) ...
        store.close()
        apis[0].kill()  # ... and A dies holding it
        claimed_at = time.time()
        os.kill(apis[1].proc.pid, signal.SIGCONT)
        time.sleep(5)
        assert orthanc.instance_count() == 0  # B leaves a live claim alone
        wait_for(lambda: apis[1].job(job)["deliveries"][0]["state"] == "delivered", 90, 0.5, "B sent it")
        assert time.time() - claimed_at >= 29  # only once the claim had run out
        time.sleep(2)
        assert orthanc.new_instance_changes() == 1
