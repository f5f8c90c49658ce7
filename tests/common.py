"""Small helpers the tests share: repository paths, free loopback ports, waiting, required tools."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

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
