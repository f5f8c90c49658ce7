"""DICOM series in, a typed Volume out — robust to what real scanners and anonymisers produce.

Slices are grouped by SeriesInstanceUID and sorted by the projection of ImagePositionPatient on the slice
normal (never InstanceNumber). Checked: one orientation, uniform spacing (missing slices and duplicates are
named), gantry tilt; applied: rescale slope/intercept, pixel padding. Compressed transfer syntaxes decode
through pydicom's pylibjpeg plugins; Enhanced (multi-frame) CT is read frame by frame.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from models.volume import Geometry, GeometryError, Volume
from server.core.errors import InputError
from server.imaging.sop import CT_IMAGE_STORAGE

log = logging.getLogger(__name__)

POSITION_TOL_MM = 0.01
SPACING_REL_TOL = 0.05
TILT_TOL_DEG = 0.5
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


def _read_one(index: int, data: object, headers_only: bool, report: ReadReport) -> Dataset | None:
    """One file -> a data set, ``None`` for a file that is not DICOM; a damaged DICOM file is an InputError."""
    try:
        ds = pydicom.dcmread(_source(data), force=False, stop_before_pixels=headers_only)
    except InvalidDicomError:
        if _head(data)[:2] not in RAW_DATASET_GROUPS:
            return None
        try:  # a data set without preamble and file meta, as older archives store them
            ds = pydicom.dcmread(_source(data), force=True, stop_before_pixels=headers_only)
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
    except Exception as err:  # it says it is DICOM (the 'DICM' marker) and cannot be parsed
        raise InputError(f"file {index + 1} of the upload is a damaged DICOM file ({type(err).__name__}): "
                         "its header cannot be read") from None
    is_image = ("Rows" in ds or "ImagePositionPatient" in ds or "PerFrameFunctionalGroupsSequence" in ds
                or str(ds.get("SOPClassUID", "")) in CT_IMAGE_STORAGE)
    if headers_only and is_image and not isinstance(data, bytes):
        _check_complete(index, ds, data)
    if not headers_only and is_image and "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InputError(f"file {index + 1} of the upload is a damaged DICOM image: it ends before its pixel data")
    return ds


def _check_complete(index: int, ds: Dataset, path: object) -> None:
    """A header read stops before the pixels: check the file goes on far enough to hold them."""
    size = Path(path).stat().st_size  # type: ignore[arg-type]
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        per_sample = (int(ds.BitsAllocated) + 7) // 8
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"file {index + 1} of the upload is a damaged DICOM image: its header ends early "
                         "(Rows, Columns or BitsAllocated missing)") from None
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    compressed = bool(syntax is not None and syntax.is_compressed)
    if not compressed and size < rows * cols * frames * per_sample * samples:
        raise InputError(f"file {index + 1} of the upload is a damaged DICOM image: its pixel data is shorter than "
                         f"its header says ({rows}x{cols}x{frames} pixels)")


def read_datasets(blobs: Iterable[tuple[str, object]], headers_only: bool = False,
                  report: ReadReport | None = None) -> list[Dataset]:
    """Parse uploaded files. Files that are not DICOM and DICOM objects that are not images are skipped (counted in
    ``report``); a damaged DICOM file is a 422 saying so; no image at all is a 422."""
    report = report if report is not None else ReadReport()
    datasets = []
    for index, (_, data) in enumerate(blobs):
        ds = _read_one(index, data, headers_only, report)
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
    geometry: Geometry
    notes: list[str]


def plan_series(items: list[Dataset]) -> SeriesPlan:
    """Sort and check the slices of one series from their headers; every refusal says why."""
    notes: list[str] = []
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
            "send one of them (e.g. split by AcquisitionNumber or TemporalPositionIdentifier)"
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
    # Gantry tilt: the slice stack advances off the slice normal.
    step = (frames[-1].position - frames[0].position) / max(1, len(frames) - 1)
    tilt = float(np.degrees(np.arccos(np.clip(abs(np.dot(step, normal)) / np.linalg.norm(step), -1, 1))))
    if tilt > TILT_TOL_DEG:
        raise InputError(
            f"gantry tilt of {tilt:.1f} degrees (slices are sheared): not supported; send a series reconstructed "
            "without tilt or resample it to an orthogonal grid first"
        )
    if str(getattr(first, "PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        notes.append("MONOCHROME1 input: inversion is a display setting; HU come from the rescale (modality LUT)")
    direction = np.stack([row_dir, col_dir, normal], axis=1)  # columns: x (columns), y (rows), z (slices)
    rows, cols = shapes.pop()
    geometry = Geometry(
        shape=(len(frames), rows, cols),
        spacing=(spacing, frames[0].pixel_spacing[0], frames[0].pixel_spacing[1]),
        origin=tuple(float(v) for v in frames[0].position),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.flatten()),
    )
    return SeriesPlan(frames, geometry, notes)


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
    multiframe = frames[0].frame_index is not None
    ordered: list[Dataset] = []
    for f in frames:
        if not ordered or ordered[-1] is not f.dataset:
            ordered.append(f.dataset)
    series = DicomSeries(
        series_uid=uid, study_uid=_uid(first, "StudyInstanceUID"),
        frame_of_reference_uid=_uid(first, "FrameOfReferenceUID"), modality=str(getattr(first, "Modality", "") or ""),
        description=str(getattr(first, "SeriesDescription", "") or ""), datasets=ordered,
        volume=Volume(array, plan.geometry), notes=plan.notes, multiframe=multiframe,
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
                   modalities: set[str] | None = None) -> SeriesChoice:
    """Header-only check at staging: the series choice and its geometry, no pixel decoding. Blobs given as
    paths are reported in ``files`` (pydicom records the path it read)."""
    report = ReadReport()
    with _unusable_headers():
        uid, items, _ = _select(read_datasets(blobs, headers_only=True, report=report), series_uid, modalities)
        plan = plan_series(items)
    return SeriesChoice(uid, [str(getattr(ds, "filename", "") or "") for ds in items], plan.geometry,
                        str(getattr(items[0], "Modality", "") or ""), report.notes())


def load_series(blobs: Iterable[tuple[str, object]], series_uid: str | None = None,
                modalities: set[str] | None = None) -> DicomSeries:
    """Upload -> one checked series. ``modalities``: what the bundle accepts (CT by default)."""
    with _unusable_headers():
        uid, items, generated = _select(read_datasets(blobs), series_uid, modalities)
        series = build_series(uid, items)
    if generated:
        series.notes.append(
            "the input lacked " + ", ".join(generated) + "; consistent UIDs were generated for the output, so the "
            "DICOM-SEG references those generated UIDs"
        )
    return series
