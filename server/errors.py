"""Errors the API turns into clear 4xx answers. Each message names the problem, never a stack trace."""

from __future__ import annotations


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
