from __future__ import annotations

import logging
import os
import subprocess

import pytest

import common

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="session")
def intensity_bundle(tmp_path_factory: pytest.TempPathFactory):
    from bundles import write_intensity_bundle

    return write_intensity_bundle(tmp_path_factory.mktemp("bundles") / "intensity-test")


@pytest.fixture(scope="session")
def pg_cluster():
    """A real PostgreSQL (tests/postgres.py), started once; each test takes a database of its own."""
    from postgres import start_cluster

    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop("immediate")


@pytest.fixture()
def small_disk(tmp_path):  # type: ignore[no-untyped-def]
    """A 24 MB tmpfs: a real full disk (needs root to mount; CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        common.require_tool(None, f"a tmpfs mount for a full disk (mount said: {proc.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
