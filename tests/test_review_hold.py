"""A review hold (issue 21, point 3): a route (or an upload) with ``review`` keeps its job's deliveries ``held``
until a person releases them (then a real Orthanc receives the SEG) or discards them (then nothing is ever sent).
The outbox side runs on both stores: held deliveries are never claimed, never given up by age, and keep their
job past retention."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import requests
from common import wait_for
from dicom_factory import to_bytes, write_files
from pacs import Orthanc
from test_dicom_node import node, storescu
from test_pacs import ct_series
from test_store_contract import RESULT, SPEC, cluster, queued, store, url  # noqa: F401  (fixtures: both stores)

from server.core.database import Database
from server.core.vocabulary import DeliveryState
from server.jobs.model import JobState
from server.jobs.sql_store import SqlJobStore

REVIEW = replace(SPEC, review=True)


# ---------------------------------------------------------------------------------------------------- the store
def test_held_deliveries_are_never_claimed_given_up_or_expired_until_released(store: SqlJobStore):  # noqa: F811
    claim = store.claim(queued(store, REVIEW), "worker-1", 30)
    assert claim is not None and store.get(claim.job_id).spec.review
    assert store.release_held(claim.job_id) == 0  # running: nothing held yet
    assert store.succeed(claim, RESULT, ("pacs",))
    (held,) = store.deliveries(claim.job_id)
    assert held.state == DeliveryState.HELD
    far = time.time() + 3600
    assert store.claim_deliveries("pacs", far, 30, 10) == []
    assert store.pending_destinations() == set() and store.next_due("pacs") is None
    assert store.give_up_deliveries(far, "too old") == []
    assert claim.job_id not in store.expired(-3600)  # past any retention, still kept: a person has to decide
    by_state, oldest = store.outbox_stats()
    assert by_state == {("pacs", "held"): 1} and oldest is None

    assert store.release_held(claim.job_id) == 1
    assert store.release_held(claim.job_id) == 0  # compare-and-set: a second release changes nothing
    (taken,) = store.claim_deliveries("pacs", time.time() + 1, 7200, 10)  # its claim outlasts ``far``
    assert taken.job_id == claim.job_id and taken.state == DeliveryState.PENDING

    other = store.claim(queued(store, REVIEW), "worker-1", 30)
    assert store.succeed(other, RESULT, ("pacs",))
    assert store.discard_held(other.job_id, "not sent: discarded at review") == 1
    assert store.discard_held(other.job_id, "again") == 0 and store.release_held(other.job_id) == 0
    (gone,) = store.deliveries(other.job_id)
    assert gone.state == DeliveryState.DISCARDED and gone.last_error == "not sent: discarded at review"
    assert store.claim_deliveries("pacs", far, 30, 10) == []  # the released one is claimed already
    assert other.job_id in store.expired(-3600)  # decided: retention applies again

    plain = store.claim(queued(store), "worker-1", 30)  # no review: pending at once, as before
    assert store.succeed(plain, RESULT, ("pacs",))
    assert [d.state for d in store.deliveries(plain.job_id)] == [DeliveryState.PENDING]


def test_a_held_job_superseded_sends_nothing(store: SqlJobStore):  # noqa: F811
    claim = store.claim(queued(store, REVIEW), "worker-1", 30)
    assert store.succeed(claim, RESULT, ("pacs",))
    assert [d.state for d in store.deliveries(claim.job_id)] == [DeliveryState.HELD]
    newer = store.create(REVIEW)
    outcome = store.supersede(claim.job_id, newer.id)
    assert outcome is not None and outcome.cancelled_deliveries == 1 and not outcome.reuse_seg_uids
    assert [d.state for d in store.deliveries(claim.job_id)] == [DeliveryState.SUPERSEDED]
    assert store.release_held(claim.job_id) == 0


# ---------------------------------------------------------------------------------------------------- end to end
def _held(server, job_id: str) -> dict:
    record = server.wait_finished(job_id)
    assert record["state"] == JobState.SUCCEEDED.value, record
    assert record["review"] is True and record["deliveries"], record
    assert {d["state"] for d in record["deliveries"]} == {"held"}, record["deliveries"]
    return record


def test_a_review_route_holds_the_outbox_until_release_and_a_discarded_job_is_never_sent(intensity_bundle,
                                                                                        tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    server = node(intensity_bundle, tmp_path, orthanc, CTSEG_ROUTES=json.dumps([{"review": True}]))
    routed, uploaded, plain = ct_series(), ct_series(), ct_series()
    try:
        server.start()
        storescu(server.dicom_port, write_files(routed, tmp_path / "routed"))
        job = wait_for(lambda: next((j["id"] for j in server.jobs()), None), 60, 0.3, "the routed series' job")
        record = _held(server, job)
        assert record["input"]["origin"]["kind"] == "dimse"
        time.sleep(4)  # several outbox rounds (retry base 0.5 s): nothing leaves while it is held
        assert orthanc.instance_count() == 0
        assert {d["state"] for d in server.job(job)["deliveries"]} == {"held"}
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'ctseg_deliveries{destination="pacs",state="held"} 1.0' in metrics
        assert "ctseg_outbox_depth 0.0" in metrics  # waiting for a person, not for the outbox

        r = requests.post(f"{server.url}/v1/segmentations/{job}/release", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == job and {d["state"] for d in r.json()["deliveries"]} <= {"pending", "delivered"}
        wait_for(lambda: {d["state"] for d in server.job(job)["deliveries"]} == {"delivered"}, 60, 0.3,
                 "the released SEG delivered")
        assert len(orthanc.seg_series(routed[0].StudyInstanceUID)) == 1
        again = requests.post(f"{server.url}/v1/segmentations/{job}/release", timeout=10)
        assert again.status_code == 409 and "released or discarded already" in again.json()["detail"], again.text

        files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(uploaded)]
        second = requests.post(server.url + "/v1/segmentations", params={"review": "true", "destinations": "pacs"},
                               files=files, timeout=120).json()["id"]
        _held(server, second)
        r = requests.post(f"{server.url}/v1/segmentations/{second}/discard", timeout=10)
        assert r.status_code == 200, r.text
        (gone,) = r.json()["deliveries"]
        assert gone["state"] == "discarded" and "discarded at review" in gone["last_error"]
        time.sleep(3)
        assert orthanc.seg_series(uploaded[0].StudyInstanceUID) == [] and orthanc.instance_count() == 1
        late = requests.post(f"{server.url}/v1/segmentations/{second}/release", timeout=10)
        assert late.status_code == 409 and "discarded already" in late.json()["detail"], late.text

        files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(plain)]
        third = requests.post(server.url + "/v1/segmentations", params={"destinations": "none"}, files=files,
                              timeout=120).json()["id"]
        assert server.wait_finished(third)["review"] is False
        r = requests.post(f"{server.url}/v1/segmentations/{third}/release", timeout=10)
        assert r.status_code == 409 and "not held for review" in r.json()["detail"], r.text
        r = requests.post(f"{server.url}/v1/segmentations/{'0' * 32}/discard", timeout=10)
        assert r.status_code == 404 and "no segmentation job" in r.json()["detail"], r.text

        # a job under review still running (claimed here, on the service's own database, by a worker that never
        # ends it): nothing to release yet, and the answer says so
        outside = SqlJobStore(Database(f"sqlite:///{tmp_path / 'storage' / 'jobs.sqlite3'}"), migrate=False)
        try:
            running = outside.claim(queued(outside, REVIEW), "a-slow-worker", 600)
        finally:
            outside.close()
        r = requests.post(f"{server.url}/v1/segmentations/{running.job_id}/release", timeout=10)
        assert r.status_code == 409 and "it is running" in r.json()["detail"], r.text
    finally:
        server.kill()
        orthanc.stop()
