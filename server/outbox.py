"""The outbox dispatcher: sends pending SEGs from the job store until each destination has acknowledged it.

Deliveries are rows in the job store (written with the job's success, see server/jobs.py), so the dispatcher holds
nothing that a crash could lose: after a restart it finds the same pending rows and goes on. A delivery is marked
``delivered`` right after the destination's acknowledgement; the SEG's SOP Instance UID is the same on every
attempt, so in the one window a crash can hit (acknowledged, not yet recorded) a resend replaces the instance
rather than adding a second one.

Retries back off exponentially (``delivery_retry_base_s`` doubled per attempt, capped at ``delivery_retry_max_s``,
with up to 10 % jitter so a PACS coming back is not hit by every SEG at once); a delivery still failing after
``delivery_give_up_hours`` is failed, as is one the destination refused outright. When a destination acknowledges
a SEG after failures, its other pending deliveries are due at once (it is back; no need to wait out each one's
back-off).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from server.jobs import Delivery, JobStore
from server.metrics import Metrics
from server.senders import DeliveryError, RejectedDelivery, deliver
from server.settings import Settings
from server.vocabulary import DeliveryState

log = logging.getLogger(__name__)

LEASE_S = 600.0  # a claimed delivery is not taken by another dispatcher for this long
SendFn = Callable[..., None]


class Outbox:
    def __init__(self, settings: Settings, store: JobStore, metrics: Metrics, send: SendFn = deliver) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.send = send
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ctseg-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def wake(self) -> None:
        """A job finished (its deliveries may be due now)."""
        self._wake.set()

    def backoff(self, attempts: int) -> float:
        s = self.settings
        delay = min(s.delivery_retry_max_s, s.delivery_retry_base_s * 2 ** max(0, attempts - 1))
        return delay * (1 + 0.1 * random.random())  # noqa: S311 (jitter, not security)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_due()
            except Exception:  # the store was briefly unavailable: log and go on
                log.exception("outbox round failed")
            due = self.store.next_due()
            wait = 5.0 if due is None else min(5.0, max(0.05, due - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def run_due(self) -> int:
        """Try every delivery whose time has come; returns how many were tried."""
        tried = 0
        while not self._stopping.is_set():
            batch = self.store.claim_due(time.time(), LEASE_S)
            if not batch:
                return tried
            for delivery in batch:
                self._attempt(delivery)
                tried += 1
        return tried

    def _attempt(self, delivery: Delivery) -> None:
        path = self.store.job_dir(delivery.job_id) / "seg.dcm"
        try:
            node = self.settings.destination(delivery.destination)
        except KeyError:
            self._record(delivery, DeliveryState.FAILED, f"destination {delivery.destination!r} is no longer configured")
            return
        if not path.is_file():
            self._record(delivery, DeliveryState.FAILED, "the SEG file is gone (job deleted?)")
            return
        t = time.perf_counter()
        try:
            self.send(node, path, self.settings.dicom_ae_title)
        except RejectedDelivery as err:
            self._record(delivery, DeliveryState.FAILED, str(err))
        except DeliveryError as err:
            self._retry(delivery, str(err))
        except Exception as err:  # a bug in a client library: retried, and loud
            log.exception("delivery %d to %s raised", delivery.id, delivery.destination)
            self._retry(delivery, f"internal error: {type(err).__name__}")
        else:
            self._record(delivery, DeliveryState.DELIVERED, None)
            log.info("job %s: SEG delivered to %s in %.2f s (attempt %d)", delivery.job_id, delivery.destination,
                     time.perf_counter() - t, delivery.attempts + 1)
            if delivery.attempts and self.store.expedite(delivery.destination, time.time()):
                log.info("destination %s is back: its other pending deliveries go now", delivery.destination)

    def _retry(self, delivery: Delivery, error: str) -> None:
        age_h = (time.time() - delivery.created) / 3600
        if age_h >= self.settings.delivery_give_up_hours:
            self._record(delivery, DeliveryState.FAILED, f"{error}; given up after {age_h:.1f} h")
            return
        delay = self.backoff(delivery.attempts + 1)
        log.warning("job %s: delivery to %s failed (attempt %d): %s; next try in %.0f s", delivery.job_id,
                    delivery.destination, delivery.attempts + 1, error, delay)
        self.store.delivery_done(delivery.id, DeliveryState.PENDING, error, time.time() + delay)
        self.metrics.delivery_attempts.labels(delivery.destination, "retry").inc()

    def _record(self, delivery: Delivery, state: DeliveryState, error: str | None) -> None:
        if state == DeliveryState.FAILED:
            log.error("job %s: delivery to %s failed for good: %s", delivery.job_id, delivery.destination, error)
        self.store.delivery_done(delivery.id, state, error)
        self.metrics.delivery_attempts.labels(delivery.destination, state.value).inc()
