"""What can go wrong talking to a PACS, as the caller needs to tell it apart."""

from __future__ import annotations

from server.core.errors import BadGateway, NotFound


class DeliveryError(Exception):
    """A send that did not end in an acknowledgement."""


class RetryableDelivery(DeliveryError):
    """Unreachable, timed out, busy: the same SEG may be accepted later."""


class RejectedDelivery(DeliveryError):
    """The destination answered and refused the SEG: sending the same bytes again will not help."""


class SeriesNotFound(NotFound):
    """The source does not have the series (HTTP 404 to the client)."""


class SourceUnavailable(BadGateway):
    """The source cannot be reached, failed, or sent only part of the series (HTTP 502)."""
