"""Gantry-tilted CT series: segmented on an orthogonal grid, the SEG on the source slices, the NIfTI on that grid.

The tilted series is the same phantom anatomy sampled on sheared slices (ITK resamples onto a grid whose slice axis
leans by the tilt), so its labels must match those of the untilted series at the same physical points.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import enhanced_from_image, series_from_image, to_bytes
from fastapi.testclient import TestClient
from phantoms import Organ, make_phantom

from server.app import create_app
from server.core.errors import InputError
from server.core.settings import Settings
from server.imaging.dicom_reader import inspect_series, load_series
from server.imaging.seg import build_seg

BLOCK = Organ(2, "block", (10.0, -6.0, 8.0), (14.0, 12.0, 12.0), 400.0)  # bright: label 2; the body is label 1
SHAPE, SPACING = (40, 36, 30), (2.0, 2.0, 2.5)


def phantom() -> sitk.Image:
    return make_phantom(SHAPE, SPACING, "axial", seed=3, noise=3.0, organs=(BLOCK,))[0]


def tilted(image: sitk.Image, degrees: float) -> sitk.Image:
    """``image``'s anatomy on slices tilted about the x axis (as a gantry tilts): each slice is axial and the
    stack advances along z and y; same size and spacing along z as ``image``, centred on the body."""
    a = np.radians(degrees)
    nx, ny, nz = image.GetSize()
    ref = sitk.Image(nx, ny, nz, sitk.sitkInt16)
    ref.SetSpacing((SPACING[0], SPACING[1], SPACING[2] / np.cos(a)))
    direction = np.eye(3)
    direction[:, 2] = (0.0, np.sin(a), np.cos(a))  # sheared: ITK images allow it, DICOM positions carry it
    ref.SetDirection(tuple(direction.flatten()))
    ref.SetOrigin(tuple(np.asarray(image.GetOrigin()) - (0.0, (nz - 1) * SPACING[2] * np.tan(a) / 2, 0.0)))
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1000.0)


def files(datasets: list) -> list[tuple[str, bytes]]:
    return [(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]


@pytest.fixture()
def client(intensity_bundle: Path, tmp_path: Path):
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage", sw_overlap=0.25)
    with TestClient(create_app(settings)) as c:
        yield c


def run_job(client: TestClient, upload: list[tuple[str, bytes]]) -> tuple[dict, bytes, bytes]:
    multipart = [("files", (name, data, "application/octet-stream")) for name, data in upload]
    r = client.post("/v1/segmentations", files=multipart, params={"wait": "true", "outputs": "both"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded", job
    seg = client.get(f"/v1/segmentations/{job['id']}/seg.dcm")
    nifti = client.get(f"/v1/segmentations/{job['id']}/labelmap.nii.gz")
    assert seg.status_code == 200 and nifti.status_code == 200
    return job, seg.content, nifti.content


def nifti_affine_lps(data: bytes) -> np.ndarray:
    """The 4x4 voxel (i, j, k) -> LPS mm matrix from the NIfTI-1 header's sform, read from the bytes (not ITK)."""
    header = gzip.decompress(data)[:348]
    assert struct.unpack("<i", header[:4])[0] == 348
    assert struct.unpack("<h", header[254:256])[0] > 0  # sform_code: the sform is meant
    srow = np.array(struct.unpack("<12f", header[280:328]), dtype=float).reshape(3, 4)
    affine = np.vstack([srow, [0, 0, 0, 1]])
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # NIfTI is RAS, DICOM LPS


def nifti_labels(data: bytes, tmp: Path) -> np.ndarray:
    """The label voxels [k, j, i] (the affine is checked from the header bytes, not through this reader)."""
    path = tmp / "labels.nii.gz"
    path.write_bytes(data)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def seg_on_sources(seg: hd.seg.Segmentation, datasets: list, by_uid: bool = True) -> np.ndarray:
    """The SEG's labels as an array [source slice, rows, cols] of ``datasets`` (single-frame slices), each frame
    put on the slice it references (``by_uid``; else on the slice at its plane position, for a multi-frame
    source), after checking that it lies there (the same plane position as that slice)."""
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(datasets)}
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    out = np.zeros((len(datasets), datasets[0].Rows, datasets[0].Columns), np.uint8)
    pixels = seg.pixel_array.reshape(-1, *out.shape[1:])
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        if by_uid:
            uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            k = index[uid]  # KeyError: a frame that references no source slice
        else:
            k = int(np.argmin(np.linalg.norm(positions - position, axis=1)))
        assert np.allclose(position, positions[k], atol=1e-3)
        out[k][pixels[i] > 0] = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    return out


def source_points(datasets: list) -> np.ndarray:
    """LPS mm of every source pixel [slice, row, col, xyz], from the source headers."""
    first = datasets[0]
    ori = np.asarray(first.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in first.PixelSpacing)
    r, c = np.meshgrid(np.arange(first.Rows), np.arange(first.Columns), indexing="ij")
    planes = [np.asarray(ds.ImagePositionPatient, float) for ds in datasets]
    return np.stack([p + (c * dc)[..., None] * ori[:3] + (r * dr)[..., None] * ori[3:] for p in planes])


