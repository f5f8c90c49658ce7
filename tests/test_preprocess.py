"""The preprocessing contract: canonical grid forward, exact inverse back to the input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from models.preprocess import PreprocessSpec, Preprocessor, scale_intensity
from models.volume import Geometry, GeometryError, Volume
from phantoms import make_phantom


@pytest.mark.parametrize("orientation", ["axial", "ras", "coronal", "sagittal", "oblique"])
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_label_map_forward_and_back_is_voxel_exact(orientation, factor):
    spacing = (2.0, 1.5, 2.5)
    image, label = make_phantom((40, 36, 30), spacing, orientation, seed=1)
    # model spacing equal to, or an exact subdivision of, the source spacing: nothing is lost either way
    canonical = Geometry.of(sitk.DICOMOrient(image, "LPS"))  # spacing in the canonical axis order
    pre = Preprocessor(PreprocessSpec(spacing=tuple(s * factor for s in canonical.spacing), roi=(16, 16, 16)))
    prepared = pre.forward(image)
    model_labels = pre.forward_labels(label)
    assert model_labels.shape == prepared.array.shape
    back = pre.inverse(model_labels, prepared)
    assert back.geometry == Geometry.of(label)
    assert np.array_equal(back.array, sitk.GetArrayFromImage(label))


def test_inverse_lands_on_the_input_grid_when_resampling_coarser():
    image, label = make_phantom((70, 60, 40), (1.5, 1.5, 2.0), "ras", seed=2)
    pre = Preprocessor(PreprocessSpec(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 40)))
    prepared = pre.forward(image)
    assert prepared.array.shape == (32, 32, 40)  # padded up to the ROI
    assert prepared.pad != ((0, 0), (0, 0), (0, 0))
    back = pre.inverse(pre.forward_labels(label), prepared)
    truth = sitk.GetArrayFromImage(label)
    assert back.array.shape == truth.shape and back.geometry == Geometry.of(image)
    for value, least in ((1, 0.9), (2, 0.85), (3, 0.8)):  # bigger organs lose less to the 2x coarser grid
        a, b = back.array == value, truth == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > least


def test_forward_goes_to_the_canonical_orientation_and_spacing():
    image, _ = make_phantom((30, 20, 10), (1.0, 1.0, 2.0), "sagittal")
    pre = Preprocessor(PreprocessSpec(spacing=(2.0, 2.0, 2.0), roi=(8, 8, 8)))
    prepared = pre.forward(image)
    assert np.allclose(prepared.model_geometry.spacing, (2.0, 2.0, 2.0))
    assert prepared.array.dtype == np.float32
    assert 0.0 <= prepared.array.min() and prepared.array.max() <= 1.0
    # LPS: the direction's diagonal is positive for the nearest axes
    d = np.asarray(prepared.model_geometry.direction).reshape(3, 3)
    assert np.allclose(np.abs(d), np.eye(3)) and np.all(np.diag(d) > 0)


def test_intensity_window():
    out = scale_intensity(np.array([-1000, -175, 37.5, 250, 3000]), (-175, 250))
    assert np.allclose(out, [0, 0, 0.5, 1, 1])


def test_spec_and_volume_validation():
    with pytest.raises(ValueError, match="low < high"):
        PreprocessSpec(spacing=(1, 1, 1), roi=(8, 8, 8), window=(250, -175))
    with pytest.raises(ValueError, match="spacing must be three positive numbers"):
        PreprocessSpec(spacing=(1, 0, 1), roi=(8, 8, 8))
    geo = Geometry((2, 3, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).flatten()))
    with pytest.raises(GeometryError, match=r"array shape \(2, 3, 5\) does not match geometry shape \(2, 3, 4\)"):
        Volume(np.zeros((2, 3, 5)), geo)
    with pytest.raises(GeometryError, match="direction must be orthonormal"):
        Geometry((2, 3, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 0))
    spec = PreprocessSpec(spacing=(1.5, 1, 1), roi=(8, 16, 16))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
