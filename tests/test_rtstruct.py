"""The RT Structure Set against independent readers: dciodvfy (dicom3tools), pydicom, and a polygon fill written
here, which maps each contour point back through its source image's own geometry (read from the image's
header, not from ctseg) and fills the contours of a plane by the even-odd rule (PS3.3 C.8.8.6.3's XOR).

Phantoms are defined in patient space (LPS mm): the label map handed to the writer is sampled on the grid the
reader builds, the truth on each source image's pixel centres, so a flipped axis, a swapped pixel spacing or a
slice put on the wrong image shows as a low Dice.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from bundles import labels_only_bundle
from common import DEMO_BUNDLE
from dicom_factory import enhanced_from_image, series_from_image, to_bytes
from pydicom.dataset import Dataset
from test_dicom_conformance import dciodvfy_errors

from models.bundle import load_bundle
from server.imaging.dicom_reader import load_series
from server.imaging.rtstruct import RTStructError, build_rtstruct, plane_contours

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ct_abdomen_slab"
MIN_DICE = 0.95
BUNDLE = labels_only_bundle(4)  # 1 block, 2 ring (a hole), 3 two islands, 4 absent; 2 and 3 carry laterality

# Shapes in LPS mm: +x is the patient's left, -y anterior, +z head. None is symmetric along any axis, so a
# mirrored row, column or slice order moves it.
BLOCK = ((10.0, 30.0), (-28.0, -12.0), (-4.0, 13.0))  # a box in the patient's left anterior, towards the head
RING = ((-16.0, 12.0), 12.0, 5.0, (-12.0, 5.0))  # centre (x, y), outer and inner radius, z range
ISLANDS = (((-22.0, -20.0), 6.0, (-9.0, 3.0)), ((20.0, 18.0), 6.0, (-2.0, 11.0)))  # discs: centre, radius, z
FIELD = (68.0, 60.0, 30.0)  # the physical box the grid covers, centred on 0


def truth(points: np.ndarray) -> np.ndarray:
    """(N, 3) LPS points -> label values of the phantom."""
    x, y, z = points.T
    out = np.zeros(len(points), dtype=np.uint8)
    (x0, x1), (y0, y1), (z0, z1) = BLOCK
    out[(x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (z >= z0) & (z <= z1)] = 1
    (cx, cy), outer, inner, (z0, z1) = RING
    r = np.hypot(x - cx, y - cy)
    out[(r <= outer) & (r > inner) & (z >= z0) & (z <= z1)] = 2
    for (cx, cy), radius, (z0, z1) in ISLANDS:
        out[(np.hypot(x - cx, y - cy) <= radius) & (z >= z0) & (z <= z1)] = 3
    return out


DIRECTIONS = {  # columns: the x (column), y (row) and z (slice) index axes in LPS
    "axial": np.eye(3),
    "negated_row": np.diag([-1.0, 1.0, 1.0]),
    "negated_column": np.diag([1.0, -1.0, 1.0]),
    "feet_first_order": np.diag([1.0, 1.0, -1.0]),  # slices written from head to feet
    "feet_first_supine": np.diag([-1.0, 1.0, -1.0]),  # what an FFS scan writes
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
    "oblique": np.array([[1.0, 0, 0], [0, np.cos(0.35), -np.sin(0.35)], [0, np.sin(0.35), np.cos(0.35)]]),
}
SPACING = (2.0, 1.5, 3.0)  # between columns, between rows, between slices: a swapped PixelSpacing shows


def phantom_image(direction: np.ndarray, spacing: tuple[float, float, float] = SPACING) -> sitk.Image:
    """HU image of the phantom on a grid of ``direction`` (columns may be sheared: a gantry tilt)."""
    extent = np.abs(direction).T @ np.asarray(FIELD)
    shape = np.maximum(np.ceil(extent / np.asarray(spacing)).astype(int) + 1, 2)
    origin = -direction @ ((shape - 1) * np.asarray(spacing) / 2)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    idx = np.stack([ii, jj, kk], -1).reshape(-1, 3) * np.asarray(spacing)
    labels = truth(origin + idx @ direction.T).reshape(tuple(shape)).transpose(2, 1, 0)
    image = sitk.GetImageFromArray(labels.astype(np.int16) * 60 + 40)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in direction.flatten()))
    return image


def grid_labels(series, label_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The label map on the grid the reader built (what inference hands the writer)."""
    geometry = series.volume.geometry
    index = np.indices(geometry.shape).reshape(3, -1).T
    return label_of(geometry.index_to_physical(index)).reshape(geometry.shape)


