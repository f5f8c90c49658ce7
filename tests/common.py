"""Small helpers the tests share: repository paths, free loopback ports, waiting, required tools."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO / "models" / "bundles" / "demo-abdomen-ct"


def require_tool(path: str | None, what: str) -> str:
    """The tool's path; a failure under CI (it must be installed there), a skip elsewhere."""
    if path:
        return path
    message = f"needs {what}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}: .ci/install-system-tools.sh should have installed it")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, every: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not met within {timeout:.0f} s")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


class Serve:
    """``ctseg serve`` as a real process group on a free loopback port."""

    def __init__(self, bundle: Path, storage: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "CTSEG_BUNDLE_DIRS": str(bundle), "CTSEG_STORAGE_DIR": str(storage),
                    "CTSEG_HOST": "127.0.0.1", "CTSEG_PORT": str(self.port), **env}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Serve":
        self.proc = subprocess.Popen([sys.executable, "-m", "ctseg", "serve"], cwd=REPO, env=self.env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, 90, 0.2, "ctseg ready")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"ctseg serve exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            return requests.get(self.url + "/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def kill_api_only(self) -> None:
        """SIGKILL of the API process alone: its worker processes are left to notice (they must die with it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def worker_pids(self) -> list[int]:
        """The worker processes this service spawned (multiprocessing's spawn children)."""
        return [pid for pid in children(self.proc.pid) if b"multiprocessing" in _cmdline(pid)] if self.proc else []

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)

    def job(self, job_id: str) -> dict:
        return requests.get(f"{self.url}/v1/segmentations/{job_id}", timeout=10).json()

    def jobs(self) -> list[dict]:
        return requests.get(f"{self.url}/v1/segmentations", timeout=10).json()["jobs"]

    def wait_finished(self, job_id: str, timeout: float = 120.0) -> dict:
        return wait_for(lambda: (j := self.job(job_id))["state"] not in ("staging", "queued", "running") and j,
                        timeout, 0.2, f"job {job_id} finished")


def fill(mount: Path) -> Path:
    """Write zeros until the disk is full (unbuffered, so nothing is left to fail at close)."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 20, 4096, 512):
            try:
                while True:
                    f.write(bytes(block))
            except OSError:
                pass
    return filler
