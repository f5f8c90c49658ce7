"""DICOM series in, a typed Volume out — robust to what real scanners and anonymisers produce.

Slices are grouped by SeriesInstanceUID and sorted by the projection of ImagePositionPatient on the slice
normal (never InstanceNumber). Checked: one orientation, uniform spacing (missing slices and duplicates are
named); applied: rescale slope/intercept, pixel padding, gantry tilt (resampled to an orthogonal grid:
server/imaging/tilt.py). Compressed transfer syntaxes decode through pydicom's pylibjpeg plugins; Enhanced
(multi-frame) CT is read frame by frame.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    generate_uid,
)

from models.volume import Geometry, GeometryError, Volume
from server.core.bounds import MB, SETTING, DicomBounds
from server.core.errors import InputError
from server.core.options import PhaseChoice
from server.imaging.inflate import InflateError, Inflater
from server.imaging.sop import CT_IMAGE_STORAGE
from server.imaging.tilt import Tilt, plan_tilt

log = logging.getLogger(__name__)

POSITION_TOL_MM = 0.01
SPACING_REL_TOL = 0.05
# How far (in slice gaps) any slice may lie from the uniform grid the volume assumes. Gaps each within
# SPACING_REL_TOL can still add up (100 gaps of 1.00 mm then 99 of 1.04 mm: the last slice 3.96 mm off).
CUMULATIVE_TOL = 0.2
PHASE_KEYS = ("AcquisitionNumber", "AcquisitionTime", "ContentTime")  # what tells acquisitions apart, in order
AIR_HU = -1024.0


@dataclass
class Frame:
    """One plane of pixels with its geometry; from a single-frame instance or a frame of an enhanced one."""

    dataset: Dataset
    frame_index: int | None  # None: single-frame instance
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float


@dataclass
class DicomSeries:
    """A sorted, checked series and the volume it makes."""

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    description: str
    datasets: list[Dataset]  # instances in slice order (one entry for an enhanced multi-frame instance)
    volume: Volume
    notes: list[str] = field(default_factory=list)
    multiframe: bool = False
    tilt: Tilt | None = None  # gantry tilt: ``volume`` is the orthogonal grid, not the source slices
    lossy_methods: tuple[str, ...] = ()  # lossy compressions among the instances (lossy_method); empty: none

    @property
    def lossy(self) -> bool:
        """The pixels were lossy-compressed: the SEG must say so (LossyImageCompression 01)."""
        return bool(self.lossy_methods)

    def to_slices(self, labels: np.ndarray) -> np.ndarray:
        """Labels on ``volume``'s grid -> on the source slices (in slice order), where a SEG's frames lie."""
        return self.tilt.to_slices(labels) if self.tilt is not None else labels


@dataclass
class SeriesSummary:
    series_uid: str
    description: str
    modality: str
    slices: int


RAW_DATASET_GROUPS = (b"\x08\x00", b"\x02\x00")  # a dataset written without the Part-10 header starts here


@dataclass
class ReadReport:
    """What reading an upload skipped or repaired; becomes notes on the job (counts only, never file names)."""

    not_dicom: int = 0
    not_images: int = 0
    without_part10_header: int = 0

    def notes(self) -> list[str]:
        out = []
        if self.not_dicom:
            out.append(f"{self.not_dicom} file(s) that are not DICOM were skipped (e.g. README, DICOMDIR viewers, "
                       "autorun files)")
        if self.not_images:
            out.append(f"{self.not_images} DICOM object(s) that are not images were skipped (DICOMDIR, reports, "
                       "presentation states)")
        if self.without_part10_header:
            out.append(f"{self.without_part10_header} file(s) without the DICOM Part-10 header were read as raw "
                       "data sets")
        return out


def _source(data: object) -> object:
    return io.BytesIO(data) if isinstance(data, bytes) else data


def _head(data: object, n: int = 8) -> bytes:
    if isinstance(data, bytes):
        return data[:n]
    with open(data, "rb") as f:  # type: ignore[call-overload]
        return f.read(n)


def _size(data: object) -> int:
    return len(data) if isinstance(data, bytes) else Path(data).stat().st_size  # type: ignore[arg-type]


@contextmanager
def _binary(data: object) -> Iterator[BinaryIO]:
    if isinstance(data, bytes):
        yield io.BytesIO(data)
    else:
        with open(data, "rb") as f:  # type: ignore[call-overload]
            yield f


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 2


# A header read leaves values larger than this on disk (read only if asked for, which staging never is): an
# overlay, an icon or a private blob of hundreds of MB before the pixel data costs the API process nothing.
DEFER_BYTES = 256 * 1024


def _defer(data: object, headers_only: bool) -> int | None:
    return DEFER_BYTES if headers_only and not isinstance(data, bytes) else None


PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float, pixel data
FIRST_HEADER_STEP = 1 << 20  # a deflated header is inflated 1 MiB, then 4, 16... up to the bound


def _parse(data: object, headers_only: bool, bounds: DicomBounds, where: str) -> tuple[Dataset, int]:
    """One Part-10 file -> its data set and the bytes that hold it (the file's size; inflated, for deflate).
    InvalidDicomError where the 'DICM' marker is missing."""
    with _binary(data) as fp:
        preamble = read_preamble(fp, force=False)
        try:
            meta = FileMetaDataset(read_dataset(fp, False, True, stop_when=_past_file_meta))
            deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        except (ValueError, TypeError, KeyError, EOFError, NotImplementedError, struct.error):
            # an odd file meta: pydicom's own reader decides (and names the fault)
            deflated = False
        if deflated:
            return _read_deflated(fp, preamble, meta, data, headers_only, bounds, where)
    return pydicom.dcmread(_source(data), force=False, stop_before_pixels=headers_only,
                           defer_size=_defer(data, headers_only)), _size(data)


def _read_deflated(fp: BinaryIO, preamble: bytes | None, meta: FileMetaDataset, data: object, headers_only: bool,
                   bounds: DicomBounds, where: str) -> tuple[Dataset, int]:
    """A deflated data set inflated under ``bounds`` (pydicom would inflate it whole, unbounded): the header
    first, at most ``max_header_bytes`` in memory, and its declared sizes checked; then the rest, counted and
    dropped for a header read, kept for a full read. More than the declared pixel data plus ``max_header_bytes``
    is refused: a deflate bomb."""
    stream = Inflater(fp)
    head = b""
    target = min(FIRST_HEADER_STEP, bounds.max_header_bytes)
    while True:
        head += stream.read(target - len(head))
        found = False

        def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
            nonlocal found
            found = found or tag in PIXEL_DATA_TAGS
            return found

        try:
            header = read_dataset(DicomBytesIO(head), False, True, stop_when=stop)
        except Exception:
            if stream.done:
                raise
            header = None  # cut inside an element: inflate further
        if header is not None and (found or stream.done):
            break
        if len(head) >= bounds.max_header_bytes:
            raise InputError(f"{where} is deflated and its header inflates past "
                             f"{bounds.max_header_bytes / MB:g} MB ({SETTING['max_header_bytes']})")
        target = min(4 * target, bounds.max_header_bytes)
    check_declared(where, header, bounds)
    declared = _declared(header)
    allowed = bounds.max_header_bytes + (declared[3] * declared[2] if declared else 0)
    if headers_only:
        body = None
        stream.skip(allowed - stream.total)
    else:
        body = head + stream.read(allowed - stream.total)
    if not stream.done and stream.read(1):
        raise InputError(f"{where} is deflated and inflates past its declared pixel data plus "
                         f"{bounds.max_header_bytes / MB:g} MB ({SETTING['max_header_bytes']}): a deflate bomb?")
    dataset = header if body is None else read_dataset(DicomBytesIO(body), False, True)
    ds = FileDataset(str(data) if not isinstance(data, bytes) else io.BytesIO(), dataset, preamble, meta,
                     is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds, stream.total


def read_header(source: Path | str | bytes, bounds: DicomBounds | None = None) -> Dataset:
    """One DICOM file's data set without its pixel data, read as staging reads an upload's files: a deflated
    data set inflated under the bound (``bounds.max_header_bytes`` in memory), every declared size checked,
    nothing decoded. For files that arrive outside an upload (the DICOM listener's). InputError names the
    problem: not DICOM, damaged, past a bound."""
    ds = _read_one(0, source, True, ReadReport(), bounds or DicomBounds(), "the file")
    if ds is None:
        raise InputError("the file is not DICOM")
    return ds


def _read_one(index: int, data: object, headers_only: bool, report: ReadReport, bounds: DicomBounds,
              where: str | None = None) -> Dataset | None:
    """One file -> a data set, ``None`` for a file that is not DICOM; a damaged DICOM file is an InputError."""
    where = where or f"file {index + 1} of the upload"
    try:
        ds, size = _parse(data, headers_only, bounds, where)
    except InvalidDicomError:
        if _head(data)[:2] not in RAW_DATASET_GROUPS:
            return None
        try:  # a data set without preamble and file meta, as older archives store them
            ds = pydicom.dcmread(_source(data), force=True, stop_before_pixels=headers_only,
                                 defer_size=_defer(data, headers_only))
        except Exception:
            return None
        if "SOPInstanceUID" not in ds and "ImagePositionPatient" not in ds:
            return None
        implicit, little = ds.original_encoding
        ds.file_meta = FileMetaDataset()  # what the missing header would have said: how the data set is encoded
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if "SOPClassUID" in ds:
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        report.without_part10_header += 1
        size = _size(data)
    except InputError:
        raise
    except InflateError as err:
        raise InputError(f"{where} is a damaged DICOM file: {err}") from None
    except Exception as err:  # it says it is DICOM (the 'DICM' marker) and cannot be parsed
        raise InputError(f"{where} is a damaged DICOM file ({type(err).__name__}): "
                         "its header cannot be read") from None
    is_image = ("Rows" in ds or "ImagePositionPatient" in ds or "PerFrameFunctionalGroupsSequence" in ds
                or str(ds.get("SOPClassUID", "")) in CT_IMAGE_STORAGE)
    if headers_only and is_image:
        _check_complete(where, ds, size)
        check_declared(where, ds, bounds)
    if not headers_only and is_image and "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InputError(f"{where} is a damaged DICOM image: it ends before its pixel data")
    _mark_lossy(ds)
    return ds


def _declared(ds: Dataset) -> tuple[int, int, int, int] | None:
    """(Rows, Columns, frames, bytes of one decoded frame) as the header declares them; None where they are
    missing or not numbers (the callers name that)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        per_sample = (int(ds.BitsAllocated) + 7) // 8
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return rows, cols, frames, rows * cols * per_sample * samples


def _check_complete(where: str, ds: Dataset, size: int) -> None:
    """A header read stops before the pixels: check the file (inflated, for deflate) goes on far enough to hold
    them. Encapsulated pixel data has no size to check: its declared sizes are bounded (check_declared)."""
    declared = _declared(ds)
    if declared is None:
        raise InputError(f"{where} is a damaged DICOM image: its header ends early "
                         "(Rows, Columns or BitsAllocated missing)")
    rows, cols, frames, frame_bytes = declared
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    compressed = bool(syntax is not None and syntax.is_compressed)
    if not compressed and size < frames * frame_bytes:
        raise InputError(f"{where} is a damaged DICOM image: its pixel data is shorter than "
                         f"its header says ({rows}x{cols}x{frames} pixels)")


def check_declared(where: str, ds: Dataset, bounds: DicomBounds) -> None:
    """Every size the header declares, bounded before anything is decoded, whatever the transfer syntax: a few
    kilobytes of RLE or JPEG 2000 can declare gigabytes. The refusal names the value and the setting."""
    declared = _declared(ds)
    if declared is None:
        return
    rows, cols, frames, frame_bytes = declared
    if max(rows, cols) > bounds.max_rows_columns:
        raise InputError(f"{where} declares images of {rows}x{cols} pixels (Rows x Columns); at most "
                         f"{bounds.max_rows_columns} rows and columns are accepted ({SETTING['max_rows_columns']})")
    if frames > bounds.max_frames:
        raise InputError(f"{where} declares {frames} frames (NumberOfFrames); at most {bounds.max_frames} are "
                         f"accepted ({SETTING['max_frames']})")
    if rows * cols * frames > bounds.max_volume_voxels:  # one instance past the whole series' bound: refused
        raise InputError(f"{where} declares {rows * cols * frames:,} voxels ({rows}x{cols} pixels x {frames} "  # before
                         f"frames); at most {bounds.max_volume_voxels:,} are accepted "  # a deflated body is counted
                         f"({SETTING['max_volume_voxels']} {bounds.max_volume_voxels / 1e6:g})")
    if frame_bytes > bounds.max_frame_bytes:
        raise InputError(f"{where} declares frames of {frame_bytes:,} bytes decoded ({rows}x{cols} pixels, "
                         f"SamplesPerPixel {ds.get('SamplesPerPixel', 1)}, BitsAllocated {ds.get('BitsAllocated')}); "
                         f"at most {bounds.max_frame_bytes:,} are accepted ({SETTING['max_frame_bytes']} "
                         f"{bounds.max_frame_bytes / MB:g})")


def check_volume(items: list[Dataset], bounds: DicomBounds) -> None:
    """The chosen series' declared voxels (Rows x Columns x frames of all its instances), bounded."""
    voxels = sum(d[0] * d[1] * d[2] for d in map(_declared, items) if d is not None)
    if voxels > bounds.max_volume_voxels:
        raise InputError(f"the series declares {voxels:,} voxels ({len(items)} instance(s)); at most "
                         f"{bounds.max_volume_voxels:,} are accepted ({SETTING['max_volume_voxels']} "
                         f"{bounds.max_volume_voxels / 1e6:g})")


# Transfer syntaxes that may lose information, with the LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5) each
# implies; a header's LossyImageCompression 01 says the pixels were lossy-compressed before, whatever encodes
# them now.
LOSSY_TRANSFER_SYNTAXES: dict[str, tuple[str, str]] = {
    JPEGBaseline8Bit: ("JPEG baseline", "ISO_10918_1"),
    JPEGExtended12Bit: ("JPEG extended", "ISO_10918_1"),
    JPEG2000: ("JPEG 2000", "ISO_15444_1"),
    JPEGLSNearLossless: ("JPEG-LS near-lossless", "ISO_14495_1"),
}


def lossy_method(ds: Dataset) -> str | None:
    """How an instance's pixels were lossy-compressed ("JPEG baseline", ...), None where they were not."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    if syntax in LOSSY_TRANSFER_SYNTAXES:
        return LOSSY_TRANSFER_SYNTAXES[syntax][0]
    if str(ds.get("LossyImageCompression", "") or "").strip() == "01":
        method = ds.get("LossyImageCompressionMethod") or []
        methods = [method] if isinstance(method, str) else list(method)
        return f"earlier lossy compression {'/'.join(str(m) for m in methods)}".strip()
    return None


def _mark_lossy(ds: Dataset) -> None:
    """A lossy transfer syntax says so in the header too (LossyImageCompression 01 and its method), as PS3.3
    asks of any image derived from lossy pixels: highdicom copies them into the SEG from its source."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    if syntax in LOSSY_TRANSFER_SYNTAXES and str(ds.get("LossyImageCompression", "") or "").strip() != "01":
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = LOSSY_TRANSFER_SYNTAXES[syntax][1]


def lossy_methods(items: list[Dataset]) -> tuple[str, ...]:
    """The lossy compressions among a series' instances (empty: none)."""
    return tuple(sorted({m for m in map(lossy_method, items) if m is not None}))


def lossy_note(items: list[Dataset]) -> list[str]:
    methods = lossy_methods(items)
    if not methods:
        return []
    count = sum(1 for ds in items if lossy_method(ds) is not None)
    return [(f"lossy-compressed input ({', '.join(methods)}): {count} of {len(items)} instance(s); the "
             "segmentation ran on pixels the compression altered, and the DICOM-SEG says so (LossyImageCompression "
             "01)")]


def read_datasets(blobs: Iterable[tuple[str, object]], headers_only: bool = False,
                  report: ReadReport | None = None, bounds: DicomBounds | None = None) -> list[Dataset]:
    """Parse uploaded files. Files that are not DICOM and DICOM objects that are not images are skipped (counted in
    ``report``); a damaged DICOM file is a 422 saying so; no image at all is a 422. A header read checks each
    file's declared sizes against ``bounds``."""
    report = report if report is not None else ReadReport()
    bounds = bounds or DicomBounds()
    datasets = []
    for index, (_, data) in enumerate(blobs):
        ds = _read_one(index, data, headers_only, report, bounds)
        if ds is None:
            report.not_dicom += 1
            continue
        if "ImagePositionPatient" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
            report.not_images += 1  # DICOMDIR, SR, presentation states: not image slices
            continue
        _repair_sop_class(ds)
        datasets.append(ds)
    if not datasets:
        found = f" ({report.not_dicom} file(s) not DICOM, {report.not_images} non-image object(s))" \
            if report.not_dicom or report.not_images else ""
        raise InputError(f"no DICOM image found in the upload{found}")
    return datasets


def _repair_sop_class(ds: Dataset) -> None:
    """Anonymisers blank SOPClassUID and leave the file meta intact: take MediaStorageSOPClassUID (a SEG must
    reference each source by its class)."""
    meta = getattr(ds, "file_meta", None)
    media_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "").strip() if meta is not None else ""
    if not _uid(ds, "SOPClassUID") and media_class:
        ds.SOPClassUID = media_class


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(getattr(ds, keyword, "") or "").strip()
    return value


def group_series(datasets: list[Dataset]) -> dict[str, list[Dataset]]:
    groups: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        groups[_uid(ds, "SeriesInstanceUID")].append(ds)
    return dict(groups)


def summarise(uid: str, items: list[Dataset]) -> SeriesSummary:
    first = items[0]
    frames = sum(int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in items)
    return SeriesSummary(uid or "(missing)", str(getattr(first, "SeriesDescription", "") or ""),
                         str(getattr(first, "Modality", "") or ""), frames)


def choose_series(groups: dict[str, list[Dataset]], series_uid: str | None, modalities: set[str]) -> tuple[str, list[Dataset]]:
    if series_uid:
        if series_uid not in groups:
            listing = [summarise(u, g).__dict__ for u, g in groups.items()]
            raise InputError(f"series {series_uid} is not in the upload", {"series": listing})
        modality = str(getattr(groups[series_uid][0], "Modality", "") or "").upper()
        if modality not in modalities:  # naming a series does not bypass what the model accepts
            raise InputError(f"series {series_uid} has modality {modality or '(none)'}; the model takes "
                             f"{'/'.join(sorted(modalities))}")
        return series_uid, groups[series_uid]
    candidates = {u: g for u, g in groups.items() if str(getattr(g[0], "Modality", "") or "").upper() in modalities}
    if not candidates:
        found = sorted({str(getattr(g[0], "Modality", "") or "?") for g in groups.values()})
        raise InputError(f"no {'/'.join(sorted(modalities))} series in the upload (found modality {', '.join(found)})")
    if len(candidates) > 1:
        listing = [summarise(u, g).__dict__ for u, g in candidates.items()]
        raise InputError(
            f"the upload holds {len(candidates)} candidate series; choose one with series_uid", {"series": listing}
        )
    uid = next(iter(candidates))
    return uid, candidates[uid]


def _floats(value: object, n: int, what: str, ds: Dataset) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.size != n:
        raise InputError(f"instance {getattr(ds, 'InstanceNumber', '?')}: {what} is missing or malformed")
    return arr


def frames_of(ds: Dataset) -> list[Frame]:
    """Single-frame CT, or every frame of an Enhanced CT instance (functional groups)."""
    nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or nframes > 1:
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
        per = ds.get("PerFrameFunctionalGroupsSequence", [])
        if len(per) != nframes:
            raise InputError(f"multi-frame instance has {nframes} frames but {len(per)} per-frame groups")
        out = []
        for i, item in enumerate(per):
            def pick(seq: str) -> Dataset | None:
                for src in (item, shared):
                    if seq in src and len(src[seq].value):
                        return src[seq].value[0]
                return None

            pos = pick("PlanePositionSequence")
            ori = pick("PlaneOrientationSequence")
            meas = pick("PixelMeasuresSequence")
            trans = pick("PixelValueTransformationSequence")
            if pos is None or ori is None or meas is None:
                raise InputError(f"multi-frame instance frame {i + 1}: plane position, orientation or pixel measures missing")
            spacing = _floats(meas.PixelSpacing, 2, "PixelSpacing", ds)
            out.append(Frame(
                ds, i, _floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", ds),
                _floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", ds), (spacing[0], spacing[1]),
                float(getattr(trans, "RescaleSlope", 1) or 1) if trans is not None else 1.0,
                float(getattr(trans, "RescaleIntercept", 0) or 0) if trans is not None else 0.0,
            ))
        return out
    spacing = _floats(getattr(ds, "PixelSpacing", None) or [], 2, "PixelSpacing", ds)
    return [Frame(
        ds, None, _floats(getattr(ds, "ImagePositionPatient", None) or [], 3, "ImagePositionPatient", ds),
        _floats(getattr(ds, "ImageOrientationPatient", None) or [], 6, "ImageOrientationPatient", ds),
        (spacing[0], spacing[1]), float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0),
    )]


