"""Pull a series by UID from a configured source: WADO-RS (dicomweb-client) or C-GET (pynetdicom).

Instances are written to the job's input folder one by one as they stream in (never a whole series in memory),
in the transfer syntax the source stores them in, since the reader decodes the compressed ones. A series the
source does not have is :class:`SeriesNotFound` (404 to the client); a source that cannot be reached or fails is
:class:`SourceUnavailable` (502), both naming what they are about.
"""

from __future__ import annotations

import logging
from pathlib import Path

import requests
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from server.dicom_listener import ACCEPTED_TRANSFER_SYNTAXES, IMAGE_SOP_CLASSES
from server.errors import BadGateway, NotFound
from server.incoming import fsync_write
from server.nodes import DicomWebNode, DimseNode, Node
from server.senders import dicomweb_client, dimse_ae

log = logging.getLogger(__name__)


class SeriesNotFound(NotFound):
    pass


class SourceUnavailable(BadGateway):
    pass


def _not_found(node: Node, study_uid: str, series_uid: str) -> SeriesNotFound:
    return SeriesNotFound(f"series {series_uid} of study {study_uid} is not on source {node.name!r}")


def retrieve(node: Node, study_uid: str, series_uid: str, target: Path, calling_ae_title: str) -> int:
    """Write the series' instances to ``target``; returns how many."""
    target.mkdir(parents=True, exist_ok=True)
    if isinstance(node, DicomWebNode):
        count = _wado(node, study_uid, series_uid, target)
    else:
        count = _cget(node, study_uid, series_uid, target, calling_ae_title)
    if count == 0:
        raise _not_found(node, study_uid, series_uid)
    log.info("pulled %d instance(s) from %s", count, node.name)
    return count


def _wado(node: DicomWebNode, study_uid: str, series_uid: str, target: Path) -> int:
    count = 0
    try:
        # "*": the stored transfer syntax, no transcoding by the source (the reader decodes what it sends).
        for dataset in dicomweb_client(node).iter_series(study_uid, series_uid,
                                                         media_types=(("application/dicom", "*"),)):
            count += 1
            dataset.save_as(target / f"{count:06d}.dcm", enforce_file_format=True)
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 404:
            raise _not_found(node, study_uid, series_uid) from None
        raise SourceUnavailable(f"source {node.name!r} answered HTTP {status} to the retrieval") from None
    except requests.RequestException as err:
        raise SourceUnavailable(f"source {node.name!r} cannot be reached at {node.url} ({type(err).__name__})") from None
    return count


def _cget(node: DimseNode, study_uid: str, series_uid: str, target: Path, calling_ae_title: str) -> int:
    ae = dimse_ae(node.calling_ae_title or calling_ae_title, node.timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class in IMAGE_SOP_CLASSES:  # C-GET: the peer stores to us over the same association
        ae.add_requested_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        roles.append(_scp_role(sop_class))
    received: list[int] = [0]

    def on_store(event: evt.Event) -> int:
        received[0] += 1
        fsync_write(target / f"{received[0]:06d}.dcm", event.encoded_dataset())
        return 0x0000

    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "cannot be reached"
        raise SourceUnavailable(f"source {node.name!r} ({node.ae_title}@{node.host}:{node.port}) {why}")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    final = None
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status:
                final = int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise SourceUnavailable(f"source {node.name!r} did not answer the C-GET")
    if final not in (0x0000, 0xB000) and not (0xFF00 <= final <= 0xFF01):
        if received[0] == 0 and final in (0xA701, 0xA702, 0xA900, 0xC000):
            raise _not_found(node, study_uid, series_uid)
        raise SourceUnavailable(f"source {node.name!r} ended the C-GET with status 0x{final:04X}")
    return received[0]


def _scp_role(sop_class: str):  # type: ignore[no-untyped-def]
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = sop_class
    role.scu_role = False
    role.scp_role = True
    return role
