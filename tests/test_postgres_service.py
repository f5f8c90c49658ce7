"""The whole service on PostgreSQL (CTSEG_DATABASE_URL), with real processes: a job submitted, run by a worker
process and delivered to a real Orthanc, with the API process SIGKILLed while its worker runs; the job records
live in PostgreSQL, not in the storage folder's SQLite."""

from __future__ import annotations

import sqlalchemy as sa

from test_job_core import api_killed_mid_job


def test_on_postgresql_the_api_killed_mid_job_the_job_ends_once_and_its_seg_is_sent_once(
        intensity_bundle, tmp_path, pg_cluster):
    url = pg_cluster.new_database()

    def in_postgresql(job: str) -> None:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT state, attempt FROM jobs WHERE id = :id"), {"id": job}).one()
            delivered = conn.execute(sa.text("SELECT state FROM deliveries WHERE job_id = :id"), {"id": job}).all()
        engine.dispose()
        assert tuple(row) == ("succeeded", 2) and [tuple(d) for d in delivered] == [("delivered",)]
        assert not (tmp_path / "storage" / "jobs.sqlite3").exists()  # no job record in the storage folder
    api_killed_mid_job(intensity_bundle, tmp_path, check=in_postgresql, CTSEG_DATABASE_URL=url)