def _pixels(frame: Frame, cache: dict[int, np.ndarray]) -> np.ndarray:
    ds = frame.dataset
    key = id(ds)
    if key not in cache:
        try:
            cache[key] = ds.pixel_array
        except Exception as err:
            ts = getattr(ds.file_meta, "TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
            raise InputError(f"cannot decode pixel data (transfer syntax {ts}): {err}") from None
    arr = cache[key]
    plane = arr[frame.frame_index] if frame.frame_index is not None else arr
    if plane.ndim != 2:
        raise InputError(f"expected grey-scale slices; got pixel array of shape {plane.shape}")
    values = plane.astype(np.float32)
    padding = getattr(ds, "PixelPaddingValue", None)
    if padding is not None:
        pad_mask = plane == padding
        limit = getattr(ds, "PixelPaddingRangeLimit", None)
        if limit is not None:
            lo, hi = sorted((int(padding), int(limit)))
            pad_mask = (plane >= lo) & (plane <= hi)
    else:
        pad_mask = None
    values = values * frame.slope + frame.intercept
    if pad_mask is not None:
        values[pad_mask] = AIR_HU
    return values


@dataclass
class SeriesPlan:
    """A checked slice order and geometry, made from headers alone."""

    frames: list[Frame]
    geometry: Geometry  # the grid the volume is on: orthogonal, also for a tilted series
    notes: list[str]
    tilt: Tilt | None = None  # a gantry-tilted series: how its slices lie on that grid


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(getattr(ds, "NumberOfFrames", 1) or 1) > 1


def _check_one_multiframe(items: list[Dataset]) -> None:
    """A SEG of a multi-frame source references that one instance and its frames (highdicom takes no other): a
    series of several Enhanced CT instances, or one mixed with single-frame images, is refused here, at staging,
    rather than after the whole inference."""
    multi = sum(1 for ds in items if _is_multiframe(ds))
    if multi and len(items) > 1:
        single = len(items) - multi
        raise InputError(
            f"the series holds {multi} multi-frame (Enhanced CT) instance(s)"
            + (f" and {single} single-frame image(s)" if single else "")
            + ": a volume is read from one Enhanced CT instance or from single-frame images only; send one of them "
            "(if they are phases, each instance should carry its own AcquisitionNumber)")


def _check_uniform_grid(dist: np.ndarray) -> float:
    """The volume puts slice i at first + i * step (step: first to last slice over the gaps). Each slice's actual
    position is checked against that, so small per-gap differences that add up are refused, naming the worst
    offset and where it is. Returns the step."""
    step = float((dist[-1] - dist[0]) / (len(dist) - 1))
    offsets = dist - (dist[0] + step * np.arange(len(dist)))
    worst = int(np.argmax(np.abs(offsets)))
    tolerance = CUMULATIVE_TOL * step
    if abs(offsets[worst]) > tolerance:
        gaps = np.diff(dist)
        raise InputError(
            f"slice positions drift off a uniform grid: slice {worst + 1} of {len(dist)} (at {dist[worst]:.2f} mm "
            f"along the slice normal) lies {offsets[worst]:+.2f} mm from where a uniform spacing of {step:.3f} mm "
            f"puts it (tolerance {tolerance:.2f} mm, {CUMULATIVE_TOL:g} of a slice gap); gaps range from "
            f"{gaps.min():.3f} to {gaps.max():.3f} mm. Resample the series to uniform spacing first",
            {"drift": {"slice": worst + 1, "slices": len(dist), "position_mm": round(float(dist[worst]), 3),
                       "offset_mm": round(float(offsets[worst]), 3), "spacing_mm": round(step, 4),
                       "tolerance_mm": round(tolerance, 3)}})
    return step


def _is_localizer(ds: Dataset) -> bool:
    value = ds.get("ImageType") or []
    values = [value] if isinstance(value, str) else list(value)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=1e-3))


