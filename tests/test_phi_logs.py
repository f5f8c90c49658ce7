"""Patient data stays out of logs and out of files others can read: tracebacks without exception messages, a
worker's tracebacks too, and the storage folder private from its first file."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

from fastapi.testclient import TestClient

from models.logs import RedactingFormatter, redacted_traceback
from server.app import create_app
from server.core.settings import Settings

NAME = "DOE^JANE"
UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


def _failing(tmp_path):
    try:
        try:
            (tmp_path / NAME / f"{UID}.dcm").read_bytes()
        except OSError as err:
            raise ValueError(f"cannot read patient {NAME}, series {UID}") from err
    except ValueError as err:
        return err


def test_a_traceback_keeps_its_frames_and_errno_and_drops_every_message(tmp_path):
    err = _failing(tmp_path)
    text = redacted_traceback(err)
    assert NAME not in text and UID not in text and str(tmp_path) not in text
    assert "FileNotFoundError: [Errno 2] No such file or directory" in text
    assert "direct cause" in text and text.rstrip().endswith("ValueError")
    assert "test_phi_logs.py" in text and "read_bytes()" in text  # where it happened: file, line, source
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "job %s failed", ("abc",), (type(err), err, None))
    line = RedactingFormatter().format(record)
    assert "job abc failed" in line and NAME not in line and UID not in line
    assert UID in RedactingFormatter(messages=True).format(record)  # the debugging switch


def test_installed_logging_writes_tracebacks_without_messages(tmp_path):
    """What ``ctseg``'s entry point installs, in a fresh process writing to stderr."""
    code = ("import logging; import models.logs as l; l.install(); log = logging.getLogger('x')\n"
            f"try:\n    open({str(tmp_path / NAME)!r})\nexcept OSError:\n    log.exception('failed')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "FileNotFoundError: [Errno 2]" in proc.stderr, proc.stderr
    assert NAME not in proc.stderr


def test_the_storage_folder_is_private_from_its_first_file(intensity_bundle, tmp_path):
    old = os.umask(0o022)  # a typical login umask: files group- and world-readable
    try:
        storage = tmp_path / "storage"
        settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=storage, dicom_port=None)
        with TestClient(create_app(settings)):
            made = [p for p in storage.rglob("*")]
            assert any(p.name.startswith("jobs.sqlite3") for p in made), made
            for path in [storage, *made]:
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode & 0o077 == 0, f"{path.relative_to(tmp_path)} has mode {oct(mode)}"
    finally:
        os.umask(old)
