"""DIMSE (pynetdicom): C-STORE to store a SEG, C-GET to retrieve a series. Statuses are decided by their
category (server/pacs/status.py): a warning that means "stored" is a delivery, with the warning kept."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from server.core import durable
from server.core.errors import storage_full
from server.core.nodes import DimseNode
from server.core.vocabulary import SegType
from server.imaging.sop import (
    CT_IMAGE_STORAGE,
    READABLE_TRANSFER_SYNTAXES,
    SEG_STORAGE,
    UNCOMPRESSED,
)
from server.pacs import status
from server.pacs.errors import (
    RejectedDelivery,
    RetryableDelivery,
    SeriesNotFound,
    SourceUnavailable,
)
from server.pacs.status import Category, Service, StoreStatus

log = logging.getLogger(__name__)


def application_entity(calling_ae_title: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    return ae


def store(node: DimseNode, path: Path, calling_ae_title: str, fallback: Path | None = None) -> str | None:
    """C-STORE of the object at ``path`` (a SEG, RTSTRUCT, SR or key image); returns the warning the destination
    stored it with, if any. A LABELMAP SEG whose class the destination does not accept at association (dcm4chee's
    default) is replaced by ``fallback``, the BINARY SEG of the same result, with a warning saying so."""
    dataset = pydicom.dcmread(path)
    syntax = dataset.file_meta.TransferSyntaxUID
    ae = application_entity(node.calling_ae_title or calling_ae_title, node.timeout_s)
    # The object's own transfer syntax, plus both uncompressed ones (pynetdicom converts between those two).
    offered = [syntax] + [s for s in UNCOMPRESSED if s != syntax]
    # its own SOP class (for a SEG, both SEG classes: LABELMAP's and BINARY's)
    for sop_class in dict.fromkeys([dataset.SOPClassUID, *SEG_STORAGE.values()]):
        ae.add_requested_context(sop_class, offered)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "could not be reached"
        raise RetryableDelivery(f"{node.name}: {node.ae_title}@{node.host}:{node.port} {why}")
    note = None
    try:
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
        if (dataset.SOPClassUID == SEG_STORAGE[SegType.LABELMAP] and dataset.SOPClassUID not in accepted
                and fallback is not None and SEG_STORAGE[SegType.BINARY] in accepted):
            dataset = pydicom.dcmread(fallback)
            note = (f"{node.name}: refused Label Map Segmentation Storage at association; the BINARY SEG of the same "
                    "result was sent instead")
            log.warning("destination %s", note)
        answer = assoc.send_c_store(dataset)
    except ValueError as err:  # no accepted presentation context for this SOP class / transfer syntax
        raise RejectedDelivery(f"{node.name}: no accepted presentation context for the object ({err})") from None
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(answer, "Status", None) if answer is not None else None
    if code is None:
        raise RetryableDelivery(f"{node.name}: no C-STORE response (association aborted or timed out)")
    code = int(code)
    if status.stored(code):
        if status.category(code) is Category.WARNING:
            warning = f"{node.name}: stored with warning {status.describe(code)}"
            log.warning("destination %s", warning)
            return "; ".join(w for w in (note, warning) if w)
        return note
    if status.transient(code):
        raise RetryableDelivery(f"{node.name}: C-STORE answered {status.describe(code)}")
    raise RejectedDelivery(f"{node.name}: C-STORE answered {status.describe(code)}")


def echo(node: DimseNode, calling_ae_title: str) -> bool:
    """C-ECHO: does the peer answer at all (a cheap probe while its deliveries are held back)."""
    from pynetdicom.sop_class import Verification

    ae = application_entity(node.calling_ae_title or calling_ae_title, min(node.timeout_s, 10.0))
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        return False
    try:
        answer = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    return answer is not None and "Status" in answer and status.category(int(answer.Status)) is Category.SUCCESS


def _scp_role(sop_class: str) -> SCP_SCU_RoleSelectionNegotiation:
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = sop_class
    role.scu_role = False
    role.scp_role = True
    return role


def retrieve(node: DimseNode, study_uid: str, series_uid: str, target: Path, calling_ae_title: str) -> int:
    """C-GET of one series: the source stores each instance to us over the same association, each durable on disk
    before its success goes back. A retrieval with failed sub-operations is refused whole (never a partial job)."""
    ae = application_entity(node.calling_ae_title or calling_ae_title, node.timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class in CT_IMAGE_STORAGE:
        ae.add_requested_context(sop_class, list(READABLE_TRANSFER_SYNTAXES))
        roles.append(_scp_role(sop_class))
    received = [0]
    write_error: list[OSError] = []

    def on_store(event: evt.Event) -> int:
        try:
            durable.write_bytes(target / f"{received[0] + 1:06d}.dcm", event.encoded_dataset())
        except OSError as err:
            write_error.append(err)
            return StoreStatus.OUT_OF_RESOURCES
        received[0] += 1
        return StoreStatus.SUCCESS

    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "cannot be reached"
        raise SourceUnavailable(f"source {node.name!r} ({node.ae_title}@{node.host}:{node.port}) {why}")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    final: Dataset | None = None
    try:
        for answer, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if answer is not None and "Status" in answer:
                final = answer
    finally:
        if assoc.is_established:
            assoc.release()
    if write_error and storage_full(write_error[0]):
        raise write_error[0]
    if final is None:
        raise SourceUnavailable(f"source {node.name!r} did not answer the C-GET")
    code = int(final.Status)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    kind = status.category(code)
    if kind is Category.PENDING:
        raise SourceUnavailable(f"source {node.name!r} ended the C-GET without a final status")
    if failed or kind in (Category.WARNING, Category.CANCEL):
        raise SourceUnavailable(
            f"source {node.name!r} sent {received[0]} instance(s) of series {series_uid} but {failed or 'some'} "
            f"failed ({status.describe(code, Service.GET)}); a partial series is not run: check the source's log "
            "(instances of a class or transfer syntax ctseg does not accept?) and pull again")
    if kind is Category.FAILURE:
        if received[0] == 0:
            raise SeriesNotFound(f"series {series_uid} of study {study_uid} is not on source {node.name!r} "
                                 f"(C-GET: {status.describe(code, Service.GET)})")
        raise SourceUnavailable(f"source {node.name!r} ended the C-GET with {status.describe(code, Service.GET)}")
    return received[0]
