"""Sending a SEG to a destination: STOW-RS (dicomweb-client) or C-STORE (pynetdicom).

Each send either returns (the destination acknowledged the instance), or raises :class:`RetryableDelivery`
(the destination could not be reached or was busy: try again later) or :class:`RejectedDelivery` (it answered and
refused this instance: sending the same bytes again will not help). The outbox decides what happens next.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import LabelMapSegmentationStorage, SegmentationStorage

from server.nodes import DicomWebNode, DimseNode, Node

log = logging.getLogger(__name__)

SEG_SOP_CLASSES = (SegmentationStorage, LabelMapSegmentationStorage)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
SEG_TRANSFER_SYNTAXES = (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, JPEGLSLossless)
# C-STORE statuses a peer may answer with that mean "not now" rather than "not this" (PS3.4 B.2.3, PS3.7 C).
BUSY_STATUSES = range(0xA700, 0xA800)
WARNING_STATUSES = (0x0001, 0xB000, 0xB006, 0xB007)


class DeliveryError(Exception):
    """A send that did not end in an acknowledgement."""


class RetryableDelivery(DeliveryError):
    """Unreachable, timed out, busy: the same SEG may be accepted later."""


class RejectedDelivery(DeliveryError):
    """The destination answered and refused the SEG."""


def dicomweb_client(node: DicomWebNode) -> DICOMwebClient:
    session = requests.Session()
    if node.username is not None and node.password is not None:
        session.auth = (node.username, node.password.get_secret_value())
    headers = {"Authorization": f"Bearer {node.token.get_secret_value()}"} if node.token is not None else None
    client = DICOMwebClient(node.url, session=session, headers=headers, timeout=node.timeout_s)
    # dicomweb-client retries inside one call (with sleeps of its own): the outbox decides when to try again.
    client.set_http_retry_params(retry=False)
    return client


def _http_error(node: Node, err: requests.HTTPError) -> DeliveryError:
    status = err.response.status_code if err.response is not None else None
    text = f"{node.name}: HTTP {status}"
    if status is not None and (status >= 500 or status in (401, 403, 404, 408, 429)):
        # 5xx and throttling are transient; 401/403/404 are configuration the operator can fix without a resend
        return RetryableDelivery(text)
    return RejectedDelivery(f"{text}: the destination refused the SEG")


def send_stow(node: DicomWebNode, path: Path) -> None:
    dataset = pydicom.dcmread(path)
    try:
        answer = dicomweb_client(node).store_instances([dataset])
    except requests.HTTPError as err:
        raise _http_error(node, err) from None
    except requests.RequestException as err:
        raise RetryableDelivery(f"{node.name}: cannot reach {node.url} ({type(err).__name__})") from None
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reason = getattr(failed[0], "FailureReason", "?")
        raise RejectedDelivery(f"{node.name}: STOW-RS failed the SEG (FailureReason {reason})")


def dimse_ae(calling_ae_title: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    return ae


def send_cstore(node: DimseNode, path: Path, calling_ae_title: str) -> None:
    dataset = pydicom.dcmread(path)
    syntax = dataset.file_meta.TransferSyntaxUID
    ae = dimse_ae(node.calling_ae_title or calling_ae_title, node.timeout_s)
    # The SEG's own transfer syntax, plus both uncompressed ones (pynetdicom converts between those two).
    offered = [syntax] + [s for s in UNCOMPRESSED if s != syntax]
    for sop_class in SEG_SOP_CLASSES:
        ae.add_requested_context(sop_class, offered)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "could not be reached"
        raise RetryableDelivery(f"{node.name}: {node.ae_title}@{node.host}:{node.port} {why}")
    try:
        status = assoc.send_c_store(dataset)
    except ValueError as err:  # no accepted presentation context for this SOP class / transfer syntax
        raise RejectedDelivery(f"{node.name}: no accepted presentation context for the SEG ({err})") from None
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None) if status is not None else None
    if code is None:
        raise RetryableDelivery(f"{node.name}: no C-STORE response (association aborted or timed out)")
    if code == 0x0000 or code in WARNING_STATUSES:
        if code:
            log.warning("destination %s stored the SEG with warning status 0x%04X", node.name, code)
        return
    if code in BUSY_STATUSES:
        raise RetryableDelivery(f"{node.name}: C-STORE status 0x{code:04X} (out of resources)")
    raise RejectedDelivery(f"{node.name}: C-STORE status 0x{code:04X}")


def deliver(node: Node, path: Path, calling_ae_title: str) -> None:
    """Send the SEG at ``path`` to ``node``; raises a :class:`DeliveryError` unless it was acknowledged."""
    if isinstance(node, DicomWebNode):
        send_stow(node, path)
    else:
        send_cstore(node, path, calling_ae_title)

