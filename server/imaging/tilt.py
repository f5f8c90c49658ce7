"""Gantry-tilted CT: the sheared slice stack onto an orthogonal grid for inference, and labels back onto its slices.

A tilted series' slices are parallel planes whose positions advance off their normal (step = s*n + t, with t in
the slice plane). Slice k is therefore plane k of an orthogonal grid (spacing s along the normal), moved in its
own plane by k*t: resampling is a 2-D shift of each slice (bilinear for HU, nearest for labels), never an
interpolation across slices. The orthogonal grid is widened to hold every shifted slice whole, so no anatomy at
the edge of the field of view is cut off. Nothing else in the service knows about tilt: the reader detects it
(``plan_tilt``), the volume it hands on is orthogonal, and the SEG writer takes labels back through ``to_slices``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.core.errors import InputError

# Below this largest in-plane displacement (in pixels) over the whole stack the slices are taken as orthogonal:
# the rounding of written positions, not a tilt.
TILT_TOL_PIXELS = 0.1
# CT gantries tilt by at most 30 degrees; a stack sheared further is not a tilted acquisition (a mixed or
# mislabelled series), and would widen the orthogonal grid by more than the length of the scan.
MAX_TILT_DEG = 35.0
# A tilted stack is straight: each slice's in-plane displacement is the tilt times its distance along the normal.
LINE_TOL_PIXELS = 1.0


@dataclass(frozen=True)
class Tilt:
    """How the source slices lie on the orthogonal grid: ``offsets[k]`` (rows, columns, in pixels, >= 0) is where
    source slice k's pixel [0, 0] falls in plane k of a grid of ``grid_shape``; ``source_shape`` is the stack
    (slices, rows, columns) as sent, in slice order."""

    degrees: float
    source_shape: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    offsets: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        n, rows, cols = self.source_shape
        off = np.asarray(self.offsets, dtype=float).reshape(-1, 2)
        if min(self.source_shape) < 1 or len(off) != n or self.grid_shape[0] != n:
            raise ValueError(f"tilt offsets for {len(off)} slices, a stack of {self.source_shape}, grid {self.grid_shape}")
        if not np.isfinite(off).all() or off.min() < 0:
            raise ValueError("tilt offsets must be finite and non-negative")
        need = (rows + int(np.ceil(off[:, 0].max() - 1e-6)), cols + int(np.ceil(off[:, 1].max() - 1e-6)))
        if self.grid_shape[1] < need[0] or self.grid_shape[2] < need[1]:
            raise ValueError(f"grid {self.grid_shape} does not hold the shifted slices (needs {need})")

    def to_grid(self, stack: np.ndarray, fill: float) -> np.ndarray:
        """HU stack [slices, rows, cols] -> the orthogonal grid, bilinear; outside the field of view ``fill``.
        An integer stack stays integer (rounded: 0.5 HU at most)."""
        if stack.shape != self.source_shape:
            raise ValueError(f"stack {stack.shape} is not the tilted series' {self.source_shape}")
        out = np.empty(self.grid_shape, dtype=stack.dtype)
        integral = np.issubdtype(stack.dtype, np.integer)
        for k, (dr, dc) in enumerate(self.offsets):
            plane = _shift_linear(stack[k].astype(np.float32), dr, dc, self.grid_shape[1:], fill)
            out[k] = np.rint(plane) if integral else plane
        return out

    def to_slices(self, labels: np.ndarray) -> np.ndarray:
        """Labels on the orthogonal grid -> on the source slices (nearest): what the SEG's frames lie on."""
        if labels.shape != self.grid_shape:
            raise ValueError(f"labels {labels.shape} are not on the orthogonal grid {self.grid_shape}")
        _, rows, cols = self.source_shape
        out = np.empty(self.source_shape, dtype=labels.dtype)
        for k, (dr, dc) in enumerate(self.offsets):
            r = np.clip(np.rint(np.arange(rows) + dr).astype(np.intp), 0, self.grid_shape[1] - 1)
            c = np.clip(np.rint(np.arange(cols) + dc).astype(np.intp), 0, self.grid_shape[2] - 1)
            out[k] = labels[k][np.ix_(r, c)]
        return out


