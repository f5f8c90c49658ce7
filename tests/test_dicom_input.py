"""The DICOM reader on its own: sorting, rescale, padding, compression, multi-frame, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import RLELossless

from dicom_factory import compress_jpeg2000, enhanced_from_image, series_from_image, to_bytes
from phantoms import make_phantom
from server.imaging.dicom_reader import inspect_series, load_series
from server.core.errors import InputError


def blobs(datasets):
    return [(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]


@pytest.fixture(scope="module")
def image():
    img, _ = make_phantom((48, 40, 12), (1.5, 1.5, 3.0), "axial", seed=4)
    return img


def test_sorted_by_position_not_instance_number_and_hu_exact(image):
    datasets = series_from_image(image, slope=2.0, intercept=-2048.0)
    for ds, n in zip(datasets, np.random.default_rng(0).permutation(len(datasets))):
        ds.InstanceNumber = int(n) + 1  # meaningless numbering, as after some exports
    shuffled = [datasets[i] for i in np.random.default_rng(1).permutation(len(datasets))]
    series = load_series(blobs(shuffled))
    truth = sitk.GetArrayFromImage(image).astype(np.float32)
    assert np.array_equal(series.volume.array, np.round(truth / 2) * 2)  # slope 2 quantises to even HU
    assert np.allclose(series.volume.geometry.spacing, (3.0, 1.5, 1.5))
    assert np.allclose(series.volume.geometry.origin, image.GetOrigin(), atol=1e-3)


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes_decode_losslessly(image, syntax):
    datasets = series_from_image(image)
    for ds in datasets:
        ds.compress(RLELossless) if syntax == "rle" else compress_jpeg2000(ds)
    series = load_series(blobs(datasets))
    assert np.array_equal(series.volume.array, sitk.GetArrayFromImage(image).astype(np.float32))


def test_pixel_padding_becomes_air_and_monochrome1_is_noted(image):
    datasets = series_from_image(image)
    for ds in datasets:
        ds.PixelPaddingValue = 0  # stored 0 = -1024 HU after rescale; make a padded corner
        arr = np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns).copy()
        arr[:2, :2] = 0
        ds.PixelData = arr.tobytes()
        ds.PhotometricInterpretation = "MONOCHROME1"
    series = load_series(blobs(datasets))
    assert (series.volume.array[:, :2, :2] == -1024).all()
    assert any("MONOCHROME1" in n for n in series.notes)


def test_enhanced_ct_frames_are_sorted_by_position(image):
    series = load_series(blobs([enhanced_from_image(image)]))
    assert series.multiframe and series.volume.shape == (12, 40, 48)
    assert np.array_equal(series.volume.array, sitk.GetArrayFromImage(image).astype(np.float32))
    assert series.frame_order == list(range(11, -1, -1))  # stored in reverse slice order


def test_header_inspection_matches_full_load(image):
    datasets = series_from_image(image)
    choice = inspect_series(blobs(datasets))
    assert choice.series_uid == datasets[0].SeriesInstanceUID
    assert choice.geometry == load_series(blobs(datasets)).volume.geometry


def test_refusals_name_the_problem(image):
    datasets = series_from_image(image)
    with pytest.raises(InputError, match="a single slice is not a volume"):
        load_series(blobs(datasets[:1]))
    mixed = series_from_image(image, series_uid=datasets[0].SeriesInstanceUID)
    mixed[3].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(InputError, match="different ImageOrientationPatient"):
        load_series(blobs(mixed))
    with pytest.raises(InputError, match="series 9.9.9 is not in the upload"):
        load_series(blobs(datasets), series_uid="9.9.9")
    uneven = series_from_image(image)
    for k, ds in enumerate(uneven):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + (0.6 if k % 2 else 0.0)]
    with pytest.raises(InputError, match="slice spacing varies"):
        load_series(blobs(uneven))