def drop_other_images(items: list[Dataset]) -> tuple[list[Dataset], list[str]]:
    """Localizers (scouts: ImageType LOCALIZER) and single images of another orientation than most of the series
    are not part of its volume: left out, as dcm2niix and viewers do, with a note (counts only). Without a clear
    majority orientation nothing is left out (plan_series refuses the mix)."""
    localizers = [ds for ds in items if _is_localizer(ds)]
    rest = [ds for ds in items if not _is_localizer(ds)]
    if not rest:
        return items, []
    orientation = {id(ds): frames_of(ds)[0].orientation for ds in rest}
    counts: list[tuple[np.ndarray, int]] = []  # each orientation and how many frames have it
    for ds in rest:
        n = int(getattr(ds, "NumberOfFrames", 1) or 1) if _is_multiframe(ds) else 1
        for i, (ori, c) in enumerate(counts):
            if _same_orientation(ori, orientation[id(ds)]):
                counts[i] = (ori, c + n)
                break
        else:
            counts.append((orientation[id(ds)], n))
    main, main_count = max(counts, key=lambda oc: oc[1])
    other: list[Dataset] = []
    if 2 * main_count > sum(c for _, c in counts):
        other = [ds for ds in rest if not _is_multiframe(ds) and not _same_orientation(orientation[id(ds)], main)]
    kept = [ds for ds in rest if not any(ds is o for o in other)]
    notes = []
    if localizers:
        notes.append(f"{len(localizers)} localizer (scout) image(s) were left out of the volume")
    if other:
        notes.append(f"{len(other)} image(s) with a different ImageOrientationPatient than the volume's were left "
                     "out of it (reformats or scouts)")
    return kept, notes