def _shift_linear(plane: np.ndarray, dr: float, dc: float, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """``plane`` moved by (dr, dc) pixels onto a plane of ``shape``: out[i, j] = plane[i - dr, j - dc], bilinear."""
    padded = np.pad(plane, 1, constant_values=fill)  # index 0 and n+1 are fill; anything further is clipped there

    def taps(n_out: int, shift: float, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.arange(n_out) - shift
        x0 = np.floor(x)
        w = (x - x0).astype(np.float32)
        i0 = np.clip(x0.astype(np.intp) + 1, 0, n_in + 1)
        return i0, np.clip(i0 + 1, 0, n_in + 1), w

    r0, r1, wr = taps(shape[0], dr, plane.shape[0])
    c0, c1, wc = taps(shape[1], dc, plane.shape[1])
    rows = padded[r0] * (1 - wr)[:, None] + padded[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc) + rows[:, c1] * wc


def plan_tilt(positions: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, normal: np.ndarray,
              pixel_spacing: tuple[float, float], rows: int, cols: int) -> tuple[Tilt | None, np.ndarray, list[str]]:
    """Sorted slice positions (N, 3) -> (the tilt or None, the orthogonal grid's origin, notes). Each slice is
    placed where its own position says; a stack sheared past ``MAX_TILT_DEG``, or whose slices leave the line of
    one tilt by more than ``LINE_TOL_PIXELS``, is refused (it is not one tilted acquisition, and the grid it
    would need is unbounded)."""
    if not np.isfinite(positions).all():
        raise InputError("ImagePositionPatient is not a finite number in some slices")
    rel = positions - positions[0]
    along = rel @ normal  # distance from the first slice along the normal (mm, increasing)
    across = rel - np.outer(along, normal)  # each slice's in-plane displacement from the first (mm)
    scale = np.array([pixel_spacing[0], pixel_spacing[1]])
    pix = np.stack([across @ col_dir, across @ row_dir], axis=1) / scale  # (rows, columns) in pixels
    if np.abs(pix).max() < TILT_TOL_PIXELS:
        return None, positions[0], []
    per_mm = (along @ across) / float(along @ along)  # the tilt: in-plane shift per mm along the normal
    degrees = float(np.degrees(np.arctan(np.linalg.norm(per_mm))))
    if degrees > MAX_TILT_DEG:
        raise InputError(
            f"gantry tilt of {degrees:.1f} degrees (slices are sheared): more than a CT gantry tilts "
            f"(at most {MAX_TILT_DEG:g} degrees are corrected); the slices are not one tilted acquisition"
        )
    off_line = np.abs(pix - np.outer(along, [per_mm @ col_dir, per_mm @ row_dir]) / scale).max(axis=1)
    if off_line.max() > LINE_TOL_PIXELS:
        k = int(np.argmax(off_line))
        raise InputError(
            f"slice {k + 1} (in position order) lies {off_line[k]:.1f} pixels off the line of the other slices in "
            "its plane: the slices are not one (tilted) stack"
        )
    low = pix.min(axis=0)
    offsets = pix - low
    origin = positions[0] + low[0] * pixel_spacing[0] * col_dir + low[1] * pixel_spacing[1] * row_dir
    grid = (len(positions), rows + int(np.ceil(offsets[:, 0].max() - 1e-6)),
            cols + int(np.ceil(offsets[:, 1].max() - 1e-6)))
    tilt = Tilt(degrees, (len(positions), rows, cols), grid, tuple((float(r), float(c)) for r, c in offsets))
    note = (f"gantry tilt of {degrees:.1f} degrees corrected: the slices were resampled to an orthogonal grid of "
            f"{grid[1]}x{grid[2]} pixels for inference; the DICOM-SEG lies on the source slices")
    return tilt, origin, [note]
