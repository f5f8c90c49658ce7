"""The job core: the job model, the store and queue seams with their embedded implementations, staging, the
executor (claims, leases, fencing), job files, the outbox, the storage lock."""

from server.jobs.files import JobFiles
from server.jobs.model import (
           Claim,
           Delivery,
           Job,
           JobRequest,
           JobSpec,
           JobState,
           Origin,
           StagedInput,
)
from server.jobs.queue import JobQueue
from server.jobs.store import JobStore

__all__ = ["Claim", "Delivery", "Job", "JobFiles", "JobQueue", "JobRequest", "JobSpec", "JobState", "JobStore",
           "Origin", "StagedInput"]
