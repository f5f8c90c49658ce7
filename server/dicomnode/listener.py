"""The DICOM node: a C-STORE SCP (pynetdicom) that receives CT series, and the loop that hands complete ones on.

Accepted: Verification (C-ECHO) and the CT image classes the reader reads (server/imaging/sop.py), in every
transfer syntax it decodes, so a PACS need not transcode. Every other storage class is accepted too and its
instances dropped with success (a study forwarded with an SR, a presentation state or a dose report beside the CT
would otherwise have those contexts refused, and a sender that aborts on that leaves the CT series cut off). The
called AE title must be ours; calling AE titles (``CTSEG_DICOM_ALLOWED_AE_TITLES``) and peer addresses
(``CTSEG_DICOM_ALLOWED_PEERS``) can be limited, and others are rejected at association.

A data set is written to disk by pynetdicom as it arrives (never held in memory), at most
``CTSEG_DICOM_MAX_INSTANCE_MB`` of it: past that its association is aborted (a capped file would otherwise stop
changing and be swept while the peer still sends). Everything else a peer sends is held in memory by pynetdicom, so
it is bounded per association (``_Budget``): a PDU over what senders are offered, a command set over
``MAX_COMMAND``, data sets of other messages (C-FIND identifiers...) over ``MAX_OTHER_DATA``: aborted. Only its header
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

import ipaddress
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
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom
import sqlalchemy as sa
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import Verification

from server.core.database import StoreBusy
from server.core.errors import InputError, storage_full
from server.core.metrics import Metrics
from server.core.nodes import DimseNode, Route, normal_address, resolve_addresses
from server.core.settings import Settings
from server.dicomnode.arrivals import ArrivalStore, ArrivedSeries, InstanceHeader
from server.imaging.dicom_reader import read_header
from server.imaging.sop import CT_IMAGE_STORAGE, READABLE_TRANSFER_SYNTAXES
from server.pacs.status import StoreStatus

log = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_PDU = 1 << 20  # what senders are told to send per PDU: each one is held whole while it is read
RERESOLVE_S = 60.0  # a destination's host name is looked up again at most this often (a peer it moved to)
UNRESOLVED_RETRY_S = 2.0  # a destination whose host did not resolve: tried again this often
RECEIVING_IDLE_S = 600.0  # a file in receiving/ not written to for this long was left by a cut-off association
MAX_RECV_PDU = MAX_PDU + (64 << 10)  # a PDU longer than this is not read (pynetdicom reads each one whole)
MAX_COMMAND = 64 << 10  # command set bytes of one DIMSE message (a real one is a few hundred)
MAX_OTHER_DATA = 1 << 20  # data set bytes of messages other than a C-STORE (only C-ECHO is served: none is needed)
C_STORE_RQ = 0x0001
PYNETDICOM_TESTED = ((3, 0), (3, 1))  # [from, to): the receive-to-disk patch below is written for these releases

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


class UnsupportedPynetdicom(RuntimeError):
    """The installed pynetdicom is not one the listener's receive-to-disk was written for."""


def check_pynetdicom() -> None:
    """The receive-to-disk patch relies on two pynetdicom internals: if a release renamed them, instances would be
    held whole in memory or written uncapped to the default temp folder, silently; refuse to start instead."""
    version = tuple(int(p) for p in re.findall(r"\d+", pynetdicom.__version__)[:2])
    (low, high) = PYNETDICOM_TESTED
    missing = [name for name, there in (
        ("pynetdicom.dimse_messages.NamedTemporaryFile", hasattr(dimse_messages, "NamedTemporaryFile")),
        ("pynetdicom._config.STORE_RECV_CHUNKED_DATASET", hasattr(_config, "STORE_RECV_CHUNKED_DATASET")),
    ) if not there]
    if missing or not low <= version < high:
        raise UnsupportedPynetdicom(
            f"the DICOM listener cannot receive to disk with pynetdicom {pynetdicom.__version__} (written for "
            f">={low[0]}.{low[1]},<{high[0]}.{high[1]}; missing: {', '.join(missing) or 'none'}): install a pynetdicom "
            "of that range (pyproject.toml) or unset CTSEG_DICOM_PORT")


def _receive_to_disk(ae: AE, folder: Path, cap: int) -> None:
    check_pynetdicom()
    _RECEIVERS[ae] = (folder, cap)
    _config.STORE_RECV_CHUNKED_DATASET = _ListenerThreadsOnly()  # type: ignore[assignment]
    dimse_messages.NamedTemporaryFile = _received_file  # type: ignore[attr-defined]


