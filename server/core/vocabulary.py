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
    """What a job is asked to write (the API's ``outputs``): the label map, the DICOM-SEG, an RTSTRUCT, a DICOM SR
    with the volumes (TID 1500) and a key image (Secondary Capture)."""

    NIFTI = "nifti"
    DICOM_SEG = "dicom-seg"
    RTSTRUCT = "rtstruct"
    SR = "sr"
    SC = "sc"

    @property
    def needs_dicom(self) -> bool:
        """A DICOM object references its source instances, study and patient, which a NIfTI input lacks."""
        return self is not Output.NIFTI

    @property
    def title(self) -> str:
        """How notes and errors name it."""
        return _OUTPUT_TITLES[self]

    @property
    def result(self) -> ResultFile:
        """The file it is written to (and, for a DICOM object, what a destination is sent)."""
        return _OUTPUT_FILES[self]


_OUTPUT_TITLES = {Output.NIFTI: "NIfTI label map", Output.DICOM_SEG: "DICOM-SEG", Output.RTSTRUCT: "RTSTRUCT",
                  Output.SR: "DICOM SR", Output.SC: "key image (Secondary Capture)"}


class ResultFile(str, Enum):
    """The files a job leaves, with their media types. Label map, SEG, RTSTRUCT, SR and key image answer an
    :class:`Output`; volumes and preview are always written."""

    LABELMAP = "labelmap.nii.gz"
    SEG = "seg.dcm"
    SEG_BINARY = "seg-binary.dcm"  # beside a LABELMAP SEG, for a DIMSE destination that refuses that class
    RTSTRUCT = "rtstruct.dcm"
    SR = "sr.dcm"
    SC = "sc.dcm"
    VOLUMES = "volumes.json"
    PREVIEW = "preview.png"

    @property
    def media_type(self) -> str:
        return _MEDIA[self]

    @property
    def download(self) -> bool:
        """Served as an attachment (the preview is shown inline)."""
        return self is not ResultFile.PREVIEW


_OUTPUT_FILES = {Output.NIFTI: ResultFile.LABELMAP, Output.DICOM_SEG: ResultFile.SEG, Output.RTSTRUCT: ResultFile.RTSTRUCT,
                 Output.SR: ResultFile.SR, Output.SC: ResultFile.SC}
_MEDIA = {ResultFile.LABELMAP: "application/gzip", ResultFile.SEG: "application/dicom",
          ResultFile.SEG_BINARY: "application/dicom",
          ResultFile.RTSTRUCT: "application/dicom", ResultFile.SR: "application/dicom",
          ResultFile.SC: "application/dicom", ResultFile.VOLUMES: "application/json", ResultFile.PREVIEW: "image/png"}


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
    because a later job on more of the same series replaced it. ``held``: its route asks for review, so it waits
    for a person to release it (then pending) or discard it; ``discarded`` is that person's decision, kept apart
    from ``failed`` so that a rejected result never reads (or alerts) as a destination that failed."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    HELD = "held"
    DISCARDED = "discarded"


class NodeKind(str, Enum):
    """How the service talks to a PACS node (destination or source)."""

    DICOMWEB = "dicomweb"
    DIMSE = "dimse"


class QualityFlag(str, Enum):
    """Why a result may be wrong (server/imaging/quality.py): per label, or (the last three) per job. Written to
    volumes.json and the SR, shown on the job and counted in ``/metrics``."""

    TOUCHES_SCAN_END = "touches-scan-end"  # on the first or last slice: the organ may continue outside the scan
    TOUCHES_FOV_EDGE = "touches-fov-edge"  # on the image's in-plane border: cut by the field of view
    VOLUME_BELOW_REFERENCE = "volume-below-reference"  # under the bundle's reference range (reference_volume_ml)
    VOLUME_ABOVE_REFERENCE = "volume-above-reference"
    FRAGMENTED = "fragmented"  # several connected components, the largest holding under 90 % of the voxels
    LOW_MARGIN = "low-margin"  # many voxels where the model's two best classes were close
    HU_IMPLAUSIBLE = "hu-implausible"  # air not near -1000 HU or soft tissue off: a missing rescale?
    NO_STRUCTURE_FOUND = "no-structure-found"  # the field of view holds none of the model's organs

    @property
    def per_job(self) -> bool:
        return self in (QualityFlag.HU_IMPLAUSIBLE, QualityFlag.NO_STRUCTURE_FOUND)


OUTPUT_CHOICES = {"nifti": (Output.NIFTI,), "dicom-seg": (Output.DICOM_SEG,), "rtstruct": (Output.RTSTRUCT,),
                  "sr": (Output.SR,), "sc": (Output.SC,), "both": (Output.NIFTI, Output.DICOM_SEG)}
OUTPUT_NAMES = ", ".join(OUTPUT_CHOICES)


def parse_outputs(value: str) -> tuple[Output, ...]:
    """A comma-separated list of output names (the API's ``outputs`` parameter); ``both`` is ``nifti,dicom-seg``."""
    from server.core.errors import InputError

    out: list[Output] = []
    for part in (p.strip().lower() for p in value.split(",") if p.strip()):
        if part not in OUTPUT_CHOICES:
            raise InputError(f"unknown output {part!r}; choose one or more of {OUTPUT_NAMES} (comma separated)")
        out += [o for o in OUTPUT_CHOICES[part] if o not in out]
    if not out:
        raise InputError(f"outputs must name at least one of {OUTPUT_NAMES}")
    return tuple(out)
