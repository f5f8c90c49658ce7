"""Errors the API turns into clear 4xx answers. Each message names the problem, never a stack trace."""

from __future__ import annotations

import errno
import sqlite3


class InputError(ValueError):
    """The uploaded data cannot be segmented as sent (HTTP 422)."""

    status_code = 422

    def __init__(self, message: str, detail: object | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class NotFound(LookupError):
    status_code = 404


class PayloadTooLarge(ValueError):
    status_code = 413


class ServiceUnavailable(RuntimeError):
    """The service cannot take work now (HTTP 503 with Retry-After)."""

    status_code = 503


class QueueFull(ServiceUnavailable):
    pass


class BadGateway(RuntimeError):
    """A PACS the service depends on for this request failed or cannot be reached (HTTP 502)."""

    status_code = 502


class InsufficientStorage(RuntimeError):
    """The service's storage is full (HTTP 507)."""

    status_code = 507


STORAGE_FULL = "the service's storage is full; retry later (operators: free space in CTSEG_STORAGE_DIR)"


def storage_full(err: BaseException | None) -> bool:
    """No space left, as the OS says it (ENOSPC, EDQUOT), as SQLite or PostgreSQL (disk_full, 53100) do, or as
    ITK's writers do; through SQLAlchemy's wrapper (``orig``) too."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, sqlite3.OperationalError) and "disk is full" in str(err):
            return True
        if getattr(err, "sqlstate", None) == "53100":
            return True
        if isinstance(err, RuntimeError) and "No space left on device" in str(err):
            return True
        err = getattr(err, "orig", None) or err.__cause__ or err.__context__
    return False