def _seconds(value: object) -> float | None:
    """DICOM TM (HHMMSS.FFFFFF, shorter forms, old HH:MM:SS) -> seconds of the day."""
    text = str(value or "").strip().replace(":", "")
    if not text:
        return None
    try:
        whole, _, frac = text.partition(".")
        hh, mm, ss = int(whole[0:2]), int(whole[2:4] or 0), int(whole[4:6] or 0)
        return hh * 3600 + mm * 60 + ss + (float("0." + frac) if frac else 0.0)
    except ValueError:
        return None


def _phase_key(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if keyword == "AcquisitionNumber":
        try:
            return float(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None
    return _seconds(value)


def _days(ds: Dataset, *keywords: str) -> int:
    """The first of ``keywords`` that holds a DA value (YYYYMMDD), as a day number; 0 where none does."""
    for keyword in keywords:
        text = str(ds.get(keyword) or "").strip()
        if len(text) >= 8 and text[:8].isdigit():
            try:
                return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8])).toordinal()
            except ValueError:
                continue
    return 0


def _moment(ds: Dataset) -> float | None:
    """When an instance was acquired, in seconds, its date included (a study across midnight keeps its order)."""
    for time_kw, date_kws in (("AcquisitionTime", ("AcquisitionDate", "ContentDate", "SeriesDate", "StudyDate")),
                              ("ContentTime", ("ContentDate", "AcquisitionDate", "SeriesDate", "StudyDate"))):
        seconds = _seconds(ds.get(time_kw))
        if seconds is not None:
            return _days(ds, *date_kws) * 86400.0 + seconds
    return None


