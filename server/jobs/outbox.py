"""The outbox: sends pending SEGs until each destination has acknowledged it; destinations never wait on each other.

Deliveries are rows in the job store (written with the job's success), so the outbox holds nothing a crash could
lose: after a restart it finds the same pending rows and goes on. A delivery is marked ``delivered`` right after
the destination's acknowledgement; the SEG's SOP Instance UID is the same on every attempt, so in the one window a
crash can hit (acknowledged, not yet recorded) a resend replaces the instance rather than adding one.

One sender thread per destination, each with a circuit breaker; with several replicas, at most
``delivery_max_senders`` of them send to one destination at a time (one association each), so N replicas do not
flood one PACS. While a destination answers, its due deliveries
go out in claimed batches. When one fails with a retryable error the breaker opens: the others wait without
costing a timeout each, and the destination is probed at an exponential back-off (``delivery_retry_base_s``
doubled per consecutive failure, up to 10 % jitter), first with a cheap check (C-ECHO, or an HTTP request to the
DICOMweb root) at most ``delivery_probe_max_s`` apart, then with one delivery at a time, at most
``delivery_retry_max_s`` apart. When a delivery is acknowledged the breaker closes and every pending delivery of
that destination is due at once. A black-holed destination (30 s per timeout) therefore delays only its own SEGs,
and one that answers again after a long outage is drained within a probe interval.

A delivery still pending after ``delivery_give_up_hours`` is failed, as is one the destination refused outright.
DIMSE warning statuses that mean "stored" (coercion, attribute value out of range, ...) are deliveries, with the
warning kept on the delivery.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from server.core.metrics import Metrics
from server.core.nodes import Node
from server.core.settings import Settings
from server.core.vocabulary import DeliveryState, ResultFile
from server.jobs.files import JobFiles
from server.jobs.model import Delivery
from server.jobs.store import JobStore
from server.pacs import DeliveryError, RejectedDelivery, deliver, reachable

log = logging.getLogger(__name__)

LEASE_S = 600.0  # a claimed delivery of a destination no longer configured: held this long by its sweep
MIN_LEASE_S = 30.0  # a claimed delivery is held for 10 network timeouts of its destination, at least this long
BATCH = 8
IDLE_POLL_S = 5.0  # a wake-up may be missed (another process queued the delivery): look again this often
SendFn = Callable[[Node, Path, str, "Path | None"], "str | None"]
ProbeFn = Callable[[Node, str], bool]


class DestinationSender:
    """One destination's deliveries, in its own thread, behind its own circuit breaker."""

    def __init__(self, outbox: Outbox, node: Node) -> None:
        self.outbox, self.node = outbox, node
        self.failures = 0  # consecutive retryable failures: the breaker is open while > 0
        self.probe_at = 0.0  # when to check again whether it answers
        self.deliver_at = 0.0  # when the next delivery may be tried, if it does
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"ctseg-outbox-{node.name}", daemon=True)
        # How long a claim holds another sender off: a send takes at most one network timeout (its lease restarts
        # at each send); a sender that died (a replica SIGKILLed) gives its claims up after this.
        self.lease_s = max(MIN_LEASE_S, 10 * node.timeout_s)

    @property
    def up(self) -> bool:
        return self.failures == 0

    def _loop(self) -> None:
        ob = self.outbox
        while not ob.stopping.is_set():
            try:
                wait = self.round()
            except Exception:  # the store was briefly unavailable: log and go on
                log.exception("outbox round for %s failed", self.node.name)
                wait = 1.0
            self.wake.wait(wait)
            self.wake.clear()

    def round(self) -> float:
        """Send what is due; returns how long to sleep before the next round."""
        ob = self.outbox
        while not ob.stopping.is_set():
            now = time.time()
            if not self.up:
                if now < self.probe_at:
                    return min(IDLE_POLL_S, self.probe_at - now)
                if now < self.deliver_at and not self._answers():
                    return 0.0
            batch = ob.store.claim_deliveries(self.node.name, now, self.lease_s, BATCH if self.up else 1,
                                              ob.settings.delivery_max_senders)
            if not batch:
                due = ob.store.next_due(self.node.name)
                return IDLE_POLL_S if due is None else min(IDLE_POLL_S, max(0.05, due - time.time()))
            for index, delivery in enumerate(batch):
                if ob.stopping.is_set() or not self._attempt(delivery):
                    for rest in batch[index + 1:]:  # the breaker opened: the rest wait, untried
                        ob.store.unclaim(rest)
                    break
        return 0.0

    def _attempt(self, delivery: Delivery) -> bool:
        """One try; False when the destination did not answer (the breaker opens)."""
        ob = self.outbox
        if not ob.store.begin_send(delivery, self.lease_s):
            return True  # superseded, given up or taken over since the batch was claimed: not sent
        job = ob.store.get(delivery.job_id)
        path = ob.files.result_path(job, delivery.object) if job is not None else None
        if path is None or not path.is_file():
            ob.record(delivery, DeliveryState.FAILED, f"the {delivery.object.value} file is gone (job deleted?)")
            return True
        fallback = ob.files.result_path(job, ResultFile.SEG_BINARY) if delivery.object == ResultFile.SEG else None
        t = time.perf_counter()
        renewing = self._renew_while_sending(delivery)
        try:
            try:
                warning = ob.send(self.node, path, ob.settings.dicom_ae_title,
                                  fallback if fallback is not None and fallback.is_file() else None)
            finally:
                renewing.set()  # before the outcome is recorded (a renewal after it would change nothing anyway)
        except RejectedDelivery as err:
            ob.record(delivery, DeliveryState.FAILED, str(err))
            return True
        except DeliveryError as err:
            self._open(delivery, str(err))
            return False
        except Exception as err:  # this side's problem (an unreadable SEG, a client library's bug): retried, loud,
            log.exception("delivery %d to %s raised", delivery.id, delivery.destination)  # and not the destination's
            delay = ob.backoff(delivery.attempts + 1)
            ob.store.delivery_done(delivery, DeliveryState.PENDING, f"internal error: {type(err).__name__}",
                                   next_attempt=time.time() + delay)
            ob.metrics.delivery_attempts.labels(delivery.destination, "retry").inc()
            return True
        ob.record(delivery, DeliveryState.DELIVERED, None, warning)
        log.info("job %s: %s delivered to %s in %.2f s (attempt %d)%s", delivery.job_id, delivery.object.value,
                 delivery.destination, time.perf_counter() - t, delivery.attempts + 1,
                 " with a warning" if warning else "")
        if not self.up:
            self.failures = 0
            ob.metrics.destination_up.labels(self.node.name).set(1)
            drained = ob.store.expedite(self.node.name, time.time())
            log.info("destination %s answers again: its %d other pending SEG(s) go now", self.node.name, drained)
        return True

    def _renew_while_sending(self, delivery: Delivery) -> threading.Event:
        """A long send (a large SEG over a slow link) keeps its claim: renewed every third of the lease until the
        returned event is set, so no other replica takes the delivery over and sends it a second time."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    if not self.outbox.store.begin_send(delivery, self.lease_s):
                        return  # superseded or given up meanwhile: nothing left to hold
                except Exception:  # noqa: BLE001 - the next renewal tries again; the lease is still a third left
                    log.warning("delivery %d: its claim could not be renewed this time", delivery.id)
        threading.Thread(target=renew, name=f"ctseg-claim-{delivery.id}", daemon=True).start()
        return done

    def _answers(self) -> bool:
        """The cheap check while the breaker is open; False (and the next check later) if it still does not answer."""
        ob = self.outbox
        try:
            answers = ob.probe(self.node, ob.settings.dicom_ae_title)
        except Exception:  # a client library's bug must not stop the sender
            log.exception("probe of %s raised", self.node.name)
            answers = False
        if answers:
            log.info("destination %s answers again; trying one SEG", self.node.name)
            ob.store.expedite(self.node.name, time.time())  # its SEGs are due now, not at their back-off
            return True
        self.failures += 1
        self.probe_at = time.time() + min(ob.backoff(self.failures), ob.settings.delivery_probe_max_s)
        return False

    def _open(self, delivery: Delivery, error: str) -> None:
        ob = self.outbox
        self.failures += 1
        delay = ob.backoff(self.failures)
        now = time.time()
        self.deliver_at = now + delay
        self.probe_at = now + min(delay, ob.settings.delivery_probe_max_s)
        ob.metrics.destination_up.labels(self.node.name).set(0)
        log.warning("job %s: delivery to %s failed (attempt %d): %s; its SEGs wait while it does not answer (next "
                    "check in %.0f s)", delivery.job_id, delivery.destination, delivery.attempts + 1, error,
                    self.probe_at - now)
        ob.store.delivery_done(delivery, DeliveryState.PENDING, error, next_attempt=self.deliver_at)
        ob.metrics.delivery_attempts.labels(delivery.destination, "retry").inc()


class Outbox:
    def __init__(self, settings: Settings, store: JobStore, files: JobFiles, metrics: Metrics,
                 send: SendFn = deliver, probe: ProbeFn = reachable) -> None:
        self.settings, self.store, self.files, self.metrics = settings, store, files, metrics
        self.send, self.probe = send, probe
        self.stopping = threading.Event()
        self.senders = {node.name: DestinationSender(self, node) for node in settings.destinations}
        self._sweeper: threading.Thread | None = None

    def start(self) -> None:
        self.sweep()
        for sender in self.senders.values():
            self.metrics.destination_up.labels(sender.node.name).set(1)
            sender.thread.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="ctseg-outbox-sweep", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self.stopping.set()
        for sender in self.senders.values():
            sender.wake.set()
        for sender in self.senders.values():
            if sender.thread.is_alive():
                sender.thread.join(timeout=10.0)

    def wake(self) -> None:
        """A job finished (its deliveries may be due now)."""
        for sender in self.senders.values():
            sender.wake.set()

    def backoff(self, failures: int) -> float:
        s = self.settings
        delay = min(s.delivery_retry_max_s, s.delivery_retry_base_s * 2 ** max(0, failures - 1))
        return delay * (1 + 0.1 * random.random())  # noqa: S311

    def record(self, delivery: Delivery, state: DeliveryState, error: str | None, warning: str | None = None) -> None:
        if state == DeliveryState.FAILED:
            log.error("job %s: delivery to %s failed for good: %s", delivery.job_id, delivery.destination, error)
        self.store.delivery_done(delivery, state, error, warning)
        self.metrics.delivery_attempts.labels(delivery.destination, state.value).inc()

    def _sweep_loop(self) -> None:
        while not self.stopping.wait(min(60.0, self.settings.delivery_give_up_hours * 3600 / 10)):
            try:
                self.sweep()
            except Exception:
                log.exception("outbox sweep failed")

    def sweep(self) -> None:
        """Deliveries past their give-up age, and deliveries to destinations no longer configured: failed."""
        hours = self.settings.delivery_give_up_hours
        for d in self.store.give_up_deliveries(time.time() - hours * 3600, f"given up after {hours:g} h"):
            log.error("job %s: delivery to %s given up after %g h", d.job_id, d.destination, hours)
            self.metrics.delivery_attempts.labels(d.destination, DeliveryState.FAILED.value).inc()
        for name in self.store.pending_destinations() - set(self.senders):
            for d in self.store.claim_deliveries(name, time.time(), LEASE_S, 1000):
                self.record(d, DeliveryState.FAILED, f"destination {name!r} is no longer configured")
