"""What every other package shares: the settings, PACS node types, vocabularies, errors, metrics, durable writes,
SQLite plumbing. Imports nothing else of the server."""

from server.core.errors import (
    BadGateway,
    InputError,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServiceUnavailable,
)
from server.core.options import SegOptions
from server.core.settings import Settings

__all__ = ["BadGateway", "InputError", "InsufficientStorage", "NotFound", "PayloadTooLarge", "QueueFull",
           "SegOptions", "ServiceUnavailable", "Settings"]
