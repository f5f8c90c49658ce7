"""The fast BINARY SEG writer against highdicom's own output: same dataset, element by element, same frames."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from bundles import labels_only_bundle
from dicom_factory import series_from_image
from phantoms import direction_matrix
from server.imaging.dicom_reader import build_series
from server.imaging.seg import build_seg

# Differ between any two highdicom calls too: a random UID and the wall clock.
VOLATILE = {"DimensionOrganizationUID", "ContributionDateTime", "ContentDate", "ContentTime",
            "InstanceCreationDate", "InstanceCreationTime", "SeriesDate", "SeriesTime"}


def dataset_differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    out = [f"{path}{tag} only in {'first' if tag in a else 'second'}" for tag in sorted(set(a.keys()) ^ set(b.keys()))]
    for tag in sorted(set(a.keys()) & set(b.keys())):
        x, y = a[tag], b[tag]
        if x.VR != y.VR:
            out.append(f"{path}{x.keyword} VR {x.VR} vs {y.VR}")
        elif x.VR == "SQ":
            if len(x.value) != len(y.value):
                out.append(f"{path}{x.keyword}: {len(x.value)} vs {len(y.value)} items")
                continue
            for i, (p, q) in enumerate(zip(x.value, y.value)):
                out += dataset_differences(p, q, f"{path}{x.keyword}[{i}].")
        elif x.keyword not in VOLATILE and x.value != y.value:
            out.append(f"{path}{x.keyword}: {str(x.value)[:60]} vs {str(y.value)[:60]}")
    return out


def make_series(orientation: str = "axial", size: tuple[int, int, int] = (24, 20, 10)):
    image = sitk.Image(*size, sitk.sitkInt16)
    image.SetSpacing((0.9, 0.9, 2.5))
    image.SetDirection(direction_matrix(orientation).ravel().tolist())
    datasets = series_from_image(image)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(datasets))  # build_series sorts them back by position
    return build_series(datasets[0].SeriesInstanceUID, [datasets[i] for i in order])


def blobs(shape: tuple[int, int, int], n_labels: int, seed: int = 0) -> np.ndarray:
    """Boxes of each label over a few slices, some slices empty, one label absent."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    for value in range(1, n_labels):  # the last label never occurs
        z = rng.integers(0, shape[0] - 3)
        y, x = rng.integers(0, shape[1] - 5), rng.integers(0, shape[2] - 5)
        labels[z:z + 3, y:y + 5, x:x + 5] = value
    return labels


PER_FRAME_TAG = b"\x00\x52\x30\x92SQ"  # (5200,9230) SQ, explicit VR little endian


def both(series, labels, bundle, **kwargs) -> tuple[Dataset, Dataset]:
    fast_bytes = build_seg(series, labels, bundle, result_id="same-result", **kwargs)
    reference_bytes = build_seg(series, labels, bundle, fast_binary=False, result_id="same-result", **kwargs)
    # The per-frame groups and the pixel data hold nothing volatile: they must be the same bytes.
    assert fast_bytes[fast_bytes.index(PER_FRAME_TAG):] == reference_bytes[reference_bytes.index(PER_FRAME_TAG):]
    return pydicom.dcmread(io.BytesIO(fast_bytes)), pydicom.dcmread(io.BytesIO(reference_bytes))


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "oblique"])
@pytest.mark.parametrize("keep_empty_frames", [False, True])
def test_same_dataset_as_highdicom(orientation, keep_empty_frames):
    series = make_series(orientation)
    bundle = labels_only_bundle(4)
    labels = blobs(series.volume.shape, 4)
    fast, reference = both(series, labels, bundle, keep_empty_frames=keep_empty_frames)
    assert dataset_differences(fast, reference) == []
    assert fast.NumberOfFrames == reference.NumberOfFrames
    assert fast.NumberOfFrames == (4 * 10 if keep_empty_frames else 3 * 3)
    np.testing.assert_array_equal(fast.pixel_array, reference.pixel_array)


@pytest.mark.parametrize("case", ["all empty", "one label (3D organisation)", "frames off byte boundaries",
                                  "source states its slice spacing"])
def test_edge_cases_match_highdicom(case):
    if case == "frames off byte boundaries":
        series = make_series(size=(13, 11, 6))  # 143 bits a frame
    else:
        series = make_series()
    if case == "source states its slice spacing":
        for ds in series.datasets:
            ds.SpacingBetweenSlices = "2.5"
    n = 1 if case.startswith("one label") else 3
    bundle = labels_only_bundle(n)
    labels = np.zeros(series.volume.shape, np.uint8)
    if case != "all empty":
        labels[2:5, 3:7, 4:9] = 1
        labels[4, 0, 0] = n
    fast, reference = both(series, labels, bundle)
    assert dataset_differences(fast, reference) == []
    np.testing.assert_array_equal(fast.pixel_array, reference.pixel_array)
    if case.startswith("one label"):
        assert fast.DimensionOrganizationType == "3D"


def test_highdicom_reads_the_segments_back_on_the_source_planes():
    series = make_series("oblique")
    labels = blobs(series.volume.shape, 5, seed=3)
    seg = hd.seg.segread(io.BytesIO(build_seg(series, labels, labels_only_bundle(5))))
    sources = [ds.SOPInstanceUID for ds in series.datasets]
    for value in range(1, 6):
        frames = seg.get_pixels_by_source_instance(sources, segment_numbers=[value], assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(frames[..., 0].astype(bool), labels == value)


def test_template_change_is_reported():
    from server.imaging.binary_seg import FrameStamper, TemplateError

    item = Dataset()
    item.FrameContentSequence = [Dataset()]
    with pytest.raises(TemplateError, match="per-frame item holds"):
        FrameStamper(item, [], [1])


def test_a_template_mismatch_falls_back_to_highdicoms_writer(monkeypatch, caplog):
    import server.imaging.binary_seg as fast

    series = make_series("axial")
    bundle = labels_only_bundle(3)
    labels = blobs(series.volume.shape, 3)
    reference = build_seg(series, labels, bundle, fast_binary=False, result_id="r")
    # what a highdicom upgrade that moves an element of the per-frame item looks like to the fast writer
    monkeypatch.setattr(fast, "FRAME_ITEM_TAGS", list(reversed(fast.FRAME_ITEM_TAGS)))
    fallback = build_seg(series, labels, bundle, result_id="r")
    assert "fast BINARY SEG writer does not fit highdicom" in caplog.text
    # highdicom's own output (creation times aside): the same header UIDs, per-frame groups and pixels
    assert fallback[fallback.index(PER_FRAME_TAG):] == reference[reference.index(PER_FRAME_TAG):]
    assert pydicom.dcmread(io.BytesIO(fallback)).SOPInstanceUID == pydicom.dcmread(io.BytesIO(reference)).SOPInstanceUID


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_label_counts_per_plane_match_numpy(dtype):
    from server.imaging.label_stats import label_counts, plane_counts

    labels = np.random.default_rng(0).integers(0, 7, size=(5, 9, 11)).astype(dtype)
    labels[2] = 0
    np.testing.assert_array_equal(plane_counts(labels)[3], np.bincount(labels[3].ravel(), minlength=7))
    np.testing.assert_array_equal(label_counts(labels, minlength=10), np.bincount(labels.ravel(), minlength=10))
