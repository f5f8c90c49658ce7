"""A typed CT volume: voxels in (D, H, W) order with the physical geometry that places them.

Never a property dict: what a volume is (array, spacing, origin, direction) is fixed when it is constructed,
and converting to and from SimpleITK is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


class GeometryError(ValueError):
    """A volume's geometry is not usable (degenerate direction, non-positive spacing, shape mismatch)."""


@dataclass(frozen=True)
class Geometry:
    """Where voxels lie: ``shape`` and ``spacing`` in (D, H, W) order; ``origin`` (x, y, z) in mm, LPS, of voxel
    [0, 0, 0]; ``direction`` the 3x3 matrix whose columns are the x, y, z index axes (ITK convention)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise GeometryError(f"shape must be three positive sizes (D, H, W); got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise GeometryError(f"spacing must be three positive numbers (D, H, W); got {self.spacing}")
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if abs(abs(np.linalg.det(d)) - 1) > 1e-3:
            raise GeometryError(f"direction must be orthonormal; got determinant {np.linalg.det(d):.4f}")

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        sx, sy, sz = image.GetSize()
        px, py, pz = image.GetSpacing()
        return cls((sz, sy, sx), (pz, py, px), tuple(image.GetOrigin()), tuple(image.GetDirection()))  # type: ignore[arg-type]

    def apply(self, image: sitk.Image) -> sitk.Image:
        if Geometry.of(image).shape != self.shape:
            raise GeometryError(f"image shape {Geometry.of(image).shape} does not match geometry {self.shape}")
        image.SetSpacing((self.spacing[2], self.spacing[1], self.spacing[0]))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self) -> sitk.Image:
        """An empty image with this geometry (a resampling target)."""
        ref = sitk.Image(self.shape[2], self.shape[1], self.shape[0], sitk.sitkUInt8)
        return self.apply(ref)

    def index_to_physical(self, index_dhw: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices in (D, H, W) order -> (N, 3) LPS points (x, y, z) in mm."""
        ijk = np.asarray(index_dhw, dtype=float)[:, ::-1] * np.array(self.spacing[::-1])
        return np.asarray(self.origin) + ijk @ np.asarray(self.direction).reshape(3, 3).T

    def same_grid(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


@dataclass(frozen=True)
class Volume:
    """Voxels ``array[D, H, W]`` and their geometry."""

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if self.array.ndim != 3 or tuple(self.array.shape) != tuple(self.geometry.shape):
            raise GeometryError(f"array shape {self.array.shape} does not match geometry shape {self.geometry.shape}")

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        if image.GetDimension() != 3:
            raise GeometryError(f"expected a 3D image; got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise GeometryError(f"expected one value per voxel; got {image.GetNumberOfComponentsPerPixel()}")
        return cls(sitk.GetArrayFromImage(image), Geometry.of(image))

    def to_sitk(self) -> sitk.Image:
        return self.geometry.apply(sitk.GetImageFromArray(self.array))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape
