"""The JobStore contract, on both stores: SQLite in a storage folder (embedded) and a real PostgreSQL (several
machines). Every test runs on each; what only several writers can break (two claimers, two sweepers, two senders)
is raced with real threads on real connections, and PostgreSQL is restarted and killed under a running store."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from postgres import kill_cluster

from server.core.database import Database, SchemaTooNew, StoreBusy
from server.core.schema import metadata
from server.core.vocabulary import (
    DeliveryState,
    DestinationChoice,
    ErrorKind,
    InputKind,
    Output,
    ResultFile,
)
from server.jobs.model import Claim, JobResult, JobSpec, JobState, Origin, StagedInput
from server.jobs.sql_store import SqlJobStore

SPEC = JobSpec("m", (Output.NIFTI, Output.DICOM_SEG), "1.2.3", ("pacs",), DestinationChoice.NAMED, Origin("upload"))
RESULT = JobResult((ResultFile.LABELMAP, ResultFile.SEG), {"infer": 1.5}, ("a note",))


@pytest.fixture()
def cluster(pg_cluster):
    return pg_cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    return request.getfixturevalue("cluster").new_database()


@pytest.fixture()
def store(url):
    s = SqlJobStore(Database(url, busy_timeout_s=2, patience_s=5))
    yield s
    s.close()


def queued(store: SqlJobStore, spec: JobSpec = SPEC) -> str:
    job = store.create(spec)
    staged = StagedInput(InputKind.DICOM, ("a.dcm",), spec.series_uid, "the input", spec.origin, ("staged",))
    assert store.mark_staged(job.id, staged, spec, ["routed"])
    return job.id


def running(store: SqlJobStore, lease_s: float = 30) -> Claim:
    claim = store.claim(queued(store), "worker-1", lease_s)
    assert claim is not None
    return claim


# ---------------------------------------------------------------------------------------------------- schema
def test_the_migrated_schema_is_the_one_the_store_queries(url):
    db = Database(url)
    assert db.upgrade() == db.revision()
    with db.engine.connect() as conn:
        # the queue's tables are procrastinate's; schema_migrations tells releases before Alembic to keep off
        context = MigrationContext.configure(conn, opts={"include_name": lambda name, kind, _: not (
            kind == "table" and (name.startswith("procrastinate_") or name == "schema_migrations"))})
        diff = compare_metadata(context, metadata)
    assert diff == []
    assert db.upgrade() == db.revision()  # at head: nothing applied again
    db.dispose()


def test_a_database_a_newer_ctseg_migrated_is_refused(url):
    db = Database(url)
    db.upgrade()
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'fffffff'"))
    with pytest.raises(SchemaTooNew, match="newer than this ctseg knows"):
        SqlJobStore(Database(url))
    db.dispose()


def test_upgraders_starting_at_once_apply_each_revision_once(url):
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            db = Database(url, patience_s=30)
            db.upgrade()
            db.dispose()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = Database(url)
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM alembic_version")).scalar() == 1
    db.dispose()


# ---------------------------------------------------------------------------------------------------- jobs
def test_a_job_round_trips_with_its_typed_fields(store):
    job_id = queued(store)
    job = store.get(job_id)
    assert job.state == JobState.QUEUED and job.spec == SPEC and job.staged.files == ("a.dcm",)
    assert job.notes == ["staged", "routed"] and job.input_kind == InputKind.DICOM and job.seg_seed == job_id
    assert store.get("nope") is None
    assert store.counts()["queued"] == 1 and store.active() == 1 and store.all_ids() == {job_id}
    assert [j.id for j in store.in_state(JobState.QUEUED)] == [job_id]


def test_listing_is_newest_first_and_pages_by_creation_time(store):
    ids = [store.create(SPEC).id for _ in range(5)]
    listed = store.list(limit=3)
    assert [j.id for j in listed] == ids[::-1][:3]
    older = store.list(limit=10, before=listed[-1].created)
    assert [j.id for j in older] == ids[:2][::-1]
    assert store.list(state=JobState.RUNNING) == []


def test_staging_moves_on_once(store):
    job = store.create(SPEC)
    staged = StagedInput(InputKind.DICOM, ("a.dcm",), "1.2.3", "the input", SPEC.origin)
    assert store.mark_staged(job.id, staged, SPEC, [])
    assert not store.mark_staged(job.id, staged, SPEC, [])  # already queued
    assert not store.refuse(job.id, ErrorKind.INPUT, "late")  # only a job still staging can be refused
    other = store.create(SPEC)
    assert store.refuse(other.id, ErrorKind.INPUT, "no CT in it")
    assert store.get(other.id).state == JobState.FAILED and store.get(other.id).error == "no CT in it"


def test_of_workers_claiming_one_job_at_once_exactly_one_gets_it(store):
    job_id = queued(store)
    claims: list[Claim | None] = []
    barrier = threading.Barrier(8)

    def claim(n: int) -> None:
        barrier.wait()
        claims.append(store.claim(job_id, f"worker-{n}", 30))
    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [c for c in claims if c is not None]
    assert len(won) == 1 and won[0].attempt == 1
    assert store.get(job_id).state == JobState.RUNNING


def test_a_stale_attempt_changes_nothing(store):
    first = running(store)
    assert store.report_progress(first, 3, 10) and store.heartbeat(first, 30)
    assert store.release(first, "worker stopped", 3).state == JobState.QUEUED
    second = store.claim(first.job_id, "worker-2", 30)
    assert second.attempt == 2
    for write in (lambda: store.heartbeat(first, 30), lambda: store.report_progress(first, 9, 10),
                  lambda: store.fail(first, ErrorKind.INTERNAL, "stale"),
                  lambda: store.succeed(first, RESULT, ("pacs",))):
        assert write() is False
    assert store.release(first, "stale", 3) is None
    job = store.get(first.job_id)
    assert job.state == JobState.RUNNING and job.attempt == 2 and job.progress_done == 0
    assert store.deliveries(first.job_id) == []
    assert store.succeed(second, RESULT, ("pacs",))
    assert store.get(first.job_id).results == RESULT.results


def test_success_and_its_deliveries_are_one_write(store):
    claim = running(store)
    assert store.succeed(claim, RESULT, ("pacs", "archive"))
    job = store.get(claim.job_id)
    assert job.state == JobState.SUCCEEDED and job.timings == {"infer": 1.5} and job.notes == ["a note"]
    assert job.lease_until is None
    assert [(d.destination, d.state) for d in store.deliveries(claim.job_id)] == [
        ("pacs", DeliveryState.PENDING), ("archive", DeliveryState.PENDING)]
    assert not store.succeed(claim, RESULT, ("pacs", "third"))  # once
    assert len(store.deliveries(claim.job_id)) == 2


def test_a_run_given_back_past_the_attempt_limit_fails_with_the_reason(store):
    claim = running(store)
    for attempt in (1, 2):
        assert store.release(claim, "killed", 3).state == JobState.QUEUED
        claim = store.claim(claim.job_id, "w", 30)
        assert claim.attempt == attempt + 1
    last = store.release(claim, "killed", 3)
    assert last.state == JobState.FAILED
    job = store.get(claim.job_id)
    assert job.error_kind == ErrorKind.INTERRUPTED and "ran 3 time(s)" in job.error
    assert sum("ended without a result" in n for n in job.notes) == 3


def test_expired_leases_are_requeued_once_whoever_sweeps(store):
    live = running(store, lease_s=60)
    stale = [running(store, lease_s=0.01) for _ in range(6)]
    time.sleep(0.05)
    swept: list = []
    barrier = threading.Barrier(4)

    def sweep() -> None:
        barrier.wait()
        for _ in range(20):
            try:
                swept.extend(store.requeue_expired(time.time(), 3))
                return
            except StoreBusy:  # one short try each (SQLite: the other sweepers hold the lock)
                time.sleep(0.01)
    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.job_id for r in swept) == sorted(c.job_id for c in stale)
    for c in stale:
        job = store.get(c.job_id)
        assert job.state == JobState.QUEUED and sum("ended without a result" in n for n in job.notes) == 1
    assert store.get(live.job_id).state == JobState.RUNNING
    assert [r.job_id for r in store.requeue_running("restart", 3)] == [live.job_id]


def test_superseding_stops_the_old_job_and_keeps_uids_where_its_seg_went_out(store):
    old = running(store)
    assert store.succeed(old, RESULT, ("pacs", "archive"))
    assert len(store.deliveries(old.job_id)) == 2
    (claimed,) = store.claim_deliveries("pacs", time.time(), 60, 8)
    assert store.delivery_done(claimed, DeliveryState.DELIVERED)
    new = store.create(SPEC, supersedes=old.job_id)
    result = store.supersede(old.job_id, new.id)
    assert result.previous_state == JobState.SUCCEEDED and result.delivered_to == ("pacs",)
    assert result.cancelled_deliveries == 1 and result.reuse_seg_uids
    assert store.get(new.id).seg_seed == old.job_id and store.get(old.job_id).superseded_by == new.id
    assert {d.destination: d.state for d in store.deliveries(old.job_id)} == {
        "pacs": DeliveryState.DELIVERED, "archive": DeliveryState.SUPERSEDED}
    unfinished = running(store)
    assert store.supersede(unfinished.job_id, "x").previous_state == JobState.RUNNING
    assert store.get(unfinished.job_id).state == JobState.SUPERSEDED
    assert not store.succeed(unfinished, RESULT, ("pacs",))
    assert store.supersede("nope", "x") is None


def test_cancel_removes_the_job_and_its_deliveries(store):
    claim = running(store)
    store.succeed(claim, RESULT, ("pacs",))
    assert store.cancel(claim.job_id) and store.get(claim.job_id) is None and store.deliveries(claim.job_id) == []
    assert not store.cancel(claim.job_id)


def test_retention_spares_jobs_whose_seg_still_waits(store):
    sent, waiting = running(store), running(store)
    store.succeed(sent, RESULT, ())
    store.succeed(waiting, RESULT, ("pacs",))
    assert store.expired(older_than_s=-10) == [sent.job_id]
    assert store.expired(older_than_s=3600) == []


# ---------------------------------------------------------------------------------------------------- outbox
def test_senders_claiming_at_once_share_the_due_deliveries_without_overlap(store):
    for _ in range(24):
        store.succeed(running(store), RESULT, ("pacs",))
    got: list[list] = []
    barrier = threading.Barrier(4)

    def send() -> None:
        barrier.wait()
        mine: list = []
        for _ in range(50):
            try:
                batch = store.claim_deliveries("pacs", time.time(), 60, 5)
            except StoreBusy:
                continue
            if not batch and len(mine) >= 1:
                break
            mine += batch
        got.append(mine)
    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [d.id for batch in got for d in batch]
    assert len(ids) == len(set(ids)) == 24


def test_a_delivery_is_recorded_only_under_its_claim(store):
    claim = running(store)
    store.succeed(claim, RESULT, ("pacs",))
    now = time.time()
    (d,) = store.claim_deliveries("pacs", now, 60, 8)
    assert store.claim_deliveries("pacs", now, 60, 8) == []  # claimed
    assert store.begin_send(d, 60)
    assert store.delivery_done(d, DeliveryState.PENDING, error="refused", next_attempt=now + 300)
    assert not store.delivery_done(d, DeliveryState.DELIVERED)  # its claim was spent
    assert store.next_due("pacs") == pytest.approx(now + 300) and store.pending_destinations() == {"pacs"}
    assert store.claim_deliveries("pacs", time.time(), 60, 8) == []  # backing off
    assert store.expedite("pacs", time.time()) == 1
    (again,) = store.claim_deliveries("pacs", time.time(), 60, 8)
    assert again.attempts == 1 and again.last_error == "refused"
    assert store.delivery_done(again, DeliveryState.DELIVERED, warning="stored with a warning")
    (done,) = store.deliveries(claim.job_id)
    assert done.state == DeliveryState.DELIVERED and done.delivered_at and done.warning == "stored with a warning"
    counts, oldest = store.outbox_stats()
    assert counts == {("pacs", "delivered"): 1} and oldest is None


def test_a_superseded_delivery_stays_superseded_unless_it_was_delivered(store):
    claim = running(store)
    store.succeed(claim, RESULT, ("pacs", "archive"))
    batch = store.claim_deliveries("pacs", time.time(), 60, 8) + store.claim_deliveries("archive", time.time(), 60, 8)
    store.supersede(claim.job_id, "newer")  # both were claimed: they may be reaching their destination
    assert not store.begin_send(batch[0], 60)  # still pending? no: superseded
    pacs, archive = batch
    assert store.delivery_done(pacs, DeliveryState.PENDING, error="timeout", next_attempt=time.time())
    assert store.delivery_done(archive, DeliveryState.DELIVERED)
    assert {d.destination: d.state for d in store.deliveries(claim.job_id)} == {
        "pacs": DeliveryState.SUPERSEDED, "archive": DeliveryState.DELIVERED}


def test_old_deliveries_are_given_up_and_claims_of_a_stopped_sender_released(store):
    claim = running(store)
    store.succeed(claim, RESULT, ("pacs", "archive"))
    (held,) = store.claim_deliveries("archive", time.time(), 600, 8)
    given_up = store.give_up_deliveries(time.time() + 1, "gave up after 7 days")
    assert [d.destination for d in given_up] == ["pacs"]  # the claimed one is being sent
    assert store.release_delivery_claims() == 1
    assert store.give_up_deliveries(time.time() + 1, "gave up")[0].destination == "archive"
    states = {d.destination: (d.state, d.last_error) for d in store.deliveries(claim.job_id)}
    assert states == {"pacs": (DeliveryState.FAILED, "gave up after 7 days"), "archive": (DeliveryState.FAILED, "gave up")}
    assert not store.delivery_done(held, DeliveryState.DELIVERED)


# ---------------------------------------------------------------------------------------------------- faults
def test_sqlite_locked_past_the_patience_is_store_busy_not_a_lost_write(tmp_path):
    store = SqlJobStore(Database(f"sqlite:///{tmp_path / 'jobs.sqlite3'}", busy_timeout_s=0.1, patience_s=0.5))
    claim = running(store)
    holder = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    t = time.monotonic()
    with pytest.raises(StoreBusy):
        store.heartbeat(claim, 30)  # one short try
    assert time.monotonic() - t < 0.5
    with pytest.raises(StoreBusy):
        store.succeed(claim, RESULT, ("pacs",))
    assert store.get(claim.job_id).state == JobState.RUNNING  # reads never wait for the writer (WAL)
    threading.Timer(0.3, lambda: holder.execute("ROLLBACK")).start()
    store.db.patience_s = 10
    assert store.succeed(claim, RESULT, ("pacs",))  # waited out, not dropped
    store.close()


def test_postgresql_restarted_under_a_running_store_costs_a_retry_not_a_result(cluster):
    store = SqlJobStore(Database(cluster.new_database(), busy_timeout_s=2, patience_s=60))
    claim = running(store)
    assert store.heartbeat(claim, 30)  # pooled connections now exist
    cluster.stop("fast")
    threading.Timer(1.5, cluster.start).start()
    assert store.succeed(claim, RESULT, ("pacs",))  # retried until the database answered again
    assert store.get(claim.job_id).state == JobState.SUCCEEDED
    kill_cluster(cluster)  # a crash this time: SIGKILL of the postmaster
    time.sleep(0.5)
    threading.Timer(1.5, cluster.start).start()
    assert [d.destination for d in store.deliveries(claim.job_id)] == ["pacs"]
    store.close()


def test_replicas_hold_at_most_max_senders_batches_for_one_destination(store):
    for _ in range(12):
        store.succeed(running(store), RESULT, ("pacs",))
    results: list[list] = []
    barrier = threading.Barrier(6)

    def replica() -> None:
        barrier.wait()
        for _ in range(50):
            try:
                results.append(store.claim_deliveries("pacs", time.time(), 60, 2, max_senders=2))
                return
            except StoreBusy:
                continue
    threads = [threading.Thread(target=replica) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [batch for batch in results if batch]
    assert len(results) == 6 and len(held) == 2  # six replicas raced; two senders got a batch
    assert store.claim_deliveries("pacs", time.time(), 60, 2, max_senders=2) == []
    for d in held[0]:
        assert store.delivery_done(d, DeliveryState.DELIVERED)
    assert len(store.claim_deliveries("pacs", time.time(), 60, 2, max_senders=2)) == 2  # a slot came free
    assert store.claim_deliveries("pacs", time.time(), 60, 2, max_senders=3) != []  # the cap is the caller's


class CommitReplyCutter:
    """A TCP proxy in front of PostgreSQL that, when armed, forwards the next COMMIT and cuts the connection
    before the server's reply reaches the client: the write landed, the client cannot know (a failover, a cut)."""

    def __init__(self, port: int) -> None:
        import socket

        self.upstream, self.armed = port, threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            cut = threading.Event()
            threading.Thread(target=self._pump, args=(client, server, True, cut), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, cut), daemon=True).start()

    def _pump(self, src, dst, upward: bool, cut: threading.Event) -> None:
        import socket

        try:
            while data := src.recv(65536):
                if not upward and cut.is_set():
                    continue  # the reply is dropped
                if upward and self.armed.is_set() and b"COMMIT\x00" in data:
                    self.armed.clear()
                    cut.set()
                    dst.sendall(data)
                    time.sleep(0.3)  # the server commits; its answer never arrives
                    self.cuts += 1
                    for s in (src, dst):
                        s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                dst.sendall(data)
        except OSError:
            pass


