"""Where a job's files live when several machines share them: a ``BlobStore``.

One box keeps uploads, received instances and results in its storage folder. Several machines (API replicas, DICOM
receivers, GPU workers) need a place all of them reach: a shared POSIX volume (compose's default) or S3-compatible
object storage (MinIO or Ceph in a hospital). Both are one protocol of whole-object operations, the only ones both
can do with the same guarantees:

* ``put_file``/``put_bytes`` are durable and atomic when they return: a reader sees the whole object or none (a
  file: written to a unique temporary name, fsynced, renamed inside its folder on the one volume; S3: PUT, or a
  multipart upload completed only once every part is in). A put of an existing key replaces it.
* ``get_file`` downloads to local scratch (a worker runs on local disk, then uploads its results and commits).
* nothing relies on a rename *between* keys or on listing order; the database records the keys a job owns.

Keys are relative POSIX paths of plain ASCII segments (``jobs/<id>/input/000001.dcm``): checked once here, so a key
can never climb out of the folder (``..``, absolute paths, NUL) or mean different objects on the two back ends.

``CTSEG_BLOB_URL`` picks one (:func:`open_blob_store`): unset, the storage folder; ``file:///shared/path``; or
``s3://bucket/prefix`` with ``CTSEG_S3_ENDPOINT_URL`` and the usual AWS credential variables (boto3 reads them;
they never pass through ctseg's settings or logs).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from server.core.durable import make_dirs, temporary, write_bytes, write_with
from server.core.errors import ServiceUnavailable

KEY_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_KEY_LENGTH = 512  # S3 allows 1024 bytes; the file back end's paths stay well under PATH_MAX


class BlobNotFound(LookupError):
    """No object under that key."""


class BlobStoreUnavailable(ServiceUnavailable):
    """The blob store cannot be reached or refused the operation (HTTP 503: the caller retries)."""


def check_key(key: str) -> str:
    """A key both back ends store as the same object, or ValueError saying why not."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"a blob key is 1 to {MAX_KEY_LENGTH} characters; got {len(key) if isinstance(key, str) else key!r}")
    for segment in key.split("/"):
        if not KEY_SEGMENT.match(segment):
            raise ValueError(f"blob key segment {segment[:40]!r} is not plain ASCII letters, digits, '.', '_' or '-' "
                             "starting with a letter or digit")
    return key


def check_prefix(prefix: str) -> str:
    """A folder of keys: '' (everything) or keys' leading segments ending in '/'."""
    if prefix == "":
        return prefix
    if not prefix.endswith("/"):
        raise ValueError(f"a blob prefix ends with '/'; got {prefix[:40]!r}")
    check_key(prefix[:-1])
    return prefix


@runtime_checkable
class BlobStore(Protocol):
    url: str  # what it is, for logs and /health (no credentials)

    def put_file(self, key: str, source: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, target: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def keys(self, prefix: str = "") -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...


class FileBlobStore:
    """Objects as files under ``root`` (a local folder or a shared volume mounted at the same path everywhere)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        write_with(make_dirs(target.parent) / target.name, lambda tmp: shutil.copyfile(source, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        write_bytes(make_dirs(target.parent) / target.name, data)

    def get_file(self, key: str, target: Path) -> None:
        tmp = temporary(Path(target))
        try:
            shutil.copyfile(self._path(key), tmp)
            os.replace(tmp, target)
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def keys(self, prefix: str = "") -> Iterator[str]:
        base = self.root / check_prefix(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):  # temporaries of puts under way
                yield path.relative_to(self.root).as_posix()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        gone = 0
        for key in list(self.keys(prefix)):
            self.delete(key)
            gone += 1
        if prefix:
            shutil.rmtree(self.root / prefix, ignore_errors=True)
        return gone


class S3BlobStore:
    """Objects in an S3-compatible bucket under ``prefix``, through boto3 (imported only when configured)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
        except ModuleNotFoundError as err:
            raise ValueError("CTSEG_BLOB_URL is s3://...: install boto3 (pip install 'ctseg[s3]')") from err
        self.bucket = bucket
        self.prefix = check_prefix(prefix) if prefix else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        self._client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self._client_error, self._core_error = ClientError, BotoCoreError

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, key: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - boto3's own signatures
        try:
            return fn(*args, **kwargs)
        except self._client_error as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise BlobNotFound(key) from None
            raise BlobStoreUnavailable(f"the blob store {self.url} refused the operation ({code or 'error'})") from None
        except self._core_error as err:
            raise BlobStoreUnavailable(f"the blob store {self.url} cannot be reached ({type(err).__name__})") from None

    def put_file(self, key: str, source: Path) -> None:
        self._call(key, self._client.upload_file, str(source), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, target: Path) -> None:
        tmp = temporary(Path(target))
        try:
            self._call(key, self._client.download_file, self.bucket, self._key(key), str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        answer = self._call(key, self._client.get_object, Bucket=self.bucket, Key=self._key(key))
        return answer["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        answer = self._call(key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(answer["ContentLength"])

    def keys(self, prefix: str = "") -> Iterator[str]:
        full = self.prefix + check_prefix(prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix):]
        except (self._client_error, self._core_error) as err:
            raise BlobStoreUnavailable(f"the blob store {self.url} cannot be listed ({type(err).__name__})") from None

    def delete(self, key: str) -> None:
        self._call(key, self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.keys(prefix))
        for start in range(0, len(keys), 1000):  # S3's limit per DeleteObjects request
            batch = [{"Key": self.prefix + k} for k in keys[start:start + 1000]]
            self._call(prefix, self._client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)


def open_blob_store(blob_url: str | None, storage_dir: Path, s3_endpoint_url: str | None = None) -> BlobStore:
    """The store ``CTSEG_BLOB_URL`` names (see the module's docstring)."""
    if not blob_url:
        return FileBlobStore(Path(storage_dir) / "blobs")
    url = urlparse(blob_url)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
            raise ValueError(f"CTSEG_BLOB_URL file URLs are file:///absolute/path; got {blob_url!r}")
        return FileBlobStore(Path(unquote(url.path)))
    if url.scheme == "s3":
        if not url.netloc:
            raise ValueError("CTSEG_BLOB_URL s3 URLs name a bucket: s3://bucket/prefix")
        prefix = url.path.strip("/")
        return S3BlobStore(url.netloc, f"{prefix}/" if prefix else "", s3_endpoint_url)
    raise ValueError(f"CTSEG_BLOB_URL must be file:///path or s3://bucket/prefix; got scheme {url.scheme!r}")
