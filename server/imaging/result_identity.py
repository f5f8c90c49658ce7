"""The identifiers of one output object (SEG, RTSTRUCT, ...) of a result, derived from that result.

Series and SOP Instance UIDs come from pydicom's ``generate_uid`` with entropy sources (a SHA-512 hash under
ctseg's UID root) over the result (the job's id), the source series, the bundle, the object's SOP class and its
options. So two results, or two kinds of object of one result, never share a UID, while one result keeps its
UIDs across delivery retries: a resend replaces the instance in a PACS or TPS rather than adding one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import generate_uid

from models.bundle import Bundle
from server.imaging.dicom_reader import DicomSeries

# Where each kind of output's series number starts: the source's series number (mod 1000) is added, so a
# study's outputs sort by kind and name their source, and no two kinds of output of one source share a number.
SERIES_NUMBER_BASE = {"SEG": 9000, "RTSTRUCT": 8000}


@dataclass(frozen=True)
class ResultIdentity:
    """The UIDs, number and description of one output object of one result."""

    series_uid: str
    sop_instance_uid: str
    series_number: int
    description: str

    def __post_init__(self) -> None:
        if not self.series_uid or not self.sop_instance_uid or self.series_uid == self.sop_instance_uid:
            raise ValueError("an output needs a series UID and a different SOP Instance UID")
        if not 1 <= self.series_number <= 2**31 - 1:
            raise ValueError(f"series number out of range: {self.series_number}")


def result_identity(result_id: str, series: DicomSeries, bundle: Bundle, sop_class_uid: str, kind: str,
                    options: Sequence[str] = ()) -> ResultIdentity:
    """UIDs from (result, source series, bundle, SOP class, options); the series number from ``kind``'s base."""
    base = [result_id, series.series_uid, bundle.name, bundle.version, str(sop_class_uid), *options]
    source_number = getattr(series.datasets[0], "SeriesNumber", None)
    number = (int(source_number) if source_number not in (None, "") else 0) % 1000 + SERIES_NUMBER_BASE[kind]
    return ResultIdentity(generate_uid(entropy_srcs=[*base, "series"]), generate_uid(entropy_srcs=[*base, "instance"]),
                          number, f"ctseg {bundle.name} {bundle.version}"[:64])
