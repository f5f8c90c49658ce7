"""The DICOM node: a C-STORE SCP (pynetdicom) that receives CT series, and the router that starts their jobs.

Accepted: Verification (C-ECHO), CT Image Storage and Enhanced CT Image Storage, in every transfer syntax the
reader decodes, so a PACS need not transcode. The called AE title must be ours; calling AE titles can be limited
(``CTSEG_DICOM_ALLOWED_AE_TITLES``), and others are rejected at association. An instance is on disk, fsynced,
before its success status goes back (server/incoming.py).

A series is complete once nothing has arrived for ``dicom_stable_seconds`` and no open association is carrying
it. It is then routed (``CTSEG_ROUTES``; the first rule that matches its modality, description and slice count)
to a job, or dropped with a log line. A series that an aborted association carried (the sender died or cut the
connection) is not run, unless a later association that ended cleanly carried it again; the refusal is a failed
job on ``GET /v1/segmentations``, so it is seen.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification

from server.incoming import IncomingSeries, IncomingStore
from server.metrics import Metrics
from server.nodes import Route
from server.settings import Settings

log = logging.getLogger(__name__)

IMAGE_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
# What server/dicom_input.py decodes (pydicom + pylibjpeg's openjpeg, libjpeg and rle plugins).
ACCEPTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1, JPEGLossless,
    JPEGBaseline8Bit, JPEGExtended12Bit, RLELossless,
)
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000

RouteFn = Callable[[IncomingSeries, Route | None], None]


def _valid_uid(value: Any) -> str | None:
    text = str(value or "").strip()
    return text if len(text) <= 64 and UID_PATTERN.match(text) else None


class DicomListener:
    """The C-STORE SCP and the routing of completed series."""

    def __init__(self, settings: Settings, incoming: IncomingStore, metrics: Metrics, route: RouteFn) -> None:
        self.settings = settings
        self.incoming = incoming
        self.metrics = metrics
        self.route = route
        self._server: Any = None
        self._lock = threading.Lock()
        self._open: dict[int, set[str]] = {}  # association -> series it carried
        self._released: set[int] = set()
        self._stopping = threading.Event()
        self._router: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        s = self.settings
        ae = AE(ae_title=s.dicom_ae_title)
        ae.require_called_aet = True
        if s.dicom_allowed_ae_titles:
            ae.require_calling_aet = list(s.dicom_allowed_ae_titles)
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for sop_class in IMAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        handlers = [
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        host = s.dicom_host or s.host
        self._server = ae.start_server((host, s.dicom_port), block=False, evt_handlers=handlers)
        self._router = threading.Thread(target=self._route_loop, name="ctseg-dicom-router", daemon=True)
        self._router.start()
        log.info("DICOM listener %s on %s:%d (%s)", s.dicom_ae_title, host, s.dicom_port,
                 "calling AE titles " + ", ".join(s.dicom_allowed_ae_titles) if s.dicom_allowed_ae_titles
                 else "any calling AE title")

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
        if self._router is not None:
            self._router.join(timeout=10.0)

    # ------------------------------------------------------------------------------------------------ events
    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._open[id(event.assoc)] = set()
        self.metrics.dicom_associations.labels("accepted").inc()

    def _on_rejected(self, event: evt.Event) -> None:
        self.metrics.dicom_associations.labels("rejected").inc()
        log.warning("DICOM association from calling AE %r rejected", event.assoc.requestor.ae_title)

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            self._released.add(id(event.assoc))
        self.metrics.dicom_associations.labels("released").inc()

    def _on_aborted(self, event: evt.Event) -> None:
        self.metrics.dicom_associations.labels("aborted").inc()

    def _on_closed(self, event: evt.Event) -> None:
        key = id(event.assoc)
        with self._lock:
            carried = self._open.pop(key, set())
            released = key in self._released
            self._released.discard(key)
        if not carried:
            return
        if released:
            self.incoming.clear_aborted(carried)
        else:  # the sender vanished (killed, network cut, A-ABORT) in the middle of an association
            self.incoming.mark_aborted(carried)
            log.warning("DICOM association from %r ended without release after carrying %d series; they will not "
                        "be run unless sent again", event.assoc.requestor.ae_title, len(carried))

    def _on_store(self, event: evt.Event) -> int:
        try:
            ds = event.dataset
            study, series = _valid_uid(ds.get("StudyInstanceUID")), _valid_uid(ds.get("SeriesInstanceUID"))
            sop = _valid_uid(event.request.AffectedSOPInstanceUID)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            modality, description = str(ds.get("Modality", "") or ""), str(ds.get("SeriesDescription", "") or "")
        except Exception as err:  # an undecodable data set
            log.warning("C-STORE refused: the data set cannot be read (%s)", type(err).__name__)
            return CANNOT_UNDERSTAND
        if not (study and series and sop):
            log.warning("C-STORE refused: Study, Series or SOP Instance UID missing or malformed")
            return CANNOT_UNDERSTAND
        calling = event.assoc.requestor.ae_title.strip() if isinstance(event.assoc.requestor.ae_title, str) else ""
        item = IncomingSeries(series, study, calling, modality, description, 1, frames, 0.0, 0.0, False)
        try:
            self.incoming.store_instance(item, sop, event.encoded_dataset())
        except OSError as err:
            log.error("C-STORE refused: cannot write the instance (%s)", err.strerror or type(err).__name__)
            return OUT_OF_RESOURCES
        with self._lock:
            self._open.setdefault(id(event.assoc), set()).add(series)
        self.metrics.dicom_instances.inc()
        return SUCCESS

    # ------------------------------------------------------------------------------------------------ routing
    def busy_series(self) -> set[str]:
        with self._lock:
            return set().union(*self._open.values()) if self._open else set()

    def _route_loop(self) -> None:
        every = min(1.0, self.settings.dicom_stable_seconds / 4)
        while not self._stopping.wait(every):
            try:
                self.route_stable()
            except Exception:  # the next round tries again; nothing is removed before it is handled
                log.exception("routing received series failed")

    def route_stable(self) -> None:
        cutoff = time.time() - self.settings.dicom_stable_seconds
        busy = self.busy_series()
        for series in self.incoming.quiet_since(cutoff):
            if series.series_uid in busy or self._stopping.is_set():
                continue
            rule = None if series.aborted else next(
                (r for r in self.settings.routes if r.matches(series.modality, series.description, series.frames)), None)
            self.route(series, rule)
