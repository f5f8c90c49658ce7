"""Sliding-window inference over a whole volume, torch-free.

One implementation for training-time validation (a torch model behind the callable) and the service (ONNX
Runtime behind it). Gaussian importance weighting as in nnU-Net/MONAI; several windows per call; given a body mask
(models/body_mask.py), windows with no voxel of the patient are skipped; logits accumulate in float32 or float16.
2.5D models predict the centre slice of their window: then windows step one slice at a time in depth.
On request (``low_margin``) the final argmax also tracks the second-best class and counts, per class, the voxels
whose two best (weight-normalised) logits lie closer than the margin: a cheap uncertainty signal for quality flags.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.axes import Triple
from models.body_mask import WindowOccupancy

WindowFn = Callable[[np.ndarray], np.ndarray]  # (N, 1, *roi) float32 -> (N, K, *out_size) logits
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class MarginCounts:
    """Per class: voxels labelled with it, and those of them whose top-2 logit margin was under ``margin``
    (on the model's grid)."""

    margin: float
    voxels: np.ndarray  # int64 [K]
    low: np.ndarray  # int64 [K]

    def share(self, value: int) -> float | None:
        """The low-margin share of class ``value``; None when it has no voxel."""
        total = int(self.voxels[value]) if value < len(self.voxels) else 0
        return int(self.low[value]) / total if total else None


def gaussian_importance(size: Triple, sigma_scale: float = 0.125) -> np.ndarray:
    """Weights peaking at the window centre; never zero, so every voxel keeps a defined weight."""
    axes = []
    for n in size:
        if n == 1:
            axes.append(np.ones(1, dtype=np.float64))
            continue
        sigma = max(n * sigma_scale, 1e-3)
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w /= w.max()
    return np.maximum(w, 1e-3).astype(np.float32)


def window_starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@dataclass
class SlidingWindow:
    roi: Triple
    out_size: Triple
    num_classes: int
    overlap: float = 0.5
    batch_size: int = 4
    accumulate_dtype: type = np.float32

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1); got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        self.out_offset = tuple((r - o) // 2 for r, o in zip(self.roi, self.out_size))
        self.importance = gaussian_importance(self.out_size)

    def plan(self, shape: Triple) -> list[Triple]:
        """Window starts (in the depth-padded volume) that cover every output voxel."""
        steps = [max(1, int(round(o * (1 - self.overlap)))) for o in self.out_size]
        per_axis = [window_starts(s, o, st) for s, o, st in zip(shape, self.out_size, steps)]
        return [tuple(p) for p in itertools.product(*per_axis)]  # type: ignore[misc]

    def __call__(self, volume: np.ndarray, predict: WindowFn, progress: ProgressFn | None = None,
                 body: np.ndarray | None = None) -> np.ndarray:
        """``volume`` [D, H, W] float32, at least ROI-sized in-plane -> labels [D, H, W] (uint8 or uint16).

        ``body``: bool [D, H, W]; windows holding none of it are not run, and voxels that only such windows cover
        are background. None: every window runs.
        """
        return self.run(volume, predict, progress, body)[0]

    def run(self, volume: np.ndarray, predict: WindowFn, progress: ProgressFn | None = None,
            body: np.ndarray | None = None, low_margin: float | None = None
            ) -> tuple[np.ndarray, MarginCounts | None]:
        """As ``__call__``; with ``low_margin`` (logit units) also the per-class low-margin counts."""
        if volume.ndim != 3:
            raise ValueError(f"expected a [D, H, W] volume; got shape {volume.shape}")
        if body is not None and body.shape != volume.shape:
            raise ValueError(f"body mask {body.shape} does not match the volume {volume.shape}")
        if any(s < o for s, o in zip(volume.shape, self.out_size)):
            raise ValueError(f"volume {volume.shape} is smaller than the output window {self.out_size}; pad it first")
        # Pad so that every output position has a full input window around it (2.5D: slices above and below).
        pads = [(off, r - o - off) for off, r, o in zip(self.out_offset, self.roi, self.out_size)]
        padded = np.pad(volume, pads, mode="edge") if any(sum(p) for p in pads) else volume
        occupancy = None
        if body is not None:
            occupancy = WindowOccupancy(np.pad(body, pads, mode="edge") if any(sum(p) for p in pads) else body)
        shape: Triple = tuple(volume.shape)  # type: ignore[assignment]
        acc = np.zeros((self.num_classes, *shape), dtype=self.accumulate_dtype)
        weight = np.zeros(shape, dtype=np.float32)
        starts = self.plan(shape)
        batch = np.empty((self.batch_size, 1, *self.roi), dtype=np.float32)
        pending: list[Triple] = []
        done = 0
        imp = self.importance

        def flush() -> None:
            nonlocal done
            logits = predict(batch[: len(pending)])
            for k, (d, h, w) in enumerate(pending):
                od, oh, ow = self.out_size
                region = (slice(None), slice(d, d + od), slice(h, h + oh), slice(w, w + ow))
                acc[region] += (logits[k] * imp).astype(self.accumulate_dtype, copy=False)
                weight[region[1:]] += imp
            done += len(pending)
            pending.clear()
            if progress:
                progress(done, len(starts))

        skipped = 0
        for d, h, w in starts:
            if occupancy is not None and not occupancy.any((d, h, w), self.roi):
                skipped += 1
                done += 1
                continue
            batch[len(pending), 0] = padded[d:d + self.roi[0], h:h + self.roi[1], w:w + self.roi[2]]
            pending.append((d, h, w))
            if len(pending) == self.batch_size:
                flush()
        if pending:
            flush()
        elif progress:
            progress(done, len(starts))
        self.last_stats = {"windows": len(starts), "skipped": skipped}
        dtype = np.uint8 if self.num_classes <= 256 else np.uint16
        if low_margin is None:
            labels = argmax_classes(acc, dtype)
            labels[weight == 0] = 0  # covered only by skipped windows (outside the body): background
            return labels, None
        labels, gap = argmax_with_gap(acc, dtype)
        unseen = weight == 0
        labels[unseen] = 0
        # acc holds importance-weighted sums: the mean logits' gap is gap / weight
        low = gap < np.float32(low_margin) * weight
        low[unseen] = False
        return labels, margin_counts(labels, low, self.num_classes, low_margin)


def argmax_classes(scores: np.ndarray, dtype: type) -> np.ndarray:
    """``np.argmax(scores, axis=0)`` for [K, D, H, W] scores, one contiguous pass per class: 5x faster than numpy's
    strided reduction over the class axis (0.96 -> 0.19 s for 13 x 112 x 202 x 244 here), same ties (first class wins)."""
    best = scores[0].copy()
    labels = np.zeros(scores.shape[1:], dtype=dtype)
    for k in range(1, len(scores)):
        higher = scores[k] > best
        np.copyto(labels, k, where=higher)
        np.maximum(best, scores[k], out=best)
    return labels


def argmax_with_gap(scores: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """:func:`argmax_classes` and, per voxel, best minus second-best score (float32), in the same pass."""
    best = scores[0].astype(np.float32, copy=True)
    second = np.full(best.shape, -np.inf, dtype=np.float32)
    labels = np.zeros(scores.shape[1:], dtype=dtype)
    lower = np.empty_like(best)
    for k in range(1, len(scores)):
        higher = scores[k] > best
        np.copyto(labels, k, where=higher)
        np.minimum(best, scores[k], out=lower)  # the loser of (best so far, this class) competes for second
        np.maximum(second, lower, out=second)
        np.maximum(best, scores[k], out=best)
    best -= second
    return labels, best


def margin_counts(labels: np.ndarray, low: np.ndarray, num_classes: int, margin: float) -> MarginCounts:
    """Per-class totals a plane at a time (a whole-volume bincount would cast the map to int64 first)."""
    voxels = np.zeros(num_classes, dtype=np.int64)
    lows = np.zeros(num_classes, dtype=np.int64)
    for plane, low_plane in zip(labels, low):
        voxels += np.bincount(plane.ravel(), minlength=num_classes)[:num_classes]
        lows += np.bincount(plane[low_plane], minlength=num_classes)[:num_classes]
    return MarginCounts(float(margin), voxels, lows)