def test_a_commit_whose_reply_was_lost_is_reported_as_the_write_that_landed(pg_cluster):
    url = pg_cluster.new_database()
    cutter = CommitReplyCutter(pg_cluster.port)
    store = SqlJobStore(Database(url.replace(f":{pg_cluster.port}/", f":{cutter.port}/"), busy_timeout_s=2,
                                 patience_s=20))
    cutter.armed.set()
    job = store.create(SPEC)  # retried after its COMMIT landed: not a duplicate key, one row
    assert store.all_ids() == {job.id}
    staged = StagedInput(InputKind.DICOM, ("a.dcm",), SPEC.series_uid, "the input", SPEC.origin)
    cutter.armed.set()
    assert store.mark_staged(job.id, staged, SPEC, [])  # landed: True, not "removed meanwhile"
    cutter.armed.set()
    claim = store.claim(job.id, "worker-1", 30)
    assert claim is not None and claim.attempt == 1  # the claim that landed is ours, not "taken by another"
    cutter.armed.set()
    assert store.succeed(claim, RESULT, ("pacs",))  # a finished result is never reported lost
    assert store.get(job.id).state == JobState.SUCCEEDED and len(store.deliveries(job.id)) == 1
    assert cutter.cuts == 4
    other = running(store)
    cutter.armed.set()
    assert store.fail(other, ErrorKind.INTERNAL, "boom")
    store.close()


def test_a_database_that_refuses_who_we_are_fails_at_once_naming_it_without_its_password(pg_cluster):
    from server.core.database import DatabaseUnavailable, open_checked
    from server.core.settings import Settings

    for url in (pg_cluster.url("no_such_db"), f"postgresql://nobody:S3cretPW@127.0.0.1:{pg_cluster.port}/postgres",
                f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/no_such_db?password=S3cretPW"):
        t = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as refused:
            open_checked(Settings(database_url=url, db_patience_s=300))
        assert time.monotonic() - t < 10  # not retried as if busy for the 300 s of patience
        assert "does not exist" in str(refused.value) and "S3cretPW" not in str(refused.value)


def test_a_second_single_box_on_one_postgresql_database_is_refused(pg_cluster):
    from server.core.database import DatabaseInUse, SingleBoxLock

    first_db, second_db = Database(pg_cluster.new_database()), None
    first = SingleBoxLock(first_db)
    second_db = Database(first_db.url)
    with pytest.raises(DatabaseInUse, match="in use by another single-box ctseg"):
        SingleBoxLock(second_db)
    first.release()
    SingleBoxLock(second_db).release()  # once the first is gone, the database is free
    for db in (first_db, second_db):
        db.dispose()