class _Budget:
    """What one association has made pynetdicom hold in memory, counted from its PDUs (``EVT_PDU_RECV``, fired in
    the DUL thread after a PDU is read and before DIMSE decodes it, so an abort here comes before more is kept):
    command bytes of the current message, data set bytes of messages not written to disk (any but a C-STORE), and
    the data set bytes of the C-STORE being written (past the instance cap the association is aborted)."""

    def __init__(self, store_cap: int) -> None:
        self.store_cap = store_cap
        self.command = bytearray()
        self.store: bool | None = None  # the current message: a C-STORE-RQ (on disk), another one, or not known yet
        self.stored = 0  # data set bytes of the current C-STORE
        self.other = 0  # data set bytes of other messages, over the association

    def over(self, pdu: Any) -> str | None:
        """Count one P-DATA-TF PDU; the reason to abort, or None."""
        for item in getattr(pdu, "presentation_data_value_items", ()):  # only a P-DATA-TF has them
            data = item.presentation_data_value or b"\x00"  # the message control header, then the fragment
            header, size = data[0], len(data) - 1
            if header & 1:  # a command fragment
                if len(self.command) + size > MAX_COMMAND:
                    return f"a command set over {MAX_COMMAND >> 10} KiB"
                self.command += data[1:]
                if header & 2:  # the last one: which message it is
                    self.store = self._is_store()
                    self.command.clear()
                    self.stored = 0
                continue
            if self.store:
                self.stored += size
                if self.stored > self.store_cap:
                    return f"an instance over CTSEG_DICOM_MAX_INSTANCE_MB ({self.store_cap >> 20} MB)"
            else:
                self.other += size
                if self.other > MAX_OTHER_DATA:
                    return f"data sets of messages other than C-STORE over {MAX_OTHER_DATA >> 20} MiB"
            if header & 2:
                self.store = None
        return None

    def _is_store(self) -> bool:
        try:
            return int(decode(BytesIO(bytes(self.command)), True, True).CommandField) == C_STORE_RQ
        except Exception:  # not decodable: pynetdicom ends the association; counted as held meanwhile
            return False


