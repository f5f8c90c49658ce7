"""The whole service on PostgreSQL (CTSEG_DATABASE_URL), with real processes: a job submitted, run by a worker
process and delivered to a real Orthanc, with the API process SIGKILLed while its worker runs; the job records
live in PostgreSQL, not in the storage folder's SQLite."""

from __future__ import annotations

import json
import time

import requests
import sqlalchemy as sa

from common import Serve, alive, wait_for
from dicom_factory import to_bytes
from pacs import Orthanc, dicomweb_node
from test_job_core import long_series


def test_on_postgresql_the_api_killed_mid_job_the_job_ends_once_and_its_seg_is_sent_once(
        intensity_bundle, tmp_path, pg_cluster):
    url = pg_cluster.new_database()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    storage = tmp_path / "storage"
    server = Serve(intensity_bundle, storage, tmp_path / "ctseg.log", CTSEG_SW_OVERLAP="0.75",
                   CTSEG_DATABASE_URL=url, CTSEG_DESTINATIONS=json.dumps([dicomweb_node("pacs", orthanc)]),
                   CTSEG_DEFAULT_DESTINATIONS="pacs")
    try:
        server.start()
        datasets = long_series()
        files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(datasets)]
        job = requests.post(server.url + "/v1/segmentations", files=files, timeout=120).json()["id"]
        wait_for(lambda: server.job(job)["state"] == "running", 60, 0.02, "the job running")
        workers = server.worker_pids()
        assert workers
        server.kill_api_only()  # SIGKILL of the API process; its worker is mid-job
        wait_for(lambda: not any(alive(pid) for pid in workers), 5, 0.05, "the orphaned worker gone")
        time.sleep(2)
        assert orthanc.instance_count() == 0  # the orphan delivered nothing
        server.start()
        record = server.wait_finished(job)
        assert record["state"] == "succeeded" and record["attempt"] == 2, record
        wait_for(lambda: server.job(job)["deliveries"][0]["state"] == "delivered", 60, 0.2, "the SEG delivered")
        time.sleep(3)
        assert len(orthanc.seg_series(datasets[0].StudyInstanceUID)) == 1
        assert orthanc.new_instance_changes() == 1  # one SEG, stored once
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT state, attempt FROM jobs WHERE id = :id"), {"id": job}).one()
            delivered = conn.execute(sa.text("SELECT state FROM deliveries WHERE job_id = :id"), {"id": job}).all()
        engine.dispose()
        assert tuple(row) == ("succeeded", 2) and [tuple(d) for d in delivered] == [("delivered",)]
        assert not (storage / "jobs.sqlite3").exists()  # no job record in the storage folder
    finally:
        server.kill()
        orthanc.stop()
