"""The service's closed vocabularies, one enum each: never bare strings across module boundaries.

Every enum is a ``str`` enum, so its members compare equal to, and serialise (JSON, SQLite, OpenAPI) as, their
values: the wire format stays the documented strings.
"""

from __future__ import annotations

from enum import Enum


class InputKind(str, Enum):
    """What a job's input is."""

    NIFTI = "nifti"
    DICOM = "dicom"


class Output(str, Enum):
    """What a job is asked to write (the API's ``outputs``): the label map and/or the DICOM-SEG."""

    NIFTI = "nifti"
    DICOM_SEG = "dicom-seg"


class ResultFile(str, Enum):
    """The files a job leaves, with their media types. Label map and SEG answer an :class:`Output`; volumes and
    preview are always written."""

    LABELMAP = "labelmap.nii.gz"
    SEG = "seg.dcm"
    VOLUMES = "volumes.json"
    PREVIEW = "preview.png"

    @property
    def media_type(self) -> str:
        return _MEDIA[self]

    @property
    def download(self) -> bool:
        """Served as an attachment (the preview is shown inline)."""
        return self is not ResultFile.PREVIEW


_MEDIA = {ResultFile.LABELMAP: "application/gzip", ResultFile.SEG: "application/dicom",
          ResultFile.VOLUMES: "application/json", ResultFile.PREVIEW: "image/png"}


class SegType(str, Enum):
    """Segmentation Type (0062,0001) of the SEG ctseg writes."""

    BINARY = "BINARY"
    LABELMAP = "LABELMAP"


class SegCompression(str, Enum):
    """How the SEG's frames are encoded (its transfer syntax)."""

    NONE = "none"
    RLE = "rle"
    JPEG2000 = "jpeg2000"
    JPEGLS = "jpegls"


class OriginKind(str, Enum):
    """How a job's input reached the service."""

    UPLOAD = "upload"  # POST /v1/segmentations with files
    DIMSE = "dimse"  # C-STORE to the service's DICOM listener
    PULL = "pull"  # retrieved by UID from a configured source


class DestinationChoice(str, Enum):
    """Why a job's SEG goes where it goes: named in the request (a NIfTI input is then an error), back to the
    sender, or the default destinations (both dropped, with a note, for a NIfTI input)."""

    NAMED = "named"
    SENDER = "sender"
    DEFAULT = "default"


class ErrorKind(str, Enum):
    """Why a job failed: the input (a 422 for the sender), the service, a stop of the service, or memory."""

    INPUT = "input"
    INTERNAL = "internal"
    INTERRUPTED = "interrupted"
    OUT_OF_MEMORY = "out-of-memory"  # its run ran out of memory (cap, or the kernel's OOM killer): not run again


class DeliveryState(str, Enum):
    """A SEG on its way to a destination: waiting (first try or a retry), acknowledged, given up, or not sent
    because a later job on more of the same series replaced it."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class NodeKind(str, Enum):
    """How the service talks to a PACS node (destination or source)."""

    DICOMWEB = "dicomweb"
    DIMSE = "dimse"


OUTPUT_CHOICES = {"nifti": (Output.NIFTI,), "dicom-seg": (Output.DICOM_SEG,), "both": (Output.NIFTI, Output.DICOM_SEG)}


def parse_outputs(value: str) -> tuple[Output, ...]:
    """``nifti``, ``dicom-seg``, ``both``, or a comma-separated list of those (the API's ``outputs`` parameter)."""
    from server.core.errors import InputError

    out: list[Output] = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        if part not in OUTPUT_CHOICES:
            raise InputError(f"unknown output {part!r}; choose nifti, dicom-seg or both")
        out += [o for o in OUTPUT_CHOICES[part] if o not in out]
    if not out:
        raise InputError("outputs must name at least one of nifti, dicom-seg, both")
    return tuple(out)
