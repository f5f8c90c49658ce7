"""Where the patient is: a body mask on the model grid, so that sliding windows entirely outside it are skipped.

Why not "every voxel at the intensity window's floor": with a soft-tissue window (-175 HU floor) lung, bowel gas
and the airway clip to the floor too, so a window inside a lung was skipped and forced to background, which is
wrong for any model that labels air-filled structures. The body is found in Hounsfield units before the window is
applied: voxels above ``threshold_hu`` (-500: fat, soft tissue, bone, contrast; not air, not lung), then holes
filled slice by slice, which puts lungs, bowel gas and the airway inside the body. Slice by slice because in 3D the
airway opens to the outside air and a 3D hole fill would leave the lungs out.

Every component is kept, not only the largest: the table, a separate arm, a blanket or a speck of streak artefact
each cost the few windows around them, while dropping one would change the answer wherever a model labels it. So a
skipped window is one whose every voxel is at most -500 HU and connected, in its slice, to the air outside the
patient: the network would have seen outside air and nothing else.

A window is skipped only when none of its input voxels is in the mask: the network would have seen air and nothing
else. Measured on the development CT placed in a 500 mm clinical field of view (bench/body_mask.py).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from models.axes import Triple

BODY_THRESHOLD_HU = -500.0


def body_mask(hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """``hu`` [D, H, W] in Hounsfield units -> bool mask [D, H, W] of the body (see the module docstring)."""
    if hu.ndim != 3:
        raise ValueError(f"expected a [D, H, W] volume; got shape {hu.shape}")
    above = hu > threshold_hu
    filled = np.zeros(hu.shape, dtype=bool)
    for d in np.flatnonzero(above.any(axis=(1, 2))):
        plane = sitk.BinaryFillhole(sitk.GetImageFromArray(above[d].astype(np.uint8)), fullyConnected=False)
        filled[d] = sitk.GetArrayViewFromImage(plane) > 0
    return filled


class WindowOccupancy:
    """Answers "does this window hold any masked voxel?" in O(1) per window (a 3D summed-area table)."""

    def __init__(self, mask: np.ndarray) -> None:
        # int32 in place: one table of 4 bytes a voxel (a 512x512x1000 series' model grid: ~150 MB), not three
        # int64 temporaries; int64 only for grids whose voxel count int32 cannot hold
        dtype = np.int32 if mask.size < 2**31 else np.int64
        table = np.zeros(tuple(s + 1 for s in mask.shape), dtype=dtype)
        table[1:, 1:, 1:] = mask
        for axis in range(3):
            np.cumsum(table, axis=axis, out=table)
        self.table = table

    def count(self, start: Triple, size: Triple) -> int:
        t = self.table
        d0, h0, w0 = start
        d1, h1, w1 = d0 + size[0], h0 + size[1], w0 + size[2]
        return int(t[d1, h1, w1] - t[d0, h1, w1] - t[d1, h0, w1] - t[d1, h1, w0]
                   + t[d0, h0, w1] + t[d0, h1, w0] + t[d1, h0, w0] - t[d0, h0, w0])

    def any(self, start: Triple, size: Triple) -> bool:
        return self.count(start, size) > 0
