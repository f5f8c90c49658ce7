"""NIfTI in and out through SimpleITK (the same library the preprocessing uses, so affines agree)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from models.volume import GeometryError, Volume
from server.core.errors import InputError
from server.imaging.label_stats import label_counts

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _itk_reason(err: RuntimeError, path: Path) -> str:
    """ITK's last line, without the stored file's path (its name came from the client and may name a patient)."""
    text = str(err).strip()
    last = text.splitlines()[-1] if text else "unreadable"
    return last.replace(str(path), "the file").replace(path.name, "the file")[:200]


def check_nifti_header(path: Path, name: str) -> tuple[float, float, float]:
    """Header-only check at staging: readable, one 3D grey-scale volume. Returns its spacing (D, H, W)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(f"{name}: not a readable NIfTI file ({_itk_reason(err, path)})") from None
    size = reader.GetSize()
    if len(size) not in (3, 4) or (len(size) == 4 and size[3] != 1):
        raise InputError(f"{name}: expected a 3D volume; got size {size}")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{name}: expected grey-scale CT (one value per voxel)")
    if min(size[:3]) < 2:
        raise InputError(f"{name}: a volume of size {size[:3]} is too small to segment")
    sx, sy, sz = reader.GetSpacing()[:3]
    return (sz, sy, sx)


def read_nifti(path: Path, name: str) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"{name}: not a readable NIfTI file ({_itk_reason(err, path)})") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"{name}: expected a 3D volume; got {image.GetDimension()}D with size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: expected one value per voxel (grey-scale CT); got {image.GetNumberOfComponentsPerPixel()}")
    if min(image.GetSize()) < 2:
        raise InputError(f"{name}: a volume of size {image.GetSize()} is too small to segment")
    try:
        return Volume.from_sitk(image)
    except GeometryError as err:
        raise InputError(f"{name}: {err}") from None


FLOAT_TYPES = {16: np.dtype("float32"), 64: np.dtype("float64")}  # NIfTI datatype codes


def non_finite_voxels(path: Path) -> np.ndarray:
    """Flat indices (x fastest, as numpy's [z, y, x] C order) of NaN/infinite voxels of a float NIfTI file.

    Why here and not from the image: ITK's NIfTI reader replaces NaN and infinity with 0 on read, which is soft
    tissue in HU: a silent wrong answer. So the raw voxel data is scanned, in chunks, for float files only.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        header = f.read(540)
        for endian in ("<", ">"):
            size = struct.unpack(endian + "i", header[:4])[0]
            if size in (348, 540):
                break
        else:
            return np.zeros(0, np.int64)
        if size == 348:
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        else:
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
        if datatype not in FLOAT_TYPES:
            return np.zeros(0, np.int64)
        dtype = FLOAT_TYPES[datatype].newbyteorder(endian)
        f.seek(offset)
        found, start, chunk = [], 0, (16 << 20) // dtype.itemsize * dtype.itemsize
        while data := f.read(chunk):
            values = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype)
            found.append(np.flatnonzero(~np.isfinite(values)) + start)
            start += values.size
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def replace_non_finite(volume: Volume, path: Path, fill: float = -1024.0) -> tuple[Volume, str | None]:
    """NaN and infinite voxels (float NIfTI from research pipelines) set to air, with a note saying how many."""
    bad = non_finite_voxels(path)
    bad = bad[bad < volume.array.size]
    if not bad.size:
        return volume, None
    array = np.array(volume.array, dtype=np.float32)
    array.reshape(-1)[bad] = fill
    note = (f"{bad.size} voxel(s) were NaN or infinite ({100 * bad.size / array.size:.3g} % of the volume) and were "
            f"set to {fill:g} HU (air) before segmenting")
    return Volume(array, volume.geometry), note


def label_volumes(labels: np.ndarray, spacing: tuple[float, float, float], names: dict[int, str]) -> dict[str, dict]:
    """Per label: voxel count and volume in mL."""
    counts = label_counts(labels, minlength=max(names) + 1 if names else 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        names[v]: {"value": v, "voxels": int(counts[v]), "ml": round(int(counts[v]) * voxel_ml, 3)}
        for v in sorted(names)
    }