# --- the independent reader -------------------------------------------------------------------------------------

def pixel_geometry(image: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(position, along a row, down a column, (row spacing, column spacing)) from an image's own header."""
    if "PerFrameFunctionalGroupsSequence" in image:
        raise AssertionError("use frame_geometry for a multi-frame image")
    iop = np.asarray(image.ImageOrientationPatient, float)
    return (np.asarray(image.ImagePositionPatient, float), iop[:3], iop[3:], np.asarray(image.PixelSpacing, float))


def frame_geometry(image: Dataset, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    shared = image.SharedFunctionalGroupsSequence[0]
    per = image.PerFrameFunctionalGroupsSequence[frame - 1]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    return (np.asarray(per.PlanePositionSequence[0].ImagePositionPatient, float), iop[:3], iop[3:],
            np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float))


def pixel_centres(geometry, shape: tuple[int, int]) -> np.ndarray:
    position, along_row, down_column, spacing = geometry
    r, c = np.indices(shape).reshape(2, -1)
    return position + np.outer(c * spacing[1], along_row) + np.outer(r * spacing[0], down_column)


def even_odd_fill(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixel centres inside an odd number of polygon boundaries ((row, column) vertices): a horizontal ray from
    each centre, crossings counted with the half-open rule."""
    inside = np.zeros(shape, dtype=bool)
    columns = np.arange(shape[1])
    for polygon in polygons:
        for (r0, c0), (r1, c1) in zip(polygon, np.roll(polygon, -1, axis=0)):
            if r0 == r1:
                continue
            lo, hi = min(r0, r1), max(r0, r1)
            for r in range(max(int(np.ceil(lo)), 0), min(int(np.ceil(hi)), shape[0])):
                x = c0 + (r - r0) * (c1 - c0) / (r1 - r0)
                inside[r] ^= columns < x
    return inside


def geometry_of(images: dict[str, Dataset], reference: Dataset):  # type: ignore[no-untyped-def]
    image = images[str(reference.ReferencedSOPInstanceUID)]
    if "ReferencedFrameNumber" in reference:
        return frame_geometry(image, int(reference.ReferencedFrameNumber))
    return pixel_geometry(image)


def polygons_by_plane(rt: Dataset, roi: int, images: dict[str, Dataset], read_geometry=geometry_of):  # type: ignore[no-untyped-def]
    """ROI ``roi``'s contours as (row, column) polygons on their images, keyed by (SOP UID, frame)."""
    item = next(i for i in rt.ROIContourSequence if int(i.ReferencedROINumber) == roi)
    out: dict[tuple[str, int | None], list[np.ndarray]] = defaultdict(list)
    for contour in item.get("ContourSequence", []):
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        (reference,) = contour.ContourImageSequence
        position, along_row, down_column, spacing = read_geometry(images, reference)
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        assert len(points) == int(contour.NumberOfContourPoints) >= 3
        offset = points - position
        assert np.abs(offset @ np.cross(along_row, down_column)).max() < 1e-3  # on its image's plane
        key = (str(reference.ReferencedSOPInstanceUID), reference.get("ReferencedFrameNumber"))
        out[key].append(np.stack([offset @ down_column / spacing[0], offset @ along_row / spacing[1]], axis=1))
    return out


def planes_of(images: list[Dataset]) -> list[tuple[tuple[str, int | None], Dataset, object]]:
    """Every source plane: (key, image, geometry read from its header)."""
    out = []
    for image in images:
        if "PerFrameFunctionalGroupsSequence" in image:
            out += [((str(image.SOPInstanceUID), f), image, frame_geometry(image, f))
                    for f in range(1, int(image.NumberOfFrames) + 1)]
        else:
            out.append(((str(image.SOPInstanceUID), None), image, pixel_geometry(image)))
    return out


def dice_per_roi(rt: Dataset, images: list[Dataset], expected: Callable[[tuple, Dataset, object], np.ndarray],
                 rois: list[int], read_geometry=geometry_of) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """Dice of each ROI's filled contours against ``expected(key, image, geometry)`` over every source plane."""
    by_uid = {str(image.SOPInstanceUID): image for image in images}
    planes = planes_of(images)
    truths = {key: expected(key, image, geometry) for key, image, geometry in planes}
    dice = {}
    for roi in rois:
        polygons = polygons_by_plane(rt, roi, by_uid, read_geometry)
        assert set(polygons) <= set(truths), "a contour references an image outside the series"
        both = total = 0
        for key, image, _ in planes:
            filled = even_odd_fill(polygons.get(key, []), (int(image.Rows), int(image.Columns)))
            want = truths[key] == roi
            both += int((filled & want).sum())
            total += int(filled.sum() + want.sum())
        dice[roi] = 2 * both / total if total else 1.0
    return dice


def physical_truth(key: tuple, image: Dataset, geometry) -> np.ndarray:  # type: ignore[no-untyped-def]
    shape = (int(image.Rows), int(image.Columns))
    return truth(pixel_centres(geometry, shape)).reshape(shape)


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def load(datasets: list[Dataset]):  # type: ignore[no-untyped-def]
    return load_series([(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)])


# --- tests -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_contours_fill_back_to_the_label_map_on_phantoms_of_any_orientation(orientation, tmp_path):
    sources = series_from_image(phantom_image(DIRECTIONS[orientation]))
    series = load(sources)
    data = build_rtstruct(series, grid_labels(series, truth), BUNDLE, result_id="job-1")
    dice = dice_per_roi(read(data), sources, physical_truth, [1, 2, 3])
    assert all(d >= MIN_DICE for d in dice.values()), (orientation, dice)
    # at the pixel centres the fill is the label map itself: the boundary runs half-way between centres, so
    # a half-pixel error (ImagePositionPatient taken as a pixel's corner) would not pass this
    assert dice == {1: 1.0, 2: 1.0, 3: 1.0}, (orientation, dice)
    path = tmp_path / "rtstruct.dcm"
    path.write_bytes(data)
    assert dciodvfy_errors(path) == []


def test_contours_mirrored_along_the_rows_fail_the_check():
    """The check above can fail: contours placed as a writer that ignores the negated row direction would place
    them (mirrored along each row) land on the patient's other side."""
    sources = series_from_image(phantom_image(DIRECTIONS["negated_row"]))
    series = load(sources)
    rt = read(build_rtstruct(series, grid_labels(series, truth), BUNDLE, result_id="job-1"))
    assert dice_per_roi(rt, sources, physical_truth, [1])[1] >= MIN_DICE
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for item in rt.ROIContourSequence:
        for contour in item.get("ContourSequence", []):
            image = by_uid[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            position, along_row, _, spacing = pixel_geometry(image)
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            column = (points - position) @ along_row / spacing[1]
            mirrored = points + np.outer((int(image.Columns) - 1 - 2 * column) * spacing[1], along_row)
            contour.ContourData = [round(float(v), 4) for v in mirrored.ravel()]
    assert dice_per_roi(rt, sources, physical_truth, [1])[1] < 0.5


def test_holes_and_islands_are_separate_contours_wound_apart():
    sources = series_from_image(phantom_image(np.eye(3)))
    series = load(sources)
    rt = read(build_rtstruct(series, grid_labels(series, truth), BUNDLE, result_id="job-1"))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    middle = min(sources, key=lambda ds: abs(float(ds.ImagePositionPatient[2])))
    key = (str(middle.SOPInstanceUID), None)
    shape = (int(middle.Rows), int(middle.Columns))

    def signed_area(polygon: np.ndarray) -> float:
        r, c = polygon.T
        return float(0.5 * (c * np.roll(r, -1) - np.roll(c, -1) * r).sum())

    ring = polygons_by_plane(rt, 2, by_uid)[key]
    assert len(ring) == 2  # the outer boundary and the hole
    outer, hole = sorted(ring, key=lambda p: -abs(signed_area(p)))
    assert np.sign(signed_area(outer)) == -np.sign(signed_area(hole))
    want = physical_truth(key, middle, pixel_geometry(middle)) == 2
    filled_hole = even_odd_fill([outer], shape)
    assert 2 * (filled_hole & want).sum() / (filled_hole.sum() + want.sum()) < 0.9  # the hole matters
    assert np.array_equal(even_odd_fill(ring, shape), want)
    islands = polygons_by_plane(rt, 3, by_uid)[key]
    assert len(islands) == 2 and np.sign(signed_area(islands[0])) == np.sign(signed_area(islands[1]))


def test_plane_contours_of_a_mask_with_a_hole_and_a_diagonal_pair():
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a one-pixel hole
    mask[7, 7] = mask[8, 8] = True  # diagonal neighbours: one island (8-connected)
    contours = plane_contours(mask)
    assert len(contours) == 3
    assert np.array_equal(even_odd_fill(contours, mask.shape), mask)
    # the outer boundary of the 5x5 square: four sides, corners cut at the half pixel, no collinear points
    outer = max(contours, key=len)
    assert len(outer) == 8 and outer.min() == 0.5 and outer.max() == 5.5


def test_a_gantry_tilted_series_is_contoured_on_its_source_slices(tmp_path):
    a = np.radians(15.0)
    sheared = np.eye(3)
    sheared[:, 2] = (0.0, np.sin(a), np.cos(a))  # each slice axial, the stack advancing along z and y
    sources = series_from_image(phantom_image(sheared, (2.0, 1.5, 3.0 / np.cos(a))))
    series = load(sources)
    assert series.tilt is not None
    labels = grid_labels(series, truth)
    on_slices = series.to_slices(labels)
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(series.datasets)}
    data = build_rtstruct(series, labels, BUNDLE, result_id="job-1")
    # exactly what the SEG's frames hold on each source slice ...
    exact = dice_per_roi(read(data), sources, lambda key, image, geometry: on_slices[index[key[0]]], [1, 2, 3])
    assert all(d == 1.0 for d in exact.values()), exact
    # ... and that is the anatomy on the source slices, within the nearest-neighbour shift of the grid
    physical = dice_per_roi(read(data), sources, physical_truth, [1, 2, 3])
    assert all(d >= 0.85 for d in physical.values()), physical
    path = tmp_path / "rtstruct.dcm"
    path.write_bytes(data)
    assert dciodvfy_errors(path) == []


def test_an_enhanced_ct_is_referenced_frame_by_frame(tmp_path):
    enhanced = enhanced_from_image(phantom_image(DIRECTIONS["feet_first_supine"]))
    series = load([enhanced])
    assert series.multiframe
    data = build_rtstruct(series, grid_labels(series, truth), BUNDLE, result_id="job-1")
    rt = read(data)
    dice = dice_per_roi(rt, [enhanced], physical_truth, [1, 2, 3])
    assert all(d >= MIN_DICE for d in dice.values()), dice
    images = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    frames = sorted(int(i.ReferencedFrameNumber) for i in images.ContourImageSequence)
    assert frames == list(range(1, int(enhanced.NumberOfFrames) + 1))
    path = tmp_path / "rtstruct.dcm"
    path.write_bytes(data)
    assert dciodvfy_errors(path) == []


def fixture_series():  # type: ignore[no-untyped-def]
    image = sitk.ReadImage(str(FIXTURE / "ct.nii.gz"))
    label_image = sitk.ReadImage(str(FIXTURE / "labels.nii.gz"))
    sources = series_from_image(image)
    return sources, load(sources), label_image


def sample(label_image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """The fixture's labels at LPS points (nearest voxel; 0 outside), from the NIfTI's own geometry."""
    direction = np.asarray(label_image.GetDirection()).reshape(3, 3)
    index = np.linalg.solve(direction, (points - np.asarray(label_image.GetOrigin())).T).T
    index = np.rint(index / np.asarray(label_image.GetSpacing())).astype(int)  # (i, j, k) = (x, y, z)
    array = sitk.GetArrayFromImage(label_image)
    size = np.asarray(label_image.GetSize())
    ok = ((index >= 0) & (index < size)).all(axis=1)
    out = np.zeros(len(points), dtype=array.dtype)
    out[ok] = array[index[ok, 2], index[ok, 1], index[ok, 0]]
    return out


def test_real_ct_fixture_with_the_demo_bundles_labels(tmp_path):
    sources, series, label_image = fixture_series()
    bundle = load_bundle(DEMO_BUNDLE, verify_checksums=False)
    labels = grid_labels(series, lambda points: sample(label_image, points))
    present = sorted(int(v) for v in np.unique(labels) if v)
    assert len(present) >= 8  # the slab holds most of the abdominal organs

    def expected(key, image, geometry):  # type: ignore[no-untyped-def]
        shape = (int(image.Rows), int(image.Columns))
        return sample(label_image, pixel_centres(geometry, shape)).reshape(shape)

    data = build_rtstruct(series, labels, bundle, result_id="job-1")
    dice = dice_per_roi(read(data), sources, expected, present)
    names = {label.value: label.name for label in bundle.labels}
    assert all(d >= MIN_DICE for d in dice.values()), {names[v]: round(d, 4) for v, d in dice.items()}
    assert all(d == 1.0 for d in dice.values()), {names[v]: round(d, 4) for v, d in dice.items()}  # exact, as above
    path = tmp_path / "rtstruct.dcm"
    path.write_bytes(data)
    assert dciodvfy_errors(path) == []


def test_pydicom_reads_back_the_bundles_names_colours_and_codes():
    sources = series_from_image(phantom_image(np.eye(3)))
    series = load(sources)
    data = build_rtstruct(series, grid_labels(series, truth), BUNDLE, result_id="job-1",
                          seg_sop_instance_uid="1.2.826.0.1.3680043.8.498.1")
    rt = read(data)
    assert rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and rt.Modality == "RTSTRUCT"
    labels = {label.value: label for label in BUNDLE.labels}
    rois = {int(i.ROINumber): i for i in rt.StructureSetROISequence}
    observations = {int(i.ReferencedROINumber): i for i in rt.RTROIObservationsSequence}
    contours = {int(i.ReferencedROINumber): i for i in rt.ROIContourSequence}
    assert set(rois) == set(observations) == set(contours) == set(labels)
    for value, label in labels.items():
        assert rois[value].ROIName == label.name
        assert rois[value].ReferencedFrameOfReferenceUID == series.frame_of_reference_uid
        assert rois[value].ROIGenerationAlgorithm == "AUTOMATIC"
        algorithm = rois[value].ROIDerivationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (BUNDLE.name, BUNDLE.version)
        assert tuple(int(c) for c in contours[value].ROIDisplayColor) == label.color
        obs = observations[value]
        assert obs.RTROIInterpretedType == "ORGAN"
        category = obs.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == (
            label.category.value, label.category.scheme, label.category.meaning)
        code = obs.RTROIIdentificationCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
            label.type.value, label.type.scheme, label.type.meaning)
        modifier = code.get("SegmentedPropertyTypeModifierCodeSequence")
        assert (modifier[0].CodeMeaning if modifier else None) == (label.modifier.meaning if label.modifier else None)
    assert "ContourSequence" not in contours[4]  # absent from the label map: an empty ROI, still listed
    assert all(len(contours[v].ContourSequence) > 0 for v in (1, 2, 3))
    # the CT series and every source image; patient and study as the source; a series of its own
    referenced = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.series_uid
    assert [i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence] == [
        ds.SOPInstanceUID for ds in series.datasets]
    source = sources[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "AccessionNumber", "StudyID", "StudyDate"):
        assert rt[keyword].value == source[keyword].value, keyword
    assert rt.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert rt.SeriesInstanceUID not in (source.SeriesInstanceUID, rt.SOPInstanceUID)
    assert rt.Manufacturer == "ctseg" and rt.ManufacturerModelName == BUNDLE.name
    assert rt.StructureSetLabel and rt.StructureSetDate and rt.StructureSetTime
    assert "1.2.826.0.1.3680043.8.498.1" in rt.DerivationDescription


def test_uids_follow_the_result():
    sources = series_from_image(phantom_image(np.eye(3)))
    series = load(sources)
    labels = grid_labels(series, truth)
    one, again, other = (read(build_rtstruct(series, labels, BUNDLE, result_id=r)) for r in ("a", "a", "b"))
    assert (one.SeriesInstanceUID, one.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert one.SOPInstanceUID != other.SOPInstanceUID and one.SeriesInstanceUID != other.SeriesInstanceUID
    from server.imaging.seg import build_seg

    seg = read(build_seg(series, labels, BUNDLE, result_id="a"))
    assert seg.SOPInstanceUID != one.SOPInstanceUID and seg.SeriesInstanceUID != one.SeriesInstanceUID
    assert seg.SeriesNumber != one.SeriesNumber


def test_a_label_map_the_bundle_does_not_describe_or_off_the_grid_is_refused():
    sources = series_from_image(phantom_image(np.eye(3)))
    series = load(sources)
    labels = grid_labels(series, truth)
    with pytest.raises(RTStructError, match=r"label values \[7\]"):
        build_rtstruct(series, np.where(labels == 3, 7, labels).astype(np.uint8), BUNDLE)
    with pytest.raises(RTStructError, match="not on the series grid"):
        build_rtstruct(series, labels[:-1], BUNDLE)
