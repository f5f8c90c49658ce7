"""Talking to PACS nodes: store a SEG at a destination, retrieve a series from a source. One module per protocol
(``dicomweb``, ``dimse``); statuses by name and category in ``status``."""

from __future__ import annotations

import logging
from pathlib import Path

from server.core.nodes import DicomWebNode, DimseNode, Node
from server.pacs import dicomweb, dimse
from server.pacs.errors import (
    DeliveryError,
    RejectedDelivery,
    RetryableDelivery,
    SeriesNotFound,
    SourceUnavailable,
)

__all__ = ["DeliveryError", "RejectedDelivery", "RetryableDelivery", "SeriesNotFound", "SourceUnavailable",
           "deliver", "reachable", "retrieve"]

log = logging.getLogger(__name__)


def deliver(node: Node, path: Path, calling_ae_title: str, fallback: Path | None = None) -> str | None:
    """Send the object at ``path`` to ``node``. Returns a warning the destination stored it with (or None); raises
    a :class:`DeliveryError` unless it was acknowledged. ``fallback``: the BINARY SEG, for a DIMSE destination that
    refuses the LABELMAP one at association."""
    if isinstance(node, DicomWebNode):
        return dicomweb.store(node, path)
    return dimse.store(node, path, calling_ae_title, fallback)


def reachable(node: Node, calling_ae_title: str) -> bool:
    """A cheap check that the node answers (C-ECHO, or an HTTP request to the DICOMweb root)."""
    if isinstance(node, DicomWebNode):
        return dicomweb.ping(node)
    return dimse.echo(node, calling_ae_title)


def retrieve(node: Node, study_uid: str, series_uid: str, target: Path, calling_ae_title: str) -> int:
    """Write the series' instances to ``target``; returns how many."""
    if isinstance(node, DimseNode):
        count = dimse.retrieve(node, study_uid, series_uid, target, calling_ae_title)
    else:
        count = dicomweb.retrieve(node, study_uid, series_uid, target)
    if count == 0:
        raise SeriesNotFound(f"series {series_uid} of study {study_uid} is not on source {node.name!r}")
    log.info("pulled %d instance(s) from %s", count, node.name)
    return count