def _start_time(group: list[Dataset]) -> float:
    times = [t for t in map(_moment, group) if t is not None]
    return min(times) if times else float("inf")


def split_phases(items: list[Dataset]) -> list[list[Dataset]]:
    """A series holding the same slice positions more than once (contrast phases, repeated acquisitions), split
    into its acquisitions in time order: by AcquisitionNumber, else AcquisitionTime, else ContentTime. Instances
    of consecutive values are one acquisition while their positions do not repeat (step-and-shoot scanners number
    each rotation). A series whose positions are all distinct is one volume. No split found: ``[items]``, which
    plan_series refuses naming the repeated positions."""
    frames = {id(ds): frames_of(ds) for ds in items}
    ori = frames[id(items[0])][0].orientation
    if any(not _same_orientation(f.orientation, ori) for fs in frames.values() for f in fs):
        return [items]
    row_dir, col_dir = ori[:3] / np.linalg.norm(ori[:3]), ori[3:] / np.linalg.norm(ori[3:])
    normal = np.cross(row_dir, col_dir)
    dists = {key: [float(np.dot(f.position, normal)) for f in fs] for key, fs in frames.items()}

    def repeats(group: list[Dataset]) -> bool:
        values = np.sort([d for ds in group for d in dists[id(ds)]])
        return bool((np.diff(values) < POSITION_TOL_MM).any())

    if not repeats(items):
        return [items]
    for keyword in PHASE_KEYS:
        values = [_phase_key(ds, keyword) for ds in items]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        blocks: dict[float, list[Dataset]] = defaultdict(list)
        for ds, value in zip(items, values):
            blocks[value].append(ds)  # type: ignore[index]
        phases: list[list[Dataset]] = []
        for value in sorted(blocks, key=lambda v: (_start_time(blocks[v]), v)):
            block = blocks[value]
            if repeats(block):
                break  # this key does not tell the acquisitions apart
            if phases and not repeats(phases[-1] + block):
                phases[-1] = phases[-1] + block
            else:
                phases.append(list(block))
        else:
            if len(phases) > 1:
                return phases
    return [items]


