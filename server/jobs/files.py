"""A job's files, apart from its record: ``<storage>/jobs/<id>/input/`` and one result folder per run.

Each run (a claim's attempt) writes its results into ``run-<attempt>/``; the record of the run that succeeded says
which folder holds the job's results. So a stale run (its lease expired, another run took the job) can never
overwrite the results of the run that counts, and a crash leaves at most an unreferenced folder, removed later.
Jobs of the first releases (attempt 0) have their results directly in the job's folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from server.core import durable
from server.core.vocabulary import ResultFile
from server.jobs.model import Job

RUN_PREFIX = "run-"


class JobFiles:
    def __init__(self, storage: Path) -> None:
        self.root = durable.make_dirs(Path(storage) / "jobs")

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def input_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "input"

    def make_input_dir(self, job_id: str) -> Path:
        return durable.make_dirs(self.input_dir(job_id))

    def run_dir(self, job_id: str, attempt: int) -> Path:
        return self.job_dir(job_id) / f"{RUN_PREFIX}{attempt}" if attempt else self.job_dir(job_id)

    def result_path(self, job: Job, name: ResultFile) -> Path:
        return self.run_dir(job.id, job.attempt) / name.value

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def remove_input(self, job_id: str) -> None:
        shutil.rmtree(self.input_dir(job_id), ignore_errors=True)

    def remove_run(self, job_id: str, attempt: int) -> None:
        if attempt:
            shutil.rmtree(self.run_dir(job_id, attempt), ignore_errors=True)
        else:
            for name in ResultFile:
                (self.job_dir(job_id) / name.value).unlink(missing_ok=True)

    def remove_other_runs(self, job_id: str, keep: int) -> None:
        """Folders of runs that did not count (stale or crashed runs of a job that finished)."""
        folder = self.job_dir(job_id)
        if folder.is_dir():
            for path in folder.glob(f"{RUN_PREFIX}*"):
                if path.name != f"{RUN_PREFIX}{keep}":
                    shutil.rmtree(path, ignore_errors=True)

    def job_ids(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir()} if self.root.is_dir() else set()
