"""The DICOM node: a C-STORE SCP (pynetdicom) that receives CT series, and the loop that hands complete ones on.

Accepted: Verification (C-ECHO) and the CT image classes the reader reads (server/imaging/sop.py), in every
transfer syntax it decodes, so a PACS need not transcode. Every other storage class is accepted too and its
instances dropped with success (a study forwarded with an SR, a presentation state or a dose report beside the CT
would otherwise have those contexts refused, and a sender that aborts on that leaves the CT series cut off). The
called AE title must be ours; calling AE titles can be limited (``CTSEG_DICOM_ALLOWED_AE_TITLES``), and others are
rejected at association.

A data set is written to disk by pynetdicom as it arrives (never held in memory), at most
``CTSEG_DICOM_MAX_INSTANCE_MB`` of it: a larger one is refused (``StoreStatus.INSTANCE_TOO_LARGE``). Only its header
is read; the file is moved into the arrival store, fsynced, and recorded with the association that brought it
before its success status goes back (server/dicomnode/arrivals.py); a full disk or a database that cannot be
written answers Out of Resources, so the sender keeps the instance and retries.

A SEG goes back to the sender (a DIMSE destination) only when the association's calling AE title *and* its peer
address are that destination's: the AE title alone is whatever the caller declares.

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
import tempfile
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom.sop_class import Verification

from server.core.errors import InputError, storage_full
from server.core.metrics import Metrics
from server.core.nodes import DimseNode, Route, normal_address, resolve_addresses
from server.core.settings import Settings
from server.core.sqlite import StoreBusy
from server.dicomnode.arrivals import ArrivalStore, ArrivedSeries, InstanceHeader
from server.imaging.dicom_reader import read_header
from server.imaging.sop import CT_IMAGE_STORAGE, READABLE_TRANSFER_SYNTAXES
from server.pacs.status import StoreStatus

log = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_PDU = 1 << 20  # what senders are told to send per PDU: each one is held whole while it is read
RERESOLVE_S = 60.0  # a destination's host name is looked up again at most this often (a peer it moved to)
RECEIVING_IDLE_S = 600.0  # a file in receiving/ not written to for this long was left by a cut-off association

DueFn = Callable[[ArrivedSeries, Route | None], None]
CutOffFn = Callable[[ArrivedSeries], None]


def _valid_uid(value: Any) -> str | None:
    text = str(value or "").strip()
    return text if len(text) <= 64 and UID_PATTERN.match(text) else None


# ---------------------------------------------------------------------------------------------- receiving to disk
# pynetdicom's switch for writing received C-STORE data sets to a file (``_config.STORE_RECV_CHUNKED_DATASET``) is
# process-wide, and the file goes where ``tempfile`` puts it. ctseg's C-GET (server/pacs/dimse.py) reads what it
# receives from memory, so the switch is true only in the threads of a listener's associations, and their files go
# to that listener's ``receiving/`` folder (the arrival store's file system), capped.
_RECEIVERS: weakref.WeakKeyDictionary[AE, tuple[Path, int]] = weakref.WeakKeyDictionary()


def _receiver() -> tuple[Path, int] | None:
    """(folder, cap) of the listener whose association this thread serves (a DUL or association thread)."""
    thread = threading.current_thread()
    owner = getattr(thread, "assoc", thread)
    ae = getattr(owner, "ae", None)
    return _RECEIVERS.get(ae) if ae is not None else None


class _ListenerThreadsOnly:
    def __bool__(self) -> bool:
        return _receiver() is not None


_UNWRITTEN: dict[str, OSError] = {}  # received files a write failed for (a full disk): refused Out of Resources


class _CappedFile:
    """The file a data set arrives in: past ``cap`` bytes nothing more is written, so one instance cannot fill the
    disk (the handler refuses a file longer than the cap). A write that fails (a full disk) is remembered for the
    handler rather than raised into pynetdicom's reader, so the sender gets Out of Resources, not an abort."""

    def __init__(self, inner: Any, name: str, cap: int) -> None:
        self._inner, self._name, self._room = inner, name, cap + 1

    @property
    def name(self) -> str:
        return self._name

    @property
    def file(self) -> _CappedFile:
        return self  # pynetdicom flushes ``.file`` after each write

    def _failed(self, err: OSError) -> None:
        _UNWRITTEN.setdefault(self._name, err)
        self._room = 0

    def write(self, data: bytes) -> int:
        if self._room > 0 and self._inner is not None:
            try:
                self._inner.write(data[: self._room])
            except OSError as err:
                self._failed(err)
            self._room -= min(len(data), self._room)
        return len(data)

    def flush(self) -> None:
        if self._inner is not None and self._name not in _UNWRITTEN:
            try:
                self._inner.flush()
            except OSError as err:
                self._failed(err)

    def close(self) -> None:
        if self._inner is not None:
            try:
                self._inner.close()
            except OSError as err:
                self._failed(err)