def _phase_summary(number: int, group: list[Dataset]) -> dict[str, object]:
    """What the 422 lists for one phase: no UIDs, no patient data."""
    acquisition = {_phase_key(ds, "AcquisitionNumber") for ds in group}
    start = _start_time(group)
    return {
        "number": number,
        "slices": sum(int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in group),
        "acquisition_number": int(next(iter(acquisition))) if len(acquisition) == 1 and None not in acquisition
        else None,
        "time": (f"{int(start % 86400 // 3600):02d}:{int(start % 3600 // 60):02d}:{int(start % 60):02d}"
                 if start != float("inf") else None),
    }


def choose_phase(phases: list[list[Dataset]], choice: PhaseChoice | None) -> tuple[list[Dataset], list[str]]:
    """One acquisition of the series: the only one, or the one ``choice`` names; otherwise a 422 listing them."""
    if len(phases) == 1 and (choice is None or choice.index(1) == 0):
        return phases[0], []
    listing = [_phase_summary(i + 1, p) for i, p in enumerate(phases)]
    if choice is None:
        raise InputError(
            f"the series holds {len(phases)} acquisitions (phases) of the same slice positions; choose one with "
            f"phase=first, last or its number (1 to {len(phases)}), as listed", {"phases": listing})
    index = choice.index(len(phases))
    if index is None:
        raise InputError(f"phase {choice} was asked for; the series holds {len(phases)} acquisition(s)",
                         {"phases": listing})
    note = (f"the series holds {len(phases)} acquisitions (phases); phase {index + 1} of them "
            f"({listing[index]['slices']} slices, phase={choice}) was segmented, the others left out")
    return phases[index], [note]


def volume_items(items: list[Dataset], phase: PhaseChoice | None = None) -> tuple[list[Dataset], list[str]]:
    """The instances of a series that make its volume, decided here once for staging and for reading: localizers
    and images of another orientation left out, one acquisition where the series holds several."""
    kept, notes = drop_other_images(items)
    chosen, phase_notes = choose_phase(split_phases(kept), phase)
    return chosen, notes + phase_notes


@contextmanager
def _naming_left_out(notes: list[str]) -> Iterator[None]:
    """A refusal of what is left names what was left out (a dropped image can be the reason for a gap)."""
    try:
        yield
    except InputError as err:
        if not notes:
            raise
        raise InputError(f"{err} ({'; '.join(notes)})", err.detail) from None


