"""Prometheus metrics, one registry per app (so several apps in one process never collide).

Every label value comes from a fixed set (a series per value lives until the process ends): an HTTP method from
``METHODS`` or "other", a route template (never the raw path) or "unmatched", a status class like "2xx"."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from server.core.vocabulary import DeliveryState, QualityFlag

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # no route took the request (404, or refused before routing)


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ctseg_requests_total", "HTTP requests by method, route template and status class",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("ctseg_request_seconds", "HTTP request latency", ["method", "route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.inference_seconds = Histogram("ctseg_job_seconds", "Job processing time (decode to write)", registry=r,
                                           buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
        self.queue_depth = Gauge("ctseg_queue_depth", "Jobs staging, queued or running", registry=r)
        self.jobs_finished = Counter("ctseg_jobs_finished_total", "Finished jobs by final state", ["state"], registry=r)
        self.jobs_by_state = Gauge("ctseg_jobs", "Jobs in the store by state", ["state"], registry=r)
        self.deliveries = Gauge("ctseg_deliveries", "SEG deliveries in the store by destination and state",
                                ["destination", "state"], registry=r)
        self.delivery_attempts = Counter("ctseg_delivery_attempts_total", "Delivery attempts by destination and "
                                         "outcome (delivered, retry, failed)", ["destination", "outcome"], registry=r)
        self.outbox_depth = Gauge("ctseg_outbox_depth", "SEG deliveries pending", registry=r)
        self.outbox_oldest = Gauge("ctseg_outbox_oldest_pending_seconds", "Age of the oldest pending delivery "
                                   "(0 when none)", registry=r)
        self.dicom_instances = Counter("ctseg_dicom_instances_received_total", "Instances stored by the DICOM "
                                       "listener", registry=r)
        self.dicom_associations = Counter("ctseg_dicom_associations_total", "DICOM associations by outcome "
                                          "(accepted, rejected, released, aborted)", ["outcome"], registry=r)
        self.dicom_series = Counter("ctseg_dicom_series_total", "Received series by fate (routed, rerouted, "
                                    "unrouted, incomplete)", ["fate"], registry=r)
        self.dicom_waiting = Gauge("ctseg_dicom_series_waiting", "Received series not yet routed, by reason "
                                   "(receiving, incomplete)", ["reason"], registry=r)
        self.job_attempts = Counter("ctseg_job_requeues_total", "Jobs given back to the queue by reason (lease "
                                    "expired, worker stopped, service restarted)", ["reason"], registry=r)
        self.quality_flags = Counter("ctseg_quality_flags_total", "Succeeded jobs by quality flag (each flag once "
                                     "per job, whichever labels raised it)", ["flag"], registry=r)
        for flag in QualityFlag:  # a fixed label set, present from the start (0 until a job raises it)
            self.quality_flags.labels(flag.value)
        self.destination_up = Gauge("ctseg_destination_up", "1 while a destination answers, 0 while its circuit "
                                    "breaker holds its deliveries back", ["destination"], registry=r)

    def count_quality_flags(self, flags: Iterable[QualityFlag | str]) -> None:
        """One succeeded job's flags (server/imaging/quality.py ``read_flags(...).all_flags()``)."""
        for flag in {QualityFlag(f) for f in flags}:
            self.quality_flags.labels(flag.value).inc()

    def observe_request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """``route``: the matched route's template (None: no route matched)."""
        method, route = method_label(method), route or UNMATCHED
        self.requests.labels(method, route, status_class(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self, job_counts: dict[str, int], outbox: tuple[dict[tuple[str, str], int], float | None]) -> bytes:
        """The registry, with the gauges read from the store now (``counts()`` and ``outbox_stats()``)."""
        for state, n in job_counts.items():
            self.jobs_by_state.labels(state=state).set(n)
        by_state, oldest = outbox
        pending = 0
        self.deliveries.clear()  # a (destination, state) with no rows left reads as absent, not as its old value
        for (destination, state), n in by_state.items():
            self.deliveries.labels(destination, state).set(n)
            pending += n if state == DeliveryState.PENDING.value else 0
        self.outbox_depth.set(pending)
        self.outbox_oldest.set(0.0 if oldest is None else max(0.0, time.time() - oldest))
        return generate_latest(self.registry)
