"""Voxel counts of label maps, per plane: fast and without a full-volume int64 copy; and per-label statistics
(volume, HU, connected components, extent) for volumes.json, the SR and the quality flags.

``np.bincount`` (and ``np.unique``) over a whole label map cast it to int64 first: 2 GB and about 2 s for a
512x512x1000 series. One bincount a plane stays in cache and allocates one plane at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


def plane_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """counts[plane, value] for a [D, H, W] label map (at least ``minlength`` values)."""
    top = int(labels.max()) if labels.size else 0
    width = max(top + 1, minlength)
    if labels.shape[0] == 0:
        return np.zeros((0, width), dtype=np.int64)
    return np.stack([np.bincount(plane.ravel(), minlength=width) for plane in labels])


def label_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """counts[value] over the whole map."""
    return plane_counts(labels, minlength).sum(axis=0)


@dataclass(frozen=True)
class LabelStats:
    """One label of a result: size, HU, shape facts the quality flags read (server/imaging/quality.py)."""

    value: int
    name: str
    voxels: int
    ml: float  # rounded to 0.001 mL: the value volumes.json and the SR both carry
    hu_mean: float | None  # None: no voxel
    hu_sd: float | None
    components: int  # face, edge and corner neighbours (26-connected) count as one piece
    largest_share: float | None  # voxels of the largest component / all voxels of the label
    first_slice: int | None  # extent along the slice axis (D), None: no voxel
    last_slice: int | None
    touches_in_plane_edge: bool  # a voxel on the image's first or last row or column


def label_statistics(ct: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float],
                     names: dict[int, str]) -> dict[int, LabelStats]:
    """Per label of ``names``: voxels, mL, HU mean and SD, connected components, extent. ``ct`` and ``labels`` on
    one [D, H, W] grid.

    HU statistics gather only the labelled voxels (one boolean pass, then bincounts of the few that are labelled);
    components are counted inside each label's bounding box (SimpleITK's label-shape pass finds the boxes)."""
    if ct.shape != labels.shape:
        raise ValueError(f"CT {ct.shape} and label map {labels.shape} are not on one grid")
    width = max(max(names, default=0), int(labels.max()) if labels.size else 0) + 1
    counts = plane_counts(labels, width)
    total = counts.sum(axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    inside = labels != 0
    lab_in = labels[inside]
    hu_in = ct[inside].astype(np.float64)
    sums = np.bincount(lab_in, hu_in, width)
    squares = np.bincount(lab_in, hu_in * hu_in, width)
    del lab_in, hu_in, inside
    edges = np.zeros(width, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        edges |= np.bincount(face.ravel(), minlength=width)[:width] > 0
    boxes = _bounding_boxes(labels)
    out: dict[int, LabelStats] = {}
    for v in sorted(names):
        n = int(total[v]) if v < width else 0
        mean = sd = share = first = last = None
        components = 0
        if n:
            mean = float(sums[v] / n)
            sd = float(np.sqrt(max(squares[v] / n - mean * mean, 0.0)))
            slices = np.flatnonzero(counts[:, v])
            first, last = int(slices[0]), int(slices[-1])
            components, largest = _components(labels, v, boxes[v])
            share = largest / n
        out[v] = LabelStats(v, names[v], n, round(n * voxel_ml, 3), mean, sd, components, share, first, last,
                            bool(edges[v]) if v < width else False)
    return out


def _bounding_boxes(labels: np.ndarray) -> dict[int, tuple[slice, slice, slice]]:
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.SetComputePerimeter(False)
    shape.SetComputeFeretDiameter(False)
    shape.SetComputeOrientedBoundingBox(False)
    image = sitk.GetImageFromArray(labels if labels.dtype in (np.uint8, np.uint16) else labels.astype(np.uint16))
    shape.Execute(image)
    boxes = {}
    for v in shape.GetLabels():
        x, y, z, nx, ny, nz = shape.GetBoundingBox(v)  # ITK order: (x, y, z) = (W, H, D)
        boxes[int(v)] = (slice(z, z + nz), slice(y, y + ny), slice(x, x + nx))
    return boxes


def _components(labels: np.ndarray, value: int, box: tuple[slice, slice, slice]) -> tuple[int, int]:
    """(number of 26-connected components, voxels of the largest) of one label."""
    mask = np.ascontiguousarray(labels[box] == value).view(np.uint8)
    relabel = sitk.RelabelComponentImageFilter()
    relabel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(mask), True))
    sizes = relabel.GetSizeOfObjectsInPixels()
    return len(sizes), int(sizes[0]) if sizes else 0