def plan_series(items: list[Dataset]) -> SeriesPlan:
    """Sort and check the slices of one series from their headers; every refusal says why."""
    notes: list[str] = []
    _check_one_multiframe(items)
    frames = [f for ds in items for f in frames_of(ds)]
    first = frames[0].dataset
    ori = frames[0].orientation
    if any(not np.allclose(f.orientation, ori, atol=1e-3) for f in frames):
        raise InputError("slices have different ImageOrientationPatient: not one volume (localizer or mixed series?)")
    if any(not np.allclose(f.pixel_spacing, frames[0].pixel_spacing, rtol=1e-3) for f in frames):
        raise InputError("slices have different PixelSpacing: not one volume")
    try:
        shapes = {(int(f.dataset.Rows), int(f.dataset.Columns)) for f in frames}
    except (AttributeError, TypeError, ValueError):
        raise InputError("Rows or Columns is missing or not a number in some slices") from None
    if len(shapes) > 1:
        raise InputError(f"slices have different sizes {sorted(shapes)}: not one volume")
    row_dir = ori[:3] / np.linalg.norm(ori[:3])
    col_dir = ori[3:] / np.linalg.norm(ori[3:])
    normal = np.cross(row_dir, col_dir)
    dist = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(dist, kind="stable")
    frames = [frames[i] for i in order]
    dist = dist[order]
    if len(frames) < 2:
        raise InputError("a single slice is not a volume; send the whole series")
    gaps = np.diff(dist)
    dupes = int((np.abs(gaps) < POSITION_TOL_MM).sum())
    if dupes:
        raise InputError(
            f"{dupes} slice position(s) occur more than once: the series holds several phases or acquisitions; "
            "neither AcquisitionNumber, AcquisitionTime nor ContentTime tells them apart; send one of them"
        )
    spacing = float(np.median(gaps))
    deviation = np.abs(gaps - spacing) / spacing
    if deviation.max() > SPACING_REL_TOL:
        worst = int(np.argmax(deviation))
        missing = np.round(gaps / spacing).astype(int) - 1
        if missing.max() >= 1:
            raise InputError(
                f"{int(missing[missing > 0].sum())} slice(s) missing: gap of {gaps[worst]:.2f} mm between positions "
                f"{dist[worst]:.2f} and {dist[worst + 1]:.2f} mm where the spacing is {spacing:.2f} mm"
            )
        raise InputError(f"slice spacing varies from {gaps.min():.2f} to {gaps.max():.2f} mm; uniform spacing is required")
    spacing = _check_uniform_grid(dist)
    rows, cols = shapes.pop()
    # Gantry tilt: the slice stack advances off the slice normal; the volume is put on an orthogonal grid.
    tilt, origin, tilt_notes = plan_tilt(np.stack([f.position for f in frames]), row_dir, col_dir, normal,
                                         frames[0].pixel_spacing, rows, cols)
    notes += tilt_notes
    if str(getattr(first, "PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        notes.append("MONOCHROME1 input: inversion is a display setting; HU come from the rescale (modality LUT)")
    direction = np.stack([row_dir, col_dir, normal], axis=1)  # columns: x (columns), y (rows), z (slices)
    geometry = Geometry(
        shape=tilt.grid_shape if tilt is not None else (len(frames), rows, cols),
        spacing=(spacing, frames[0].pixel_spacing[0], frames[0].pixel_spacing[1]),
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.flatten()),
    )
    return SeriesPlan(frames, geometry, notes, tilt)


def _stack(frames: list[Frame]) -> np.ndarray:
    """HU volume [slices, rows, cols]: int16 when every slice's HU are integers that fit (the usual CT), else
    float32 — half the memory for long scans. Decoded pixels are dropped from the datasets once stacked."""
    first = _pixels(frames[0], {})
    integral = all(f.slope == 1 and float(f.intercept).is_integer() for f in frames)
    out = np.empty((len(frames), *first.shape), dtype=np.int16 if integral else np.float32)
    cache: dict[int, np.ndarray] = {}
    for i, frame in enumerate(frames):
        plane = first if i == 0 else _pixels(frame, cache)
        if out.dtype == np.int16 and (plane.min() < -32768 or plane.max() > 32767):
            out = out.astype(np.float32)
        out[i] = plane
        if frame.frame_index is None:
            cache.pop(id(frame.dataset), None)
            frame.dataset._pixel_array = None  # pydicom keeps the decoded array otherwise
    for frame in frames:
        frame.dataset._pixel_array = None
    return out


def build_series(uid: str, items: list[Dataset]) -> DicomSeries:
    plan = plan_series(items)
    frames = plan.frames
    first = frames[0].dataset
    array = _stack(frames)
    if plan.tilt is not None:
        array = plan.tilt.to_grid(array, AIR_HU)
    multiframe = frames[0].frame_index is not None
    ordered: list[Dataset] = []
    for f in frames:
        if not ordered or ordered[-1] is not f.dataset:
            ordered.append(f.dataset)
    series = DicomSeries(
        series_uid=uid, study_uid=_uid(first, "StudyInstanceUID"),
        frame_of_reference_uid=_uid(first, "FrameOfReferenceUID"), modality=str(getattr(first, "Modality", "") or ""),
        description=str(getattr(first, "SeriesDescription", "") or ""), datasets=ordered,
        volume=Volume(array, plan.geometry), notes=plan.notes, multiframe=multiframe, tilt=plan.tilt,
    )
    if multiframe:
        series.frame_order = [f.frame_index for f in frames]  # type: ignore[attr-defined]
    return series


def content_digest(ds: Dataset) -> str:
    """What an instance is, as a hash: its file's bytes (read from disk), else its pixel data and header. Two
    different inputs never share it (unlike blank PatientIDs, slice counts or positions); the same input always
    has it."""
    h = hashlib.sha256()
    filename = getattr(ds, "filename", None)
    if isinstance(filename, str) and filename and Path(filename).is_file():
        with open(filename, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if "PixelData" in ds:
        h.update(bytes(ds.PixelData))
    h.update(repr(sorted((str(e.tag), str(e.value)[:256]) for e in ds if e.tag != 0x7FE00010)).encode())
    return h.hexdigest()


def fill_missing_uids(datasets: list[Dataset]) -> list[str]:
    """Anonymised files without UIDs get UIDs derived from their content: the same input always gets the same
    UIDs, two different inputs never share them. Returns what was generated."""
    generated: list[str] = []
    digests = {id(ds): content_digest(ds) for ds in datasets}
    seed = ["ctseg-anonymous", *sorted(digests.values())]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if any(not _uid(ds, keyword) for ds in datasets):
            value = generate_uid(entropy_srcs=[*seed, keyword])
            for ds in datasets:
                if not _uid(ds, keyword):
                    setattr(ds, keyword, value)
            generated.append(keyword)
    missing_sop = [ds for ds in datasets if not _uid(ds, "SOPInstanceUID")]
    for ds in missing_sop:
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["ctseg-anonymous-instance", digests[id(ds)]])
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if missing_sop:
        generated.append(f"SOPInstanceUID ({len(missing_sop)} instances)")
    return generated


def _select(datasets: list[Dataset], series_uid: str | None, modalities: set[str] | None) -> tuple[str, list[Dataset], list[str]]:
    modalities = {m.upper() for m in (modalities or {"CT"})}
    groups = group_series(datasets)
    generated: list[str] = []
    if "" in groups:  # anonymised without SeriesInstanceUID: those files are taken as one series
        anonymous = groups.pop("")
        generated = fill_missing_uids(anonymous)
        groups[str(anonymous[0].SeriesInstanceUID)] = anonymous
    uid, items = choose_series(groups, series_uid, modalities)
    if not generated:
        generated = fill_missing_uids(items)
    return uid, items, generated


@dataclass(frozen=True)
class SeriesChoice:
    """The series chosen from an input at staging, checked from its headers."""

    series_uid: str
    files: list[str]  # the paths (as given) of the chosen series' instances
    geometry: Geometry
    modality: str
    notes: list[str]  # what reading skipped or repaired
    lossy_methods: tuple[str, ...] = ()  # lossy compressions among the instances (lossy_method); empty: none
    study_uid: str = ""  # the series' study (empty where the input has none)

    @property
    def lossy(self) -> bool:
        return bool(self.lossy_methods)


@contextmanager
def _unusable_headers() -> Iterator[None]:
    """Header values this reader cannot interpret (a Rows of None, a slope of 'abc', a spacing of NaN) are the
    sender's problem: a 422 naming the kind of fault, never a 500. Specific checks above name the element where
    they can; this is the net under them (tests/test_fuzz.py mutates tags to find what slips through)."""
    try:
        yield
    except InputError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, ZeroDivisionError,
            NotImplementedError, GeometryError) as err:
        raise InputError(f"the DICOM headers cannot be used: {type(err).__name__} ({str(err)[:160]})") from None