def _bounded_recv(recv: Callable[[int], bytearray]) -> Callable[[int], bytearray]:
    """pynetdicom reads a PDU of any declared length whole before any event fires: longer than senders are offered,
    nothing of it is read (the short read closes the association)."""
    def bounded(nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_RECV_PDU:
            log.warning("DICOM association aborted: a PDU of %d bytes (at most %d are read)", nr_bytes, MAX_RECV_PDU)
            return bytearray()
        return recv(nr_bytes)
    return bounded


class Senders:
    """Which DIMSE destination an association comes from: its calling AE title and its peer address must both be the
    destination's. Host names are resolved at start and again on a mismatch: at most every ``RERESOLVE_S`` for a
    host that resolved, every ``UNRESOLVED_RETRY_S`` for one that did not (a PACS container started after ctseg's,
    whose name compose's DNS only knows once it runs). A peer is judged by its address, never by a name."""

    def __init__(self, destinations: list[Any]) -> None:
        self.nodes = [d for d in destinations if isinstance(d, DimseNode)]
        self._addresses: dict[str, frozenset[str]] = {}
        self._resolved: dict[str, float] = {}
        self._resolve(self.nodes)

    def _resolve(self, nodes: list[DimseNode]) -> None:
        for node in nodes:
            self._addresses[node.name] = resolve_addresses(node.host)
            self._resolved[node.name] = time.monotonic()
            if not self._addresses[node.name]:
                log.warning("destination %r: its host does not resolve (yet); no SEG goes back to it as sender",
                            node.name)

    def _stale(self, node: DimseNode) -> bool:
        wait = RERESOLVE_S if self._addresses.get(node.name) else UNRESOLVED_RETRY_S
        return time.monotonic() - self._resolved.get(node.name, 0.0) >= wait

    def match(self, calling_ae_title: str, peer: str) -> tuple[str | None, list[str]]:
        """(the destination it is, or None; the destinations whose AE title it only claims)."""
        claimed = [n for n in self.nodes if n.ae_title == calling_ae_title]
        if not claimed:
            return None, []
        address = normal_address(peer)
        for again in (False, True):
            if again:
                stale = [n for n in claimed if self._stale(n)]
                if not stale:
                    break
                self._resolve(stale)
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
        self._budgets: dict[int, _Budget] = {}  # association -> what it has made pynetdicom hold
        self._peers = [ipaddress.ip_network(p) for p in settings.dicom_allowed_peers]
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
            (evt.EVT_CONN_OPEN, self._on_opened), (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        host = s.dicom_host or s.host
        self._server = ae.start_server((host, s.dicom_port), block=False, evt_handlers=handlers)
        self._router = threading.Thread(target=self._route_loop, name="ctseg-dicom-router", daemon=True)
        # its own thread: a long routing round (a big series staged, a slow database) must not let this receiver's
        # open associations look dead to the other receivers
        threading.Thread(target=self._renew_loop, name="ctseg-dicom-renew", daemon=True).start()
        self._router.start()
        log.info("DICOM listener %s on %s:%d (%s; %s)", s.dicom_ae_title, host, s.dicom_port,
                 "calling AE titles " + ", ".join(s.dicom_allowed_ae_titles) if s.dicom_allowed_ae_titles
                 else "any calling AE title",
                 "peers " + ", ".join(s.dicom_allowed_peers) if s.dicom_allowed_peers else "any peer address")
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

    def _peer(self, event: evt.Event) -> str:
        try:
            return normal_address(str(event.assoc.requestor.address))
        except ValueError:
            return ""

    def _on_opened(self, event: evt.Event) -> None:
        """Bound the length of each PDU read (runs before the association's threads start)."""
        sock = event.assoc.dul.socket
        sock.recv = _bounded_recv(sock.recv)
        with self._lock:
            self._budgets[id(event.assoc)] = _Budget(self._max_bytes)

    def _on_requested(self, event: evt.Event) -> None:
        """``CTSEG_DICOM_ALLOWED_PEERS``: another address is rejected as an unknown calling AE title is."""
        if not self._peers:
            return
        peer = self._peer(event)
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            address = None
        if address is not None and any(address in net for net in self._peers if net.version == address.version):
            return
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE not recognised
        self.metrics.dicom_associations.labels("rejected").inc()
        log.warning("DICOM association from %s rejected: not in CTSEG_DICOM_ALLOWED_PEERS", peer or "an unknown address")
        event.assoc.kill()

    def _on_pdu(self, event: evt.Event) -> None:
        """Abort an association past what it may make this process hold (``_Budget``)."""
        with self._lock:
            budget = self._budgets.get(id(event.assoc))
        if budget is None or event.assoc.is_aborted:
            return
        try:
            why = budget.over(event.pdu)
        except Exception as err:  # pynetdicom would swallow it and the bound would be gone: fail closed
            why = f"its PDU could not be counted ({type(err).__name__})"
        if why is not None:
            log.warning("DICOM association from %r aborted: %s", self._calling(event), why)
            event.assoc.abort()  # in an event handler: queued, sent before the next PDU is read

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

    @staticmethod
    def _remove_unfinished(event: evt.Event) -> None:
        """The file of an instance its association ended in the middle of (an abort: the peer's or ours)."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        unfinished = getattr(message, "_data_set_file", None)
        if unfinished is None:
            return
        name = str(unfinished.name)
        try:
            unfinished.close()
            Path(name).unlink(missing_ok=True)
        except OSError:
            pass  # the sweep of receiving/ removes it
        _UNWRITTEN.pop(name, None)

    def _on_closed(self, event: evt.Event) -> None:
        self._remove_unfinished(event)
        key = id(event.assoc)
        with self._lock:
            assoc_id = self._assoc_ids.pop(key, None)
            refused = key in self._refused
            released = key in self._released and not refused  # a refused instance is a gap, like an abort
            self._released.discard(key)
            self._refused.discard(key)
            self._senders.pop(key, None)
            self._budgets.pop(key, None)
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

    def _received(self, event: evt.Event) -> Path | None:
        """The file pynetdicom wrote the data set to, in ``receiving/``; None if it did not (the patch no longer
        works): the instance is refused rather than held in memory."""
        try:
            path = event.dataset_path
        except AttributeError:
            path = None
        if isinstance(path, Path) and path.parent.resolve() == self.arrivals.receiving.resolve():
            return path
        log.error("C-STORE answered Out of Resources: pynetdicom did not write the data set to receiving/ (the "
                  "pynetdicom receive-to-disk patch in server/dicomnode/listener.py does not work with this release)")
        return None

    @staticmethod
    def _forget(event: evt.Event) -> None:
        """A dropped instance's file: no write failure of it is kept (pynetdicom removes the file)."""
        try:
            _UNWRITTEN.pop(str(event.dataset_path), None)
        except AttributeError:
            pass

    def _refuse(self, event: evt.Event) -> None:
        with self._lock:
            self._refused.add(id(event.assoc))

    def _on_store(self, event: evt.Event) -> int:
        sop_class = str(event.context.abstract_syntax)
        if sop_class not in self._ct_classes:  # an SR, a presentation state, a dose report... beside the CT
            with self._lock:
                self._dropped.setdefault(id(event.assoc), Counter())[UID(sop_class).name] += 1
            self._forget(event)
            return StoreStatus.SUCCESS
        received = self._received(event)
        if received is None:
            self._refuse(event)
            return StoreStatus.OUT_OF_RESOURCES
        try:
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
        except (OSError, sqlite3.Error, sa.exc.SQLAlchemyError, StoreBusy) as err:
            why = "the storage is full" if storage_full(err) else f"cannot store it ({type(err).__name__})"
            log.error("C-STORE answered Out of Resources: %s", why)
            self._refuse(event)
            return StoreStatus.OUT_OF_RESOURCES
        self.metrics.dicom_instances.inc()
        return StoreStatus.SUCCESS

    # ------------------------------------------------------------------------------------------------ hand-over
    def _renew_loop(self) -> None:
        """Several receivers: ours are alive, and a dead receiver's open associations become aborted."""
        while not self._stopping.wait(self.arrivals.stale_s / 6):
            try:
                self.arrivals.heartbeat()
            except Exception:  # noqa: BLE001 - the next round tries again, well within the stale limit
                log.warning("this receiver's associations could not be renewed this round")

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
