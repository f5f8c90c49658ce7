"""The BlobStore contract, on both back ends: a folder (a shared volume) and S3 (a real ``moto_server`` on a free
127.0.0.1 port, through boto3 as in production). A put killed halfway leaves nothing a reader can see."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from common import free_port, require_tool, wait_for
from server.core.blobs import (
    BlobNotFound,
    BlobStore,
    BlobStoreUnavailable,
    FileBlobStore,
    S3BlobStore,
    open_blob_store,
)

MOTO_SERVER = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
BUCKET = "ctseg-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    tool = require_tool(MOTO_SERVER if os.path.exists(MOTO_SERVER) else None, "moto_server (pip install 'moto[server]')")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([tool, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url, timeout=1).status_code < 500
        except requests.RequestException:
            return False
    try:
        wait_for(up, 60, 0.2, "moto_server answering")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)


def _bucket(endpoint: str, name: str) -> None:
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=name)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> BlobStore:
    if request.param == "file":
        return FileBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("moto")
    bucket = f"{BUCKET}-{os.urandom(4).hex()}"
    _bucket(endpoint, bucket)
    return open_blob_store(f"s3://{bucket}/ctseg", tmp_path, endpoint)


def test_objects_round_trip_replace_list_and_delete(store, tmp_path):
    assert isinstance(store, BlobStore)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300_000))
    store.put_file("jobs/a/input/000001.dcm", source)
    store.put_bytes("jobs/a/input/000002.dcm", b"second")
    store.put_bytes("jobs/b/result/labels.nii.gz", b"labels")
    assert store.exists("jobs/a/input/000001.dcm") and not store.exists("jobs/a/input/000003.dcm")
    assert store.size("jobs/a/input/000001.dcm") == 300_000
    target = tmp_path / "scratch" / "000001.dcm"
    target.parent.mkdir()
    store.get_file("jobs/a/input/000001.dcm", target)
    assert target.read_bytes() == source.read_bytes()
    assert list(target.parent.iterdir()) == [target]  # no temporary left in the scratch folder
    store.put_bytes("jobs/a/input/000002.dcm", b"replaced")
    assert store.get_bytes("jobs/a/input/000002.dcm") == b"replaced"
    assert sorted(store.keys("jobs/a/")) == ["jobs/a/input/000001.dcm", "jobs/a/input/000002.dcm"]
    assert sorted(store.keys()) == ["jobs/a/input/000001.dcm", "jobs/a/input/000002.dcm",
                                    "jobs/b/result/labels.nii.gz"]
    assert store.delete_prefix("jobs/a/") == 2
    assert list(store.keys("jobs/a/")) == []
    store.delete("jobs/b/result/labels.nii.gz")
    store.delete("jobs/b/result/labels.nii.gz")  # deleting what is gone is not an error (a retried cleanup)
    assert list(store.keys()) == []


def test_a_missing_object_is_blob_not_found(store, tmp_path):
    with pytest.raises(BlobNotFound):
        store.get_bytes("jobs/none/x.dcm")
    with pytest.raises(BlobNotFound):
        store.size("jobs/none/x.dcm")
    with pytest.raises(BlobNotFound):
        store.get_file("jobs/none/x.dcm", tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.parametrize("key", ["", "../etc/passwd", "/etc/passwd", "jobs//x", "jobs/./x", "jobs/../x", "a\x00b",
                                 "jobs/.part-x", "jobs/naïve.dcm", "jobs/a b.dcm", "x" * 600])
def test_a_key_that_could_escape_or_differ_between_back_ends_is_refused(store, key, tmp_path):
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    assert list(store.keys()) == []
    assert not (tmp_path / "etc").exists()


def test_an_unreachable_s3_endpoint_is_unavailable_not_a_crash(tmp_path):
    store = S3BlobStore("bucket", "", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(BlobStoreUnavailable):
        store.put_bytes("jobs/a/x", b"x")
    with pytest.raises(BlobStoreUnavailable):
        list(store.keys())
    assert time.monotonic() - started < 60


def test_blob_urls_are_checked(tmp_path):
    assert isinstance(open_blob_store(None, tmp_path), FileBlobStore)
    assert open_blob_store(f"file://{tmp_path}/shared", tmp_path).root == tmp_path / "shared"
    for bad in ("ftp://x/y", "file://host/x", "s3:///prefix", "file:relative"):
        with pytest.raises(ValueError):
            open_blob_store(bad, tmp_path)


PUTTER = """
import sys
from pathlib import Path
from server.core.blobs import open_blob_store
store = open_blob_store(sys.argv[1], Path(sys.argv[2]), sys.argv[3] or None)
print("PUT", flush=True)
store.put_file("jobs/a/big.bin", Path(sys.argv[4]))
print("DONE", flush=True)
"""


def test_a_put_killed_halfway_leaves_the_old_object_or_none(store, tmp_path):
    """SIGKILL while the object's bytes are being written (a temporary file growing; an S3 multipart upload open):
    readers see the previous version, whole."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    store.put_bytes("jobs/a/big.bin", b"previous version")
    if isinstance(store, FileBlobStore):
        url, endpoint = store.root.as_uri(), ""

        def halfway() -> bool:
            parts = [p for p in (store.root / "jobs" / "a").glob(".part-*")]
            return bool(parts) and 0 < parts[0].stat().st_size < big.stat().st_size
    else:
        url, endpoint = store.url, store._client.meta.endpoint_url

        def halfway() -> bool:
            return bool(store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads"))
    proc = subprocess.Popen([sys.executable, "-c", PUTTER, url, str(tmp_path), endpoint, str(big)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert proc.stdout.readline().strip() == "PUT"
        wait_for(halfway, 60, 0.001, "the put under way")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.get_bytes("jobs/a/big.bin") == b"previous version"
    assert list(store.keys("jobs/")) == ["jobs/a/big.bin"]
