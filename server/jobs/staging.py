"""One way in for every job: files on disk -> a checked :class:`StagedInput`.

The REST upload, the DICOM listener and pull-by-UID each put their files in the job's ``input`` folder and the
service calls :func:`stage`; ``ctseg predict`` calls :func:`select_input` on the user's files. Here, and only here, the input's
kind is decided, zips are unpacked, the series is chosen (by UID or as the one series the model can take) and
checked from its headers, and files of other series are removed, so the worker reads exactly what was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from server.core.archives import ZipLimits, extract_zip
from server.core.bounds import DicomBounds
from server.core.errors import InputError
from server.core.options import PhaseChoice
from server.core.vocabulary import InputKind
from server.imaging.dicom_reader import inspect_series
from server.imaging.nifti import check_nifti_header, is_nifti_name
from server.jobs.model import Origin, StagedInput

NIFTI_DISPLAY_NAME = "the NIfTI volume"
# Voxel sizes a CT can have (mm). Outside them the header is wrong (0.001 mm pixels, 100 mm slices) and a
# segmentation would silently be nonsense: refused, naming the value (docs/operations.md).
PIXEL_SPACING_MM = (0.05, 10.0)
SLICE_SPACING_MM = (0.05, 30.0)


def check_spacing(spacing_dhw: tuple[float, float, float]) -> None:
    d, h, w = spacing_dhw
    for what, value, (lo, hi) in (("slice spacing", d, SLICE_SPACING_MM), ("pixel spacing (rows)", h, PIXEL_SPACING_MM),
                                  ("pixel spacing (columns)", w, PIXEL_SPACING_MM)):
        if not lo <= value <= hi:
            raise InputError(f"implausible {what} of {value:g} mm (accepted: {lo:g} to {hi:g} mm); "
                             "the header is probably wrong")


@dataclass(frozen=True)
class Selection:
    """What an input is, decided once."""

    kind: InputKind
    files: list[Path]
    series_uid: str | None
    display_name: str
    notes: list[str]
    study_uid: str | None = None


def select_input(paths: list[Path], series_uid: str | None, modalities: set[str],
                 phase: PhaseChoice | None = None, bounds: DicomBounds | None = None) -> Selection:
    """Decide the kind of ``paths`` (no zips among them) and, for DICOM, choose and check the series (and its
    acquisition, ``phase``, where it holds several). Every size a DICOM header declares is checked against
    ``bounds`` (settings ``CTSEG_DICOM_MAX_*``; defaults without them), nothing decoded."""
    if not paths:
        raise InputError("no file in the input")
    nifti = [p for p in paths if is_nifti_name(p.name)]
    if nifti:
        if len(paths) > 1:
            raise InputError("send one NIfTI file per request (or DICOM files / zips, not both)")
        check_spacing(check_nifti_header(paths[0], NIFTI_DISPLAY_NAME))
        if series_uid:
            raise InputError("series_uid applies to DICOM input; a NIfTI file holds one volume")
        if phase is not None:
            raise InputError("phase applies to DICOM input; a NIfTI file holds one volume")
        return Selection(InputKind.NIFTI, paths, None, NIFTI_DISPLAY_NAME, [])
    choice = inspect_series([(p.name, p) for p in paths], series_uid, modalities, phase, bounds)
    check_spacing(choice.geometry.spacing)
    chosen = [Path(f) for f in choice.files]
    return Selection(InputKind.DICOM, chosen, choice.series_uid,
                     f"{choice.modality or 'DICOM'} series of {choice.geometry.shape[0]} slices", choice.notes,
                     choice.study_uid or None)


def unpack_zips(inbox: Path, limits: ZipLimits) -> None:
    """Zips in the inbox unpacked in place, nested ones up to ``limits.max_depth`` levels (deeper ones stay as
    files that are not DICOM). One budget of unpacked bytes and members for all of them."""
    budget = limits
    for depth in range(limits.max_depth):
        zips = sorted(p for p in inbox.rglob("*") if p.is_file() and p.suffix.lower() == ".zip"
                      and len(p.relative_to(inbox).parts) == depth + 1)
        for path in zips:
            target = path.with_name(path.stem + "_unzipped")
            target.mkdir()
            out = extract_zip(path, target, budget)
            path.unlink()
            budget = replace(budget, max_bytes=budget.max_bytes - sum(p.stat().st_size for p in out),
                             max_members=budget.max_members - len(out))


def stage(inbox: Path, origin: Origin, series_uid: str | None, modalities: set[str], limits: ZipLimits,
          phase: PhaseChoice | None = None, bounds: DicomBounds | None = None) -> StagedInput:
    """Check the files in a job's ``inbox`` and keep only what the job will read (one acquisition, no
    localizers: the worker reads exactly the volume's instances)."""
    unpack_zips(inbox, limits)
    paths = sorted(p for p in inbox.rglob("*") if p.is_file())
    selection = select_input(paths, series_uid, modalities, phase, bounds)
    keep = {p.resolve() for p in selection.files}
    for path in paths:
        if path.resolve() not in keep:
            path.unlink()  # other series, non-image objects: the worker never sees them
    files = tuple(str(p.resolve().relative_to(inbox.resolve())) for p in selection.files)
    return StagedInput(selection.kind, files, selection.series_uid, selection.display_name, origin,
                       tuple(selection.notes), selection.study_uid)
