"""Log output that carries no patient data, whatever an exception says (shared: every `ctseg` command and the
service's worker processes write through it).

A log outlives the retention of the data it describes, is shipped to collectors and read by people who may not
see patient records. The service's own lines name jobs by id and inputs by counts, but an exception's *message* is
written by whoever raised it: an ``OSError`` names the stored path, pydicom quotes the value it could not parse (a
patient name, a UID), an ``InputError`` names the series the client asked for. So a traceback is written with its
frames (where in the code: file, line, function and source line) and, for each exception in the chain, only its type
and, for an ``OSError``, its errno with the system's text. That keeps what an engineer needs to find a bug and drops
what a record of the patient would be. ``CTSEG_LOG_EXCEPTION_MESSAGES=true`` restores the messages for debugging on
test data.
"""

from __future__ import annotations

import logging
import os
import traceback
from types import TracebackType

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def describe(exc: BaseException) -> str:
    """An exception as its type (and errno): never its message."""
    name = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    if isinstance(exc, OSError) and exc.errno:
        return f"{name}: [Errno {exc.errno}] {os.strerror(exc.errno)}"
    return name


def _chain(exc: BaseException, seen: set[int]) -> list[str]:
    seen.add(id(exc))
    lines: list[str] = []
    if exc.__cause__ is not None and id(exc.__cause__) not in seen:
        lines += _chain(exc.__cause__, seen) + [_CAUSE]
    elif exc.__context__ is not None and not exc.__suppress_context__ and id(exc.__context__) not in seen:
        lines += _chain(exc.__context__, seen) + [_CONTEXT]
    if exc.__traceback__ is not None:
        lines.append("Traceback (most recent call last):\n")
        lines += traceback.format_list(traceback.extract_tb(exc.__traceback__))
    lines.append(describe(exc) + "\n")
    return lines


def redacted_traceback(exc: BaseException) -> str:
    return "".join(_chain(exc, set())).rstrip("\n")


class RedactingFormatter(logging.Formatter):
    """Formats tracebacks without exception messages (see the module's docstring)."""

    def __init__(self, fmt: str = FORMAT, *, messages: bool = False) -> None:
        super().__init__(fmt)
        self.messages = messages

    def format(self, record: logging.LogRecord) -> str:
        # logging caches a record's traceback text on the record: another handler's formatter may have put the
        # full one there, and ours must not hand its text on either
        cached, record.exc_text = record.exc_text, None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatException(self, ei: tuple[type[BaseException], BaseException, TracebackType | None]  # noqa: N802
                        ) -> str:
        if self.messages or ei[1] is None:
            return super().formatException(ei)
        return redacted_traceback(ei[1])


def install(level: int | str = logging.INFO, *, messages: bool = False) -> None:
    """Root logging to stderr through :class:`RedactingFormatter`: by the entry point, and again by ``ctseg serve``
    once its settings are read (``messages``: ``Settings.log_exception_messages``)."""
    logging.basicConfig(level=level, format=FORMAT, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(RedactingFormatter(messages=messages))
