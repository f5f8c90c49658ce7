"""The DICOM node: a C-STORE SCP (pynetdicom) that receives CT series, and the loop that hands complete ones on.

Accepted: Verification (C-ECHO) and the CT image classes the reader reads (server/imaging/sop.py), in every
transfer syntax it decodes, so a PACS need not transcode. The called AE title must be ours; calling AE titles can
be limited (``CTSEG_DICOM_ALLOWED_AE_TITLES``), and others are rejected at association. An instance is on disk,
fsynced, and recorded with the association that brought it before its success status goes back
(server/dicomnode/arrivals.py); a full disk or a database that cannot be written answers Out of Resources, so the
sender keeps the instance and retries.

A series is due once nothing has arrived for ``dicom_stable_seconds`` and no open association carries it. A
complete one is routed (``CTSEG_ROUTES``, the first rule that matches its modality, description and slice count):
``on_due(series, rule)`` makes a job of it, or it is skipped (no rule). One cut off by an aborted association
waits to be sent again; after ``dicom_incomplete_hold_minutes`` ``on_cut_off(series)`` records why it was not run.
Stopping the listener aborts the associations still running (their senders retry) and records them as aborted.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from server.core.errors import storage_full
from server.core.metrics import Metrics
from server.core.nodes import Route
from server.core.settings import Settings
from server.core.sqlite import StoreBusy
from server.dicomnode.arrivals import ArrivalStore, ArrivedSeries, InstanceHeader
from server.imaging.sop import CT_IMAGE_STORAGE, READABLE_TRANSFER_SYNTAXES
from server.pacs.status import StoreStatus

log = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")

DueFn = Callable[[ArrivedSeries, Route | None], None]
CutOffFn = Callable[[ArrivedSeries], None]


def _valid_uid(value: Any) -> str | None:
    text = str(value or "").strip()
    return text if len(text) <= 64 and UID_PATTERN.match(text) else None


class DicomListener:
    """The C-STORE SCP and the hand-over of due series."""

    def __init__(self, settings: Settings, arrivals: ArrivalStore, metrics: Metrics, on_due: DueFn,
                 on_cut_off: CutOffFn) -> None:
        self.settings = settings
        self.arrivals = arrivals
        self.metrics = metrics
        self.on_due, self.on_cut_off = on_due, on_cut_off
        self._server: Any = None
        self._lock = threading.Lock()
        self._assoc_ids: dict[int, str] = {}  # pynetdicom association -> its row in the arrival store
        self._released: set[int] = set()
        self._refused: set[int] = set()  # associations with a C-STORE answered Out of Resources
        self._told_waiting: set[str] = set()
        self._stopping = threading.Event()
        self._router: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cut = self.arrivals.abort_open_associations()  # open at the last stop or crash: cut off
        if cut:
            log.warning("%d DICOM association(s) were open when the service last stopped; what they carried waits "
                        "to be sent again", cut)
        s = self.settings
        ae = AE(ae_title=s.dicom_ae_title)
        ae.require_called_aet = True
        if s.dicom_allowed_ae_titles:
            ae.require_calling_aet = list(s.dicom_allowed_ae_titles)
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for sop_class in CT_IMAGE_STORAGE:
            ae.add_supported_context(sop_class, list(READABLE_TRANSFER_SYNTAXES))
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
        """No new association; running ones aborted (their senders retry) and recorded as aborted."""
        self._stopping.set()
        if self._server is not None:
            running = list(self._server.active_associations)
            self._server.shutdown()
            for assoc in running:
                assoc.abort()
            for assoc in running:
                assoc.join(timeout=5.0)  # its EVT_CONN_CLOSE records it
            if running:
                log.warning("stopped: %d running DICOM association(s) aborted; their senders retry", len(running))
        self.arrivals.abort_open_associations()
        if self._router is not None:
            self._router.join(timeout=10.0)

    # ------------------------------------------------------------------------------------------------ events
    def _calling(self, event: evt.Event) -> str:
        title = event.assoc.requestor.ae_title
        return title.strip() if isinstance(title, str) else ""

    def _assoc_id(self, event: evt.Event) -> str:
        key = id(event.assoc)
        with self._lock:
            known = self._assoc_ids.get(key)
        if known is None:
            known = self.arrivals.open_association(self._calling(event))
            with self._lock:
                known = self._assoc_ids.setdefault(key, known)
        return known

    def _on_accepted(self, event: evt.Event) -> None:
        self.metrics.dicom_associations.labels("accepted").inc()
        try:
            self._assoc_id(event)
        except Exception:  # recorded at its first C-STORE instead
            log.exception("cannot record a DICOM association")

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
            assoc_id = self._assoc_ids.pop(key, None)
            refused = key in self._refused
            released = key in self._released and not refused  # a refused instance is a gap, like an abort
            self._released.discard(key)
            self._refused.discard(key)
        if assoc_id is None:
            return
        try:
            carried = self.arrivals.close_association(assoc_id, released)
        except Exception:  # it stays open in the store: the next start counts it aborted
            log.exception("cannot record the end of a DICOM association")
            return
        if carried and refused:
            log.warning("DICOM association from %r had instance(s) refused (Out of Resources); the %d series it "
                        "carried wait to be sent again complete", self._calling(event), len(carried))
        elif carried and not released:  # the sender vanished (killed, network cut, A-ABORT) mid-association
            log.warning("DICOM association from %r ended without release after carrying %d series; they wait to be "
                        "sent again complete", self._calling(event), len(carried))

    def _on_store(self, event: evt.Event) -> int:
        try:
            ds = event.dataset
            study, series = _valid_uid(ds.get("StudyInstanceUID")), _valid_uid(ds.get("SeriesInstanceUID"))
            sop = _valid_uid(event.request.AffectedSOPInstanceUID)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            modality, description = str(ds.get("Modality", "") or ""), str(ds.get("SeriesDescription", "") or "")
        except Exception as err:  # an undecodable data set
            log.warning("C-STORE refused: the data set cannot be read (%s)", type(err).__name__)
            return StoreStatus.CANNOT_UNDERSTAND
        if not (study and series and sop):
            log.warning("C-STORE refused: Study, Series or SOP Instance UID missing or malformed")
            return StoreStatus.CANNOT_UNDERSTAND
        header = InstanceHeader(series, study, sop, modality, description, frames)
        try:
            self.arrivals.store_instance(self._assoc_id(event), self._calling(event), header, event.encoded_dataset())
        except (OSError, sqlite3.Error, StoreBusy) as err:
            why = "the storage is full" if storage_full(err) else f"cannot store it ({type(err).__name__})"
            log.error("C-STORE answered Out of Resources: %s", why)
            with self._lock:
                self._refused.add(id(event.assoc))
            return StoreStatus.OUT_OF_RESOURCES
        self.metrics.dicom_instances.inc()
        return StoreStatus.SUCCESS

    # ------------------------------------------------------------------------------------------------ hand-over
    def _route_loop(self) -> None:
        every = min(1.0, self.settings.dicom_stable_seconds / 4)
        while not self._stopping.wait(every):
            try:
                self.route_due()
            except Exception:  # the next round tries again; nothing is removed before it is handled
                log.exception("routing received series failed")

    def route_due(self) -> None:
        s = self.settings
        now = time.time()
        waiting = {"receiving": 0, "incomplete": 0}
        for series in self.arrivals.due(now - s.dicom_stable_seconds):
            if self._stopping.is_set():
                return
            if series.busy:
                waiting["receiving"] += 1
                continue
            if not series.complete:
                if series.last_received > now - s.dicom_incomplete_hold_minutes * 60:
                    waiting["incomplete"] += 1
                    if series.series_uid not in self._told_waiting:
                        self._told_waiting.add(series.series_uid)
                        log.warning("a %s series of %d instance(s) from %s was cut off by an aborted association; it "
                                    "waits to be sent again complete", series.modality or "?", series.instances,
                                    series.calling_ae_title)
                    continue
                self.metrics.dicom_series.labels("incomplete").inc()
                self.on_cut_off(series)
                continue
            self._told_waiting.discard(series.series_uid)
            rule = next((r for r in s.routes if r.matches(series.modality, series.description, series.frames)), None)
            self.on_due(series, rule)
        for stale, seen in self.arrivals.stale(now - s.dicom_reassembly_minutes * 60):
            self.arrivals.drop(stale, seen)
        for reason, n in waiting.items():
            self.metrics.dicom_waiting.labels(reason).set(n)
