from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="session")
def intensity_bundle(tmp_path_factory: pytest.TempPathFactory):
    from bundles import write_intensity_bundle

    return write_intensity_bundle(tmp_path_factory.mktemp("bundles") / "intensity-test")
