"""Sliding-window inference over a whole volume, torch-free.

One implementation for training-time validation (a torch model behind the callable) and the service (ONNX
Runtime behind it). Gaussian importance weighting as in nnU-Net/MONAI; several windows per call; windows that
hold only air (every voxel at the intensity window's floor) are skipped; logits accumulate in float32 or float16.
2.5D models predict the centre slice of their window: then windows step one slice at a time in depth.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.axes import Triple

WindowFn = Callable[[np.ndarray], np.ndarray]  # (N, 1, *roi) float32 -> (N, K, *out_size) logits
ProgressFn = Callable[[int, int], None]


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
    skip_empty: bool = True
    empty_value: float = 0.0  # preprocessed intensity of air (the window's floor)

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

    def __call__(self, volume: np.ndarray, predict: WindowFn, progress: ProgressFn | None = None) -> np.ndarray:
        """``volume`` [D, H, W] float32, at least ROI-sized in-plane -> labels [D, H, W] (uint8 or uint16)."""
        if volume.ndim != 3:
            raise ValueError(f"expected a [D, H, W] volume; got shape {volume.shape}")
        if any(s < o for s, o in zip(volume.shape, self.out_size)):
            raise ValueError(f"volume {volume.shape} is smaller than the output window {self.out_size}; pad it first")
        # Pad so that every output position has a full input window around it (2.5D: slices above and below).
        pads = [(off, r - o - off) for off, r, o in zip(self.out_offset, self.roi, self.out_size)]
        padded = np.pad(volume, pads, mode="edge") if any(sum(p) for p in pads) else volume
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
            window = padded[d:d + self.roi[0], h:h + self.roi[1], w:w + self.roi[2]]
            if self.skip_empty and window.max() <= self.empty_value:
                skipped += 1
                done += 1
                continue
            batch[len(pending), 0] = window
            pending.append((d, h, w))
            if len(pending) == self.batch_size:
                flush()
        if pending:
            flush()
        elif progress:
            progress(done, len(starts))
        self.last_stats = {"windows": len(starts), "skipped": skipped}
        labels = np.argmax(acc, axis=0)
        labels[weight == 0] = 0  # covered only by skipped (all-air) windows: background
        return labels.astype(np.uint8 if self.num_classes <= 256 else np.uint16)
