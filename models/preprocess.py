"""The preprocessing contract shared by training and serving (numpy + SimpleITK, no torch).

forward: reorient to the canonical orientation (an exact axis permutation/flip), resample to the model spacing
(linear for images, nearest for labels), clip and scale intensities, pad to at least the ROI.
inverse: model-grid labels back onto the input's exact grid (nearest neighbour in physical space), so the
output label map has the input's shape and affine whatever its orientation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from models.axes import Triple, as_float_triple, as_triple
from models.body_mask import body_mask
from models.volume import Geometry, Volume

AIR_HU = -1024.0
CANONICAL_ORIENTATION = "LPS"  # ITK code: index x runs toward Left, y toward Posterior, z toward Superior


@dataclass(frozen=True)
class PreprocessSpec:
    """Parameters stored in every bundle; the same values drive training and serving."""

    spacing: tuple[float, float, float]  # (D, H, W) mm
    roi: Triple  # network window (D, H, W) voxels
    window: tuple[float, float] = (-175.0, 250.0)  # HU clipped then scaled to [0, 1]
    orientation: str = CANONICAL_ORIENTATION

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", as_float_triple(self.spacing, "spacing"))
        object.__setattr__(self, "roi", as_triple(self.roi, "roi"))
        lo, hi = (float(v) for v in self.window)
        if not lo < hi:
            raise ValueError(f"intensity window must be (low, high) with low < high; got {self.window}")
        object.__setattr__(self, "window", (lo, hi))
        if len(self.orientation) != 3:
            raise ValueError(f"orientation must be a 3-letter ITK code like 'LPS'; got {self.orientation!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        return cls(spacing=tuple(data["spacing"]), roi=tuple(data["roi"]), window=tuple(data["window"]),
                   orientation=data.get("orientation", CANONICAL_ORIENTATION))


@dataclass(frozen=True)
class Prepared:
    """The network-ready array and what is needed to go back to the input grid."""

    array: np.ndarray  # float32 [D, H, W] on the model grid, padded to >= ROI
    model_geometry: Geometry  # geometry of the unpadded model-grid array
    source_geometry: Geometry  # the input's grid: where the inverse lands
    pad: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    body: np.ndarray | None = None  # bool [D, H, W] like ``array``: the patient (models/body_mask.py)


def reorient(image: sitk.Image, orientation: str = CANONICAL_ORIENTATION) -> sitk.Image:
    return sitk.DICOMOrient(image, orientation)


def resample_to_spacing(
    image: sitk.Image, spacing_dhw: tuple[float, float, float], interpolator: int, fill: float = 0.0,
    pixel_type: int | None = None,
) -> sitk.Image:
    """Resample onto a grid of the given spacing over the same extent; voxel [0,0,0] keeps its centre."""
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array(spacing_dhw[::-1], dtype=float)
    out_type = image.GetPixelID() if pixel_type is None else pixel_type
    if np.allclose(old_spacing, new_spacing, rtol=1e-6):
        return image if image.GetPixelID() == out_type else sitk.Cast(image, out_type)
    size = np.maximum(1, np.round(np.array(image.GetSize()) * old_spacing / new_spacing)).astype(int)
    return sitk.Resample(
        image, [int(s) for s in size], sitk.Transform(), interpolator, image.GetOrigin(), tuple(new_spacing),
        image.GetDirection(), fill, out_type,
    )


def scale_intensity(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    out = np.clip(array.astype(np.float32, copy=False), lo, hi)
    out -= lo
    out *= 1.0 / (hi - lo)
    return out


def pad_to(array: np.ndarray, roi: Triple, value: float) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    pads = []
    for size, want in zip(array.shape, roi):
        extra = max(0, want - size)
        pads.append((extra // 2, extra - extra // 2))
    if any(sum(p) for p in pads):
        array = np.pad(array, pads, mode="constant", constant_values=value)
    return array, tuple(pads)  # type: ignore[return-value]


class Preprocessor:
    """Applies a :class:`PreprocessSpec` to images (forward) and label maps (forward and inverse)."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec

    def to_model_grid(self, image: sitk.Image, is_label: bool = False) -> sitk.Image:
        oriented = reorient(image, self.spec.orientation)
        if is_label:
            return resample_to_spacing(oriented, self.spec.spacing, sitk.sitkNearestNeighbor, 0.0)
        # Interpolated straight into float32: no full-resolution float copy of an integer CT.
        return resample_to_spacing(oriented, self.spec.spacing, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)

    def forward(self, image: sitk.Image, with_body: bool = False) -> Prepared:
        """``with_body``: also find the patient on the model grid (in HU, before the window), for window skipping."""
        source = Geometry.of(image)
        grid = self.to_model_grid(image)
        hu = sitk.GetArrayViewFromImage(grid)
        array = scale_intensity(hu, self.spec.window)
        padded, pads = pad_to(array, self.spec.roi, 0.0)  # 0 = the window's low end (air)
        body = pad_to(body_mask(hu), self.spec.roi, False)[0] if with_body else None
        return Prepared(np.ascontiguousarray(padded), Geometry.of(grid), source, pads, body)

    def forward_labels(self, labels: sitk.Image) -> np.ndarray:
        grid = self.to_model_grid(labels, is_label=True)
        padded, _ = pad_to(sitk.GetArrayFromImage(grid), self.spec.roi, 0)
        return padded

    def inverse(self, labels: np.ndarray, prepared: Prepared) -> Volume:
        """Model-grid labels (padded shape) -> labels on the source grid, voxel-exact geometry."""
        (d0, _), (h0, _), (w0, _) = prepared.pad
        d, h, w = prepared.model_geometry.shape
        core = np.ascontiguousarray(labels[d0:d0 + d, h0:h0 + h, w0:w0 + w])
        img = prepared.model_geometry.apply(sitk.GetImageFromArray(core))
        back = sitk.Resample(img, prepared.source_geometry.reference_image(), sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0, img.GetPixelID())
        return Volume(sitk.GetArrayFromImage(back), prepared.source_geometry)
