"""Voxel counts of label maps, per plane: fast and without a full-volume int64 copy.

``np.bincount`` (and ``np.unique``) over a whole label map cast it to int64 first: 2 GB and about 2 s for a
512x512x1000 series. One bincount a plane stays in cache and allocates one plane at a time.
"""

from __future__ import annotations

import numpy as np


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