def sample(labels_kji: np.ndarray, affine_lps: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Nearest label at LPS ``points`` (..., 3) of a label map with that affine; 0 outside it."""
    ijk = (np.linalg.inv(affine_lps) @ np.c_[points.reshape(-1, 3), np.ones(points[..., 0].size)].T)[:3].T
    idx = np.rint(ijk).astype(int)
    shape = labels_kji.shape[::-1]
    inside = ((idx >= 0) & (idx < shape)).all(axis=1)
    out = np.zeros(len(idx), labels_kji.dtype)
    out[inside] = labels_kji[idx[inside, 2], idx[inside, 1], idx[inside, 0]]
    return out.reshape(points.shape[:-1])


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    return 2 * float(((a == value) & (b == value)).sum()) / float((a == value).sum() + (b == value).sum())


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced"])
def test_tilted_series_segments_with_seg_on_its_slices_and_nifti_on_an_orthogonal_grid(client, tmp_path, enhanced):
    image = phantom()
    _, _, plain_nifti = run_job(client, files(series_from_image(image)))
    truth_affine, truth = nifti_affine_lps(plain_nifti), nifti_labels(plain_nifti, tmp_path)

    tilted_image = tilted(image, 15.0)
    sources = series_from_image(tilted_image)
    upload = files([enhanced_from_image(tilted_image)] if enhanced else sources)
    job, seg_bytes, nifti = run_job(client, upload)
    assert any("gantry tilt of 15.0 degrees corrected" in n for n in job["notes"]), job["notes"]

    # The SEG: one frame per source slice (per segment), each on the slice it references; labels match the
    # untilted series' at the same physical points.
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert len(referenced) == 1 if enhanced else referenced == {ds.SOPInstanceUID for ds in sources}
    on_slices = seg_on_sources(seg, sources, by_uid=not enhanced)  # the enhanced instance's frames: same positions
    expected = sample(truth, truth_affine, source_points(sources))
    assert dice(on_slices, expected, 1) >= 0.95 and dice(on_slices, expected, 2) >= 0.95

    # The NIfTI: an orthogonal grid (axial, no shear) whose affine puts the labels where the anatomy is.
    affine = nifti_affine_lps(nifti)
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    assert np.allclose(axes, np.eye(3), atol=1e-5)
    labels = nifti_labels(nifti, tmp_path)
    assert labels.shape[0] == len(sources) and labels.shape[1] > sources[0].Rows  # widened: every slice whole
    for point, value in ((BLOCK.center, 2), ((-25.0, 10.0, -5.0), 1), ((-25.0, 10.0, 20.0), 1)):
        assert sample(labels, affine, np.asarray([point]))[0] == value, point
    ks, js, is_ = np.nonzero(labels == 2)
    centre = (affine @ np.c_[is_, js, ks, np.ones(len(ks))].T)[:3].mean(axis=1)
    assert np.linalg.norm(centre - np.asarray(BLOCK.center)) < 1.5
    grid_points = (affine @ np.c_[np.argwhere(labels >= 0)[:, ::-1], np.ones(labels.size)].T)[:3].T
    expected = sample(truth, truth_affine, grid_points).reshape(labels.shape)
    seen = sample(np.ones_like(truth), truth_affine, grid_points).reshape(labels.shape) > 0  # inside both grids
    covered = labels > 0  # inside the tilted field of view (outside it the grid is filled with air)
    assert dice(labels[seen & covered], expected[seen & covered], 2) >= 0.95


def test_reader_puts_a_tilted_stack_on_an_orthogonal_grid_and_labels_back_on_its_slices():
    image = phantom()
    sources = series_from_image(tilted(image, 20.0))
    choice = inspect_series(files(sources))
    series = load_series(files(sources))
    assert choice.geometry == series.volume.geometry  # staging sees the grid inference will use
    geo = series.volume.geometry
    assert np.allclose(np.asarray(geo.direction).reshape(3, 3), np.eye(3)) and np.isclose(geo.spacing[0], 2.5)
    # HU on the grid are the phantom's at the grid's physical points (inside both fields of view)
    truth = sitk.GetArrayFromImage(sitk.Resample(image, series.volume.to_sitk(), sitk.Transform(),
                                                 sitk.sitkNearestNeighbor, -2000.0)).astype(float)
    inner = (truth > -2000) & (series.volume.array > -1024)
    assert inner.sum() > 0.5 * truth.size
    assert np.median(np.abs(series.volume.array[inner] - truth[inner])) < 10
    # a label map on the grid goes back to one plane per source slice; the LABELMAP SEG (highdicom's writer)
    # references each source and lies on it
    labels = (series.volume.array > 200).astype(np.uint8)
    on_slices = series.to_slices(labels)
    source_hu = np.stack([np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns) for ds in sources])
    bright = (source_hu.astype(float) - 1024 > 200).astype(np.uint8)  # the same threshold on the source slices
    assert on_slices.shape == bright.shape and dice(on_slices, bright, 1) >= 0.95
    from bundles import labels_only_bundle

    seg = pydicom.dcmread(io.BytesIO(build_seg(series, labels, labels_only_bundle(1), "LABELMAP", result_id="t")))
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = next(ds for ds in sources if ds.SOPInstanceUID == uid)
        assert np.allclose(np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float),
                           np.asarray(source.ImagePositionPatient, float), atol=1e-3)


def test_a_stack_sheared_past_what_a_gantry_tilts_or_off_one_line_is_refused():
    with pytest.raises(InputError, match="gantry tilt of 50.0 degrees .* more than a CT gantry tilts"):
        load_series(files(series_from_image(tilted(phantom(), 50.0))))
    # one slice moved 6 mm (3 pixels) in its plane, the others untilted: no tilt puts it there
    datasets = series_from_image(phantom())
    x, y, z = (float(v) for v in datasets[12].ImagePositionPatient)
    datasets[12].ImagePositionPatient = [x + 6.0, y, z]
    with pytest.raises(InputError, match=r"slice 13 \(in position order\) lies \d\.\d pixels off the line"):
        inspect_series(files(datasets))
