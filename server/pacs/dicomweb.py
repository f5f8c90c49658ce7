"""DICOMweb: STOW-RS to store a SEG, WADO-RS to retrieve a series (dicomweb-client, its own retries off)."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from server.core import durable
from server.core.nodes import DicomWebNode
from server.pacs.errors import (
    RejectedDelivery,
    RetryableDelivery,
    SeriesNotFound,
    SourceUnavailable,
)

log = logging.getLogger(__name__)


def _session(node: DicomWebNode) -> requests.Session:
    session = requests.Session()
    if node.username is not None and node.password is not None:
        session.auth = (node.username, node.password.get_secret_value())
    if node.token is not None:
        session.headers["Authorization"] = f"Bearer {node.token.get_secret_value()}"
    return session


def client(node: DicomWebNode) -> DICOMwebClient:
    web = DICOMwebClient(node.url, session=_session(node), timeout=node.timeout_s)
    # dicomweb-client retries inside one call (with sleeps of its own): the outbox decides when to try again.
    web.set_http_retry_params(retry=False)
    return web


def _http_error(node: DicomWebNode, err: requests.HTTPError) -> RetryableDelivery | RejectedDelivery:
    status = err.response.status_code if err.response is not None else None
    text = f"{node.name}: HTTP {status}"
    if status is not None and (status >= 500 or status in (401, 403, 404, 408, 429)):
        # 5xx and throttling are transient; 401/403/404 are configuration the operator can fix without a resend
        return RetryableDelivery(text)
    return RejectedDelivery(f"{text}: the destination refused the SEG")


def store(node: DicomWebNode, path: Path) -> str | None:
    """STOW-RS; returns a warning the destination gave with its acknowledgement, if any."""
    dataset = pydicom.dcmread(path)
    try:
        answer = client(node).store_instances([dataset])
    except requests.HTTPError as err:
        raise _http_error(node, err) from None
    except requests.RequestException as err:
        raise RetryableDelivery(f"{node.name}: cannot reach {node.url} ({type(err).__name__})") from None
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reason = getattr(failed[0], "FailureReason", "?")
        raise RejectedDelivery(f"{node.name}: STOW-RS failed the SEG (FailureReason {reason})")
    stored = answer.get("ReferencedSOPSequence") if answer is not None else None
    warning = getattr(stored[0], "WarningReason", None) if stored else None
    return f"{node.name}: stored with WarningReason {warning}" if warning is not None else None


def ping(node: DicomWebNode) -> bool:
    """Does the service answer HTTP at all (any status below 500): a cheap probe while deliveries are held back."""
    try:
        answer = _session(node).get(node.url + "/studies", params={"limit": "1"}, timeout=min(node.timeout_s, 10.0))
    except requests.RequestException:
        return False
    return answer.status_code < 500


def retrieve(node: DicomWebNode, study_uid: str, series_uid: str, target: Path) -> int:
    """WADO-RS in the stored transfer syntax ("*": no transcoding by the source), each instance durable on disk
    as it streams in."""
    count = 0
    try:
        for dataset in client(node).iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),)):
            count += 1
            path = target / f"{count:06d}.dcm"
            durable.write_with(path, lambda tmp, ds=dataset: ds.save_as(tmp, enforce_file_format=True))
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 404:
            raise SeriesNotFound(f"series {series_uid} of study {study_uid} is not on source {node.name!r}") from None
        raise SourceUnavailable(f"source {node.name!r} answered HTTP {status} to the retrieval") from None
    except requests.RequestException as err:
        raise SourceUnavailable(f"source {node.name!r} cannot be reached at {node.url} ({type(err).__name__})") from None
    return count
