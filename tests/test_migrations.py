"""A storage folder written by the first releases (their schema, verbatim) is migrated at open: jobs, deliveries
and received series carry on, parameters become typed fields, and the database is adopted into the Alembic
history (a release from before Alembic then refuses it, rather than write to a schema it does not know)."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from server.core.database import Database, SchemaTooNew
from server.core.migrations import head
from server.core.migrations.legacy import ADOPTED
from server.core.vocabulary import DeliveryState, DestinationChoice, Output, ResultFile
from server.dicomnode.arrivals import ArrivalStore, digest
from server.jobs.files import JobFiles
from server.jobs.model import JobState
from server.jobs.sql_store import SqlJobStore

FIRST_RELEASE = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL, input_kind TEXT,
    params TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    progress_done INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0,
    timings TEXT NOT NULL DEFAULT '{}', error TEXT, error_kind TEXT, notes TEXT NOT NULL DEFAULT '[]',
    outputs TEXT NOT NULL DEFAULT '[]', origin TEXT, staged TEXT, destinations TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX jobs_state ON jobs(state);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created REAL NOT NULL, next_attempt REAL NOT NULL,
    delivered_at REAL, claimed_until REAL, UNIQUE (job_id, destination)
);
CREATE TABLE incoming (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, calling_ae_title TEXT NOT NULL, modality TEXT NOT NULL,
    description TEXT NOT NULL, instances INTEGER NOT NULL, frames INTEGER NOT NULL, first_received REAL NOT NULL,
    last_received REAL NOT NULL, aborted INTEGER NOT NULL DEFAULT 0
);
"""
UPLOAD = json.dumps({"kind": "upload", "calling_ae_title": None, "source": None})


def test_a_first_release_database_is_migrated_and_carries_on(tmp_path):
    now = time.time()
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(FIRST_RELEASE)
    rows = [
        ("named", "succeeded", {"outputs": ["nifti", "dicom-seg"], "series_uid": "1.2", "destinations_named": True},
         ["seg.dcm", "volumes.json"], ["pacs"]),
        ("interrupted", "running", {"outputs": ["nifti"], "series_uid": None, "destinations_named": False}, [], []),
    ]
    for job_id, state, params, outputs, destinations in rows:
        db.execute("INSERT INTO jobs (id, state, model, params, created, updated, outputs, origin, destinations) "
                   "VALUES (?,?,?,?,?,?,?,?,?)", (job_id, state, "m", json.dumps(params), now, now,
                                                 json.dumps(outputs), UPLOAD, json.dumps(destinations)))
    db.execute("INSERT INTO deliveries (job_id, destination, state, created, next_attempt, claimed_until) "
               "VALUES ('named', 'pacs', 'pending', ?, ?, ?)", (now, now, now + 600))
    db.execute("INSERT INTO incoming VALUES ('1.2.3', '1.2', 'MODALITY', 'CT', 'd', 30, 30, ?, ?, 1)", (now, now))
    db.commit()
    db.close()
    folder = tmp_path / "incoming" / digest("1.2.3")
    folder.mkdir(parents=True)
    for sop in ("1.2.3.1", "1.2.3.2"):
        (folder / f"{digest(sop)}.dcm").write_bytes(b"an instance the first release acknowledged")

    store = SqlJobStore(Database.embedded(tmp_path))
    named = store.get("named")
    assert named.state == JobState.SUCCEEDED and named.spec.outputs == (Output.NIFTI, Output.DICOM_SEG)
    assert named.spec.destination_choice == DestinationChoice.NAMED and named.spec.series_uid == "1.2"
    assert named.results == (ResultFile.SEG, ResultFile.VOLUMES) and named.attempt == 0 and named.seg_seed == "named"
    assert JobFiles(tmp_path).result_path(named, ResultFile.SEG) == tmp_path / "jobs" / "named" / "seg.dcm"
    (pending,) = store.deliveries("named")
    assert pending.state == DeliveryState.PENDING
    assert store.release_delivery_claims() == 1  # a claim of the stopped first-release process
    assert [d.id for d in store.claim_deliveries("pacs", time.time(), 60, 8)] == [pending.id]
    (requeued,) = store.requeue_running("restart", 3)
    assert requeued.job_id == "interrupted" and requeued.state == JobState.QUEUED
    arrivals = ArrivalStore(tmp_path)
    legacy = arrivals.get("1.2.3")
    assert legacy is not None and not legacy.complete  # its association aborted under the first release
    assert arrivals.link_into("1.2.3", tmp_path / "linked") == 2  # its files are the series' instances
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as check:
        versions = dict(check.execute("SELECT component, version FROM schema_migrations"))
        (revision,) = check.execute("SELECT version_num FROM alembic_version").fetchone()
    assert versions == {"jobs": ADOPTED, "arrivals": ADOPTED} and revision == head()
    store.close()
    SqlJobStore(Database.embedded(tmp_path)).close()  # opening again applies nothing


def test_a_pre_alembic_database_newer_than_this_release_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.executescript(FIRST_RELEASE)
        db.execute("CREATE TABLE schema_migrations (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_migrations VALUES ('jobs', 7)")
    with pytest.raises(SchemaTooNew, match="newer than this ctseg knows"):
        SqlJobStore(Database.embedded(tmp_path))
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:  # refused without a change
        assert db.execute("SELECT version FROM schema_migrations").fetchall() == [(7,)]
        assert "alembic_version" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}


def test_connections_stay_few_whatever_the_threads(tmp_path):
    """A heartbeat thread per run, the server's thread pool: connections are pooled, not one per thread."""
    import threading

    store = SqlJobStore(Database.embedded(tmp_path))
    for _ in range(50):
        t = threading.Thread(target=store.counts)
        t.start()
        t.join()
    store.counts()
    threading.Thread(target=store.counts).start()
    assert store.connections() <= 3
    store.close()


def test_a_new_database_tells_a_release_before_alembic_to_keep_off(tmp_path):
    """That release would re-run its ALTERs on it and crash; it reads these rows and refuses it instead."""
    SqlJobStore(Database.embedded(tmp_path)).close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        versions = dict(db.execute("SELECT component, version FROM schema_migrations"))
    assert versions == {"jobs": ADOPTED, "arrivals": ADOPTED}
