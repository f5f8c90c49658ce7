"""Hostile clients of the HTTP API: bodies that trickle or stall (they must not hold a queue slot), JSON bodies
read whole, invented methods and paths (they must not grow /metrics), UIDs in query strings and paths (they must not
reach the access log), and parallel submissions against the queue limit. A real ``ctseg serve`` and real sockets."""

from __future__ import annotations

import random
import socket
import sqlite3
import string
import threading
import time

import pytest
import requests
from common import Serve, wait_for
from test_api import nifti_bytes, phantom

from server.core.errors import QueueFull
from server.core.settings import Settings
from server.core.vocabulary import OriginKind, Output
from server.jobs.model import JobRequest, Origin
from server.core.database import DB_NAME
from server.service import SegmentationService

KEY = "upload-key"
AUTH = {"X-API-Key": KEY}
IDLE_S, GRACE_S = 1.0, 2.0  # a stalled body is cut after 1 s; a trickling one once 2 s have passed
SECRET_UID = "1.2.826.0.1.3680043.99.424242"
BOUNDARY = "hostileboundary"


@pytest.fixture(scope="module")
def server(intensity_bundle, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hostile-uploads")
    serve = Serve(intensity_bundle, root / "storage", root / "ctseg.log", CTSEG_MAX_QUEUE="1", CTSEG_API_KEYS=KEY,
                  CTSEG_UPLOAD_IDLE_TIMEOUT_S=str(IDLE_S), CTSEG_UPLOAD_RATE_GRACE_S=str(GRACE_S),
                  CTSEG_UPLOAD_MIN_KIB_S="64").start()
    try:
        yield serve
    finally:
        serve.kill()


def jobs_in(server: Serve, state: str) -> list[dict]:
    r = requests.get(f"{server.url}/v1/segmentations", params={"state": state}, headers=AUTH, timeout=10)
    return r.json()["jobs"]


def wait_finished(server: Serve, job_id: str) -> None:
    url = f"{server.url}/v1/segmentations/{job_id}"
    wait_for(lambda: requests.get(url, headers=AUTH, timeout=10).json()["state"] not in ("staging", "queued",
                                                                                         "running"),
             120, 0.2, "the upload's job finished")


def upload(server: Serve) -> requests.Response:
    data = nifti_bytes(phantom(shape=(24, 20, 12))[0])
    return requests.post(f"{server.url}/v1/segmentations", headers=AUTH, timeout=60,
                         files=[("files", ("ct.nii.gz", data, "application/octet-stream"))])


def open_upload(server: Serve, declared: int) -> socket.socket:
    """A raw HTTP upload whose body has begun: the request head and the first file part's headers, no data."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"ct.nii.gz\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    head = (f"POST /v1/segmentations HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(part) + declared}\r\n"
            "\r\n").encode()
    sock.sendall(head + part)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, str, bool]:
    """Status, body and whether the server then closed the connection."""
    sock.settimeout(15)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    sock.settimeout(5)
    try:
        closed = sock.recv(65536) == b""
    except ConnectionResetError:  # closed while the client still sent: the kernel answers with a reset
        closed = True
    except TimeoutError:
        closed = False
    return int(head.split()[1]), body.decode(), closed


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_trickling_and_stalled_uploads_are_cut_off_and_free_their_queue_slot(server):
    stop = threading.Event()
    slow = open_upload(server, declared=10 << 20)

    def trickle() -> None:  # a byte every 0.3 s: never idle for 1 s, but nowhere near 64 KiB/s
        while not stop.wait(0.3):
            try:
                slow.sendall(b"\0")
            except OSError:
                return

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    started = time.monotonic()
    try:
        wait_for(lambda: jobs_in(server, "staging"), 10, 0.05, "the slow upload's job")
        blocked = upload(server)  # the slow upload holds the only slot (CTSEG_MAX_QUEUE=1)
        assert blocked.status_code == 503 and "queue is full" in blocked.json()["detail"], blocked.text
        status, body, closed = read_answer(slow)
        assert status == 408, body
        assert "KiB/s" in body and "CTSEG_UPLOAD_MIN_KIB_S" in body, body
        assert GRACE_S - 0.5 < time.monotonic() - started < GRACE_S + 8
        assert closed, "the connection of a cut-off upload is closed"
    finally:
        stop.set()
        slow.close()
    assert not jobs_in(server, "staging")  # its job is removed: nothing waits for a body that will not come
    accepted = upload(server)
    assert accepted.status_code == 202, accepted.text
    wait_finished(server, accepted.json()["id"])

    stalled = open_upload(server, declared=1 << 20)  # then sends nothing at all
    try:
        status, body, closed = read_answer(stalled)
    finally:
        stalled.close()
    assert status == 408 and "nothing arrived for 1 s (CTSEG_UPLOAD_IDLE_TIMEOUT_S)" in body, body
    assert not jobs_in(server, "staging")


def test_a_json_body_over_its_limit_is_413_naming_the_limit(server):
    big = b'{"source": "pacs", "study_uid": "1.2", "series_uid": "1.2", "pad": "' + b"x" * (100 << 10) + b'"}'
    headers = {**AUTH, "Content-Type": "application/json"}
    declared = requests.post(f"{server.url}/v1/segmentations", data=big, headers=headers, timeout=30)
    assert declared.status_code == 413, declared.text
    assert "larger than the limit of 64 KB (CTSEG_MAX_JSON_KB)" in declared.json()["detail"]
    chunked = requests.post(f"{server.url}/v1/segmentations", data=(big[i:i + 8192] for i in range(0, len(big), 8192)),
                            headers=headers, timeout=30)
    assert "content-length" not in {k.lower() for k in chunked.request.headers}
    assert chunked.status_code == 413 and "CTSEG_MAX_JSON_KB" in chunked.json()["detail"], chunked.text
    small = requests.post(f"{server.url}/v1/segmentations", json={"source": "nowhere", "study_uid": "1.2",
                                                                  "series_uid": "1.2"}, headers=AUTH, timeout=30)
    assert small.status_code == 404 and "unknown source" in small.json()["detail"]  # a small one is still read


def series_count(server: Serve) -> int:
    text = requests.get(f"{server.url}/metrics", headers=AUTH, timeout=10).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_invented_methods_and_paths_do_not_grow_the_metrics(server):
    rng = random.Random(7)
    for _ in range(3):  # every fixed label the requests below can produce, once
        requests.request("BREW", f"{server.url}/v1/models", timeout=10)
        requests.request("BREW", f"{server.url}/v1/segmentations/x", headers=AUTH, timeout=10)
        requests.get(f"{server.url}/nowhere", headers=AUTH, timeout=10)
    before = series_count(server)
    for i in range(200):
        method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
        path = "/" + "".join(rng.choices(string.ascii_lowercase + string.digits + ".", k=12))
        if i % 2:
            requests.request(method, server.url + path, timeout=10)  # no key: refused before anything else
        else:
            requests.request(method, f"{server.url}/v1/segmentations{path}", headers=AUTH, timeout=10)
            requests.get(f"{server.url}/v1{path}", headers=AUTH, timeout=10)
    after = series_count(server)
    assert after - before <= 40, (before, after)  # a few new combinations of fixed labels at most, not one per request


def test_the_access_log_names_no_uid_from_a_query_or_a_path(server):
    seen = server.log.read_text().count("GET /v1/segmentations")
    requests.get(f"{server.url}/v1/segmentations", params={"series_uid": SECRET_UID}, headers=AUTH, timeout=10)
    requests.get(f"{server.url}/v1/segmentations/{SECRET_UID}", headers=AUTH, timeout=10)
    requests.get(f"{server.url}/v1/segmentations/{SECRET_UID}/labelmap.nii.gz", timeout=10)  # refused: no key
    log = wait_for(lambda: (t := server.log.read_text()).count("GET /v1/segmentations") >= seen + 2 and t, 10, 0.1,
                   "an access log line per request")
    assert SECRET_UID not in log and "424242" not in log
    assert "GET /v1/segmentations 200" in log and "GET /v1/segmentations/{job_id} 404" in log  # by route template


def test_parallel_submissions_never_pass_the_queue_limit(intensity_bundle, tmp_path):
    """The count and the creation as one step. Another connection holds the database's write lock, so every
    submission reads the count before any can write: checked-then-created separately, all of them pass."""
    limit, submissions = 2, 8
    service = SegmentationService(Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage",
                                           worker_mode="thread", max_queue=limit))
    service.start()
    try:
        request = JobRequest(None, (Output.NIFTI,), None, Origin(OriginKind.UPLOAD), None)
        holder = sqlite3.connect(tmp_path / "storage" / DB_NAME, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        start, outcomes = threading.Barrier(submissions + 1), []

        def submit() -> None:
            start.wait()
            try:
                outcomes.append(service.open_job(request).id)
            except QueueFull:
                outcomes.append("full")

        threads = [threading.Thread(target=submit) for _ in range(submissions)]
        for t in threads:
            t.start()
        start.wait()
        time.sleep(1.0)  # every submission has counted the jobs (and waits on the write lock, or on its turn)
        holder.execute("COMMIT")
        holder.close()
        for t in threads:
            t.join(30)
        assert len(outcomes) == submissions
        assert sum(o != "full" for o in outcomes) == limit, outcomes
        assert service.store.active() == limit
    finally:
        service.stop()
