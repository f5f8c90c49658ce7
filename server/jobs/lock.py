"""One service per storage folder: an exclusive ``flock`` on ``<storage>/ctseg.lock``, held for the process's life.

The embedded store's recovery (requeue the running jobs, release delivery claims, re-stage received series) is
only right when no other service uses the folder; two services on one folder (a rolling deploy) would otherwise
fail each other's jobs. The kernel drops the lock when the process dies, however it dies, so a crash never leaves
a stale lock behind. The file records who holds it, for the message the second service gives.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from server.core.durable import private_storage

LOCK_NAME = "ctseg.lock"


class StorageLocked(RuntimeError):
    """Another service holds the storage folder."""


class StorageLock:
    def __init__(self, storage: Path) -> None:
        self.path = Path(storage) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StorageLock:
        private_storage(self.path.parent)  # the first file a service makes in the folder
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise StorageLocked(f"the storage folder {self.path.parent} is in use by another ctseg service{holder}; "
                                "one service per CTSEG_STORAGE_DIR (stop the other one first)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f" (pid {int(info['pid'])} on {info['host']})"
        except (ValueError, KeyError, TypeError, OSError):
            return ""

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
