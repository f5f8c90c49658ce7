"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ctseg_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("ctseg_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.inference_seconds = Histogram("ctseg_job_seconds", "Job processing time (decode to write)", registry=self.registry,
                                           buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
        self.queue_depth = Gauge("ctseg_queue_depth", "Jobs queued or running", registry=self.registry)
        self.jobs_finished = Counter("ctseg_jobs_finished_total", "Finished jobs by final state", ["state"], registry=self.registry)
        self.jobs_by_state = Gauge("ctseg_jobs", "Jobs in the store by state", ["state"], registry=self.registry)

    def render(self, job_counts: dict[str, int]) -> bytes:
        for state, n in job_counts.items():
            self.jobs_by_state.labels(state=state).set(n)
        return generate_latest(self.registry)
