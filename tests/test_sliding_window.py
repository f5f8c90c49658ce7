"""The torch-free sliding window: coverage, weighting, 2.5D, air skipping."""

from __future__ import annotations

import numpy as np
import pytest

from models.sliding_window import SlidingWindow, gaussian_importance, window_starts


def threshold_model(num_classes: int, out_size, roi):
    """A 'network' that labels voxels by intensity: class = round(value * (K-1)); output cropped to out_size."""
    off = [(r - o) // 2 for r, o in zip(roi, out_size)]

    def predict(batch: np.ndarray) -> np.ndarray:
        x = batch[:, 0, off[0]:off[0] + out_size[0], off[1]:off[1] + out_size[1], off[2]:off[2] + out_size[2]]
        cls = np.clip(np.round(x * (num_classes - 1)), 0, num_classes - 1).astype(int)
        return np.stack([(cls == k).astype(np.float32) * 5 for k in range(num_classes)], axis=1)

    return predict


def test_window_starts_cover_the_axis():
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 2) == [0]


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_3d_result_equals_per_voxel_truth(overlap):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 3, size=(20, 23, 17)).astype(np.float32) / 2
    sw = SlidingWindow((8, 8, 8), (8, 8, 8), 3, overlap=overlap, batch_size=3)
    labels = sw(vol, threshold_model(3, (8, 8, 8), (8, 8, 8)))
    assert np.array_equal(labels, np.round(vol * 2).astype(np.uint8))


def test_2p5d_predicts_every_slice_from_its_centre_window():
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 2, size=(7, 16, 16)).astype(np.float32)
    sw = SlidingWindow((5, 16, 16), (1, 16, 16), 2, overlap=0.5)
    assert len(sw.plan(vol.shape)) == 7  # one window per slice
    done = []
    labels = sw(vol, threshold_model(2, (1, 16, 16), (5, 16, 16)), progress=lambda d, t: done.append((d, t)))
    assert np.array_equal(labels, vol.astype(np.uint8))
    assert done[-1] == (7, 7)


def test_windows_outside_the_body_are_skipped_and_background():
    vol = np.zeros((16, 16, 32), dtype=np.float32)
    vol[:, :, 20:] = 1.0
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return threshold_model(2, (16, 16, 16), (16, 16, 16))(batch)

    sw = SlidingWindow((16, 16, 16), (16, 16, 16), 2, overlap=0.0, batch_size=1)
    labels = sw(vol, predict, body=vol > 0)
    assert sw.last_stats == {"windows": 2, "skipped": 1} and sum(calls) == 1
    assert labels[:, :, :16].max() == 0 and labels[:, :, 20:].min() == 1


def test_float16_accumulation_gives_the_same_labels():
    rng = np.random.default_rng(2)
    vol = rng.integers(0, 4, size=(18, 18, 18)).astype(np.float32) / 3
    a = SlidingWindow((8, 8, 8), (8, 8, 8), 4, overlap=0.5)(vol, threshold_model(4, (8,) * 3, (8,) * 3))
    b = SlidingWindow((8, 8, 8), (8, 8, 8), 4, overlap=0.5, accumulate_dtype=np.float16)(vol, threshold_model(4, (8,) * 3, (8,) * 3))
    assert np.array_equal(a, b)


def test_importance_map_and_bad_settings():
    g = gaussian_importance((5, 9, 9))
    assert g.max() == pytest.approx(1.0) and g.min() > 0 and g[2, 4, 4] == g.max()
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        SlidingWindow((8, 8, 8), (8, 8, 8), 2, overlap=1.0)
    with pytest.raises(ValueError, match="smaller than the output window"):
        SlidingWindow((8, 8, 8), (8, 8, 8), 2)(np.zeros((4, 8, 8), np.float32), lambda b: b)


def test_argmax_classes_is_numpys_argmax_ties_included():
    from models.sliding_window import argmax_classes

    scores = np.random.default_rng(3).random((6, 4, 5, 7), dtype=np.float32)
    scores[4, :2] = scores[2, :2]  # ties: the first class wins, as in numpy
    scores[:, 3] = 0.5  # all tied
    assert np.array_equal(argmax_classes(scores, np.uint8), np.argmax(scores, axis=0))