def inspect_series(blobs: Iterable[tuple[str, object]], series_uid: str | None = None,
                   modalities: set[str] | None = None, phase: PhaseChoice | None = None,
                   bounds: DicomBounds | None = None) -> SeriesChoice:
    """Header-only check at staging: the series choice and its geometry, no pixel decoding. Blobs given as
    paths are reported in ``files`` (pydicom records the path it read): only the instances of the volume (see
    :func:`volume_items`). Every declared size is bounded by ``bounds`` (server/core/bounds.py)."""
    report = ReadReport()
    bounds = bounds or DicomBounds()
    with _unusable_headers():
        uid, items, _ = _select(read_datasets(blobs, headers_only=True, report=report, bounds=bounds), series_uid,
                                modalities)
        items, left_out = volume_items(items, phase)
        check_volume(items, bounds)
        with _naming_left_out(left_out):
            plan = plan_series(items)
    return SeriesChoice(uid, [str(getattr(ds, "filename", "") or "") for ds in items], plan.geometry,
                        str(getattr(items[0], "Modality", "") or ""), report.notes() + left_out + lossy_note(items),
                        lossy_methods(items), _uid(items[0], "StudyInstanceUID"))


def load_series(blobs: Iterable[tuple[str, object]], series_uid: str | None = None,
                modalities: set[str] | None = None, phase: PhaseChoice | None = None,
                bounds: DicomBounds | None = None) -> DicomSeries:
    """Upload -> one checked series. ``modalities``: what the bundle accepts (CT by default)."""
    bounds = bounds or DicomBounds()
    with _unusable_headers():
        uid, items, generated = _select(read_datasets(blobs, bounds=bounds), series_uid, modalities)
        items, left_out = volume_items(items, phase)
        check_volume(items, bounds)
        with _naming_left_out(left_out):
            series = build_series(uid, items)
        series.notes[:0] = left_out
        series.lossy_methods = lossy_methods(items)
        if series.lossy:  # highdicom copies LossyImageCompression from the SEG's first source; it derives from all
            series.datasets[0].LossyImageCompression = "01"
    if generated:
        series.notes.append(
            "the input lacked " + ", ".join(generated) + "; consistent UIDs were generated for the output, so the "
            "DICOM-SEG references those generated UIDs"
        )
    return series