def _received_file(*args: Any, **kwargs: Any) -> Any:
    receiver = _receiver()
    if receiver is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # pynetdicom closes it
    folder, cap = receiver
    try:
        inner = tempfile.NamedTemporaryFile(*args, **{**kwargs, "dir": folder})  # noqa: SIM115 - pynetdicom closes it
    except OSError as err:
        unwritten = _CappedFile(None, str(folder / f"unwritten-{uuid.uuid4().hex}.dcm"), cap)
        unwritten._failed(err)
        return unwritten
    return _CappedFile(inner, inner.name, cap)


def _receive_to_disk(ae: AE, folder: Path, cap: int) -> None:
    _RECEIVERS[ae] = (folder, cap)
    _config.STORE_RECV_CHUNKED_DATASET = _ListenerThreadsOnly()  # type: ignore[assignment]
    dimse_messages.NamedTemporaryFile = _received_file  # type: ignore[attr-defined]


class Senders:
    """Which DIMSE destination an association comes from: its calling AE title and its peer address must both be the
    destination's. Host names are resolved at start (and again on a mismatch, at most every ``RERESOLVE_S``), so
    a peer is judged by its address, never by a name."""

    def __init__(self, destinations: list[Any]) -> None:
        self.nodes = [d for d in destinations if isinstance(d, DimseNode)]
        self._addresses: dict[str, frozenset[str]] = {}
        self._resolved = 0.0
        self._resolve()

    def _resolve(self) -> None:
        self._addresses = {n.name: resolve_addresses(n.host) for n in self.nodes}
        self._resolved = time.monotonic()
        for name, addresses in self._addresses.items():
            if not addresses:
                log.warning("destination %r: its host does not resolve; no SEG goes back to it as sender", name)

    def match(self, calling_ae_title: str, peer: str) -> tuple[str | None, list[str]]:
        """(the destination it is, or None; the destinations whose AE title it only claims)."""
        claimed = [n for n in self.nodes if n.ae_title == calling_ae_title]
        if not claimed:
            return None, []
        address = normal_address(peer)
        for again in (False, True):
            if again:
                if time.monotonic() - self._resolved < RERESOLVE_S:
                    break
                self._resolve()
            for node in claimed:
                if address in self._addresses.get(node.name, frozenset()):
                    return node.name, []
        return None, [n.name for n in claimed]


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
        self._senders: dict[int, str | None] = {}  # association -> the destination it verifiably comes from
        self._dropped: dict[int, Counter[str]] = {}  # association -> instances dropped per SOP class name
        self._ct_classes = frozenset(str(c) for c in CT_IMAGE_STORAGE)
        self._max_bytes = settings.dicom_max_instance_mb * 2**20
        self._verify = Senders(settings.destinations)
        self._swept = 0.0
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
        ae.maximum_pdu_size = MAX_PDU
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for sop_class in CT_IMAGE_STORAGE:
            ae.add_supported_context(sop_class, list(READABLE_TRANSFER_SYNTAXES))
        for context in StoragePresentationContexts:  # the rest: accepted, and their instances dropped
            if context.abstract_syntax not in self._ct_classes:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        _receive_to_disk(ae, self.arrivals.receiving, self._max_bytes)
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
        if not s.dicom_allowed_ae_titles and self._verify.nodes:
            log.warning("the DICOM listener accepts any calling AE title while DIMSE destinations are configured: "
                        "whoever reaches port %d has series run and their SEGs sent to the default destinations; "
                        "set CTSEG_DICOM_ALLOWED_AE_TITLES (CTSEG_DICOM_ALLOW_ANY_AE=false makes this a start-up "
                        "error)", s.dicom_port)

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
            calling = self._calling(event)
            sender = self._sender(event, calling)
            known = self.arrivals.open_association(calling)
            with self._lock:
                self._senders.setdefault(key, sender)
                known = self._assoc_ids.setdefault(key, known)
        return known

    def _sender(self, event: evt.Event, calling: str) -> str | None:
        try:
            peer = str(event.assoc.requestor.address)
        except ValueError:
            peer = ""
        sender, claimed = self._verify.match(calling, peer)
        if claimed:
            log.warning("DICOM association with the calling AE title of destination(s) %s from %s, which is not their "
                        "address: no SEG goes back to it", ", ".join(map(repr, claimed)), peer or "an unknown address")
        return sender

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
            self._senders.pop(key, None)
            dropped = self._dropped.pop(key, None)
        if dropped:
            log.info("DICOM association from %r: dropped %s (not CT images, not run)", self._calling(event),
                     ", ".join(f"{n} {name}" for name, n in sorted(dropped.items())))
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

    def _received(self, event: evt.Event) -> Path:
        """The file pynetdicom wrote the data set to (a data set it kept in memory is written to one)."""
        try:
            path = event.dataset_path
        except AttributeError:
            path = None
        if isinstance(path, Path):
            return path
        with tempfile.NamedTemporaryFile(dir=self.arrivals.receiving, suffix=".dcm", delete=False) as f:
            f.write(event.encoded_dataset())
        return Path(f.name)

    def _refuse(self, event: evt.Event) -> None:
        with self._lock:
            self._refused.add(id(event.assoc))

    def _on_store(self, event: evt.Event) -> int:
        sop_class = str(event.context.abstract_syntax)
        if sop_class not in self._ct_classes:  # an SR, a presentation state, a dose report... beside the CT
            with self._lock:
                self._dropped.setdefault(id(event.assoc), Counter())[UID(sop_class).name] += 1
            return StoreStatus.SUCCESS
        try:
            received = self._received(event)
            unwritten = _UNWRITTEN.pop(str(received), None)
            if unwritten is not None:
                raise unwritten
            size = received.stat().st_size
        except OSError as err:
            why = "the storage is full" if storage_full(err) else f"cannot write it ({type(err).__name__})"
            log.error("C-STORE answered Out of Resources: the received data set could not be written: %s", why)
            self._refuse(event)
            return StoreStatus.OUT_OF_RESOURCES
        if size > self._max_bytes:
            log.warning("C-STORE refused (0x%04X): an instance over CTSEG_DICOM_MAX_INSTANCE_MB (%d MB)",
                        StoreStatus.INSTANCE_TOO_LARGE, self.settings.dicom_max_instance_mb)
            self._refuse(event)
            return StoreStatus.INSTANCE_TOO_LARGE
        try:
            ds = read_header(received, self.settings.dicom_bounds())  # bounded: a deflate bomb is not inflated
            study, series = _valid_uid(ds.get("StudyInstanceUID")), _valid_uid(ds.get("SeriesInstanceUID"))
            sop = _valid_uid(event.request.AffectedSOPInstanceUID)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            modality, description = str(ds.get("Modality", "") or ""), str(ds.get("SeriesDescription", "") or "")
        except InputError as err:  # not DICOM, damaged, or declaring more than the bounds (CTSEG_DICOM_MAX_*)
            log.warning("C-STORE refused: %s", err)
            return StoreStatus.CANNOT_UNDERSTAND
        except Exception as err:  # an undecodable data set
            log.warning("C-STORE refused: the data set cannot be read (%s)", type(err).__name__)
            return StoreStatus.CANNOT_UNDERSTAND
        if not (study and series and sop):
            log.warning("C-STORE refused: Study, Series or SOP Instance UID missing or malformed")
            return StoreStatus.CANNOT_UNDERSTAND
        header = InstanceHeader(series, study, sop, modality, description, frames)
        try:
            assoc_id = self._assoc_id(event)
            with self._lock:
                sender = self._senders.get(id(event.assoc))
            self.arrivals.store_instance(assoc_id, self._calling(event), header, received, sender)
        except (OSError, sqlite3.Error, StoreBusy) as err:
            why = "the storage is full" if storage_full(err) else f"cannot store it ({type(err).__name__})"
            log.error("C-STORE answered Out of Resources: %s", why)
            self._refuse(event)
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
        if now - self._swept > RECEIVING_IDLE_S / 10:
            self._swept = now
            self.arrivals.sweep_receiving(now - RECEIVING_IDLE_S)
        for reason, n in waiting.items():
            self.metrics.dicom_waiting.labels(reason).set(n)
