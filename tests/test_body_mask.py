"""The body mask and window skipping: only windows wholly outside the patient are skipped, and skipping never
changes the answer of a model that labels air-filled structures (lungs, bowel gas)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from models.body_mask import WindowOccupancy, body_mask
from models.preprocess import Preprocessor, PreprocessSpec
from models.sliding_window import SlidingWindow

AIR, LUNG, GAS, TISSUE = -1000.0, -850.0, -990.0, 40.0
SPACING = 2.0


def chest_phantom() -> np.ndarray:
    """[D, H, W] HU: air around a trunk with two large lungs (upper slices), a bowel gas pocket (lower slices),
    an arm separate from the trunk, a speck of streak artefact in the air, and the airway open to the top."""
    d, h, w = 40, 128, 160
    z, y, x = np.mgrid[:d, :h, :w]
    hu = np.full((d, h, w), AIR, dtype=np.float32)
    trunk = ((y - 64) / 50) ** 2 + ((x - 72) / 60) ** 2 <= 1
    hu[trunk] = TISSUE
    for cx in (48, 96):
        lung = (((y - 62) / 30) ** 2 + ((x - cx) / 20) ** 2 <= 1) & (z < 24)
        hu[lung] = LUNG
    hu[(((y - 70) / 12) ** 2 + ((x - 72) / 12) ** 2 <= 1) & (z >= 28) & (z < 36)] = GAS
    hu[(((y - 64) / 3) ** 2 + ((x - 72) / 3) ** 2 <= 1) & (z >= 20)] = AIR  # airway to the top slice
    hu[(((y - 64) / 14) ** 2 + ((x - 148) / 8) ** 2 <= 1)] = TISSUE  # arm, not touching the trunk
    hu[2:4, 5:7, 5:7] = TISSUE  # noise
    return hu


def test_body_mask_keeps_lungs_gas_limbs_and_specks_and_drops_outside_air():
    hu = chest_phantom()
    mask = body_mask(hu)
    assert mask[10, 62, 48] and mask[10, 62, 96]  # lungs
    assert mask[30, 70, 72]  # bowel gas
    assert mask[25, 64, 72]  # the airway inside the trunk (filled slice by slice)
    assert mask[20, 64, 148]  # the arm
    assert mask[3, 6, 6]  # a speck: kept, a model may label it
    assert not mask[20, 2, 2] and not mask[20, 64, 136] and not mask[10, 6, 6]  # outside air, the gap to the arm
    assert not body_mask(np.full((4, 8, 8), AIR, dtype=np.float32)).any()


def test_window_occupancy_counts_like_a_sum():
    rng = np.random.default_rng(0)
    mask = rng.random((9, 11, 13)) > 0.97
    occ = WindowOccupancy(mask)
    for start, size in (((0, 0, 0), (9, 11, 13)), ((2, 3, 4), (3, 5, 2)), ((8, 10, 12), (1, 1, 1))):
        region = mask[tuple(slice(s, s + n) for s, n in zip(start, size))]
        assert occ.count(start, size) == region.sum()


def lung_model(spec: PreprocessSpec):
    """A per-voxel 'model' on the preprocessed window: lung-range intensities -> 1, tissue -> 2, else 0. Outside
    air (the window's floor) is background, as a trained lung model's would be."""
    lo, hi = spec.window

    def level(value: float) -> float:
        return (value - lo) / (hi - lo)

    def predict(batch: np.ndarray) -> np.ndarray:
        x = batch[:, 0]
        lung = (x > level(-950)) & (x < level(-500))
        tissue = x >= level(-500)
        return np.stack([~(lung | tissue), lung, tissue], axis=1).astype(np.float32)

    return predict


def run(hu: np.ndarray, roi: tuple[int, int, int], mask_fn=None) -> tuple[np.ndarray, np.ndarray, dict]:
    spec = PreprocessSpec(spacing=(SPACING,) * 3, roi=roi, window=(-1000.0, 400.0))
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((SPACING,) * 3)
    prepared = Preprocessor(spec).forward(image, with_body=True)
    body = prepared.body if mask_fn is None else np.pad(mask_fn(hu), [(a, b) for a, b in prepared.pad])
    sw = SlidingWindow(roi, roi, 3, overlap=0.25, batch_size=4)
    full = sw(prepared.array, lung_model(spec))
    skipped = sw(prepared.array, lung_model(spec), body=body)
    return full, skipped, sw.last_stats


def test_skipping_outside_the_body_never_changes_a_lung_model_answer():
    hu = chest_phantom()
    full, skipped, stats = run(hu, (8, 16, 16))
    assert stats["skipped"] > 0, stats  # the phantom has windows wholly in the outside air
    assert (full == 1).sum() > 1000  # the model does label lung
    assert np.array_equal(full, skipped)


def test_a_mask_without_the_lungs_would_change_the_answer():
    """The same test fails for a naive mask (tissue only, no hole filling): it is not vacuous."""
    hu = chest_phantom()
    full, skipped, _ = run(hu, (8, 16, 16), mask_fn=lambda v: v > -500)
    assert not np.array_equal(full, skipped)
    assert (skipped == 1).sum() < (full == 1).sum()
