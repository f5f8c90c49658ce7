"""RT Structure Set output for radiotherapy planning systems, written with pydicom from the label map.

One ROI per label of the bundle (ROI Number = label value = the SEG's segment number), with its name, display
colour and the SEG segment's concept (category, type, laterality) in RT ROI Observations. Contours lie on the
source slices (a gantry-tilted series: on its own slices, through ``DicomSeries.to_slices``), each point placed
from that slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing, never from the orthogonal
grid: a flipped axis or feet-first order cannot shift or mirror them.

Contouring: scikit-image's marching squares at level 0.5 on each organ's padded binary mask, so every boundary
closes, and a boundary runs half-way between inside and outside pixel centres (sub-voxel placement); points on
a straight run are dropped (the polygon is unchanged). Islands and holes are each their own CLOSED_PLANAR
contour, holes wound opposite to islands: readers combine contours on a plane by even-odd (XOR), the rule
PS3.3 C.8.8.6.3 now states (CLOSEDPLANAR_XOR) and RT readers apply to CLOSED_PLANAR, and a non-zero-winding
reader agrees because of the winding. The keyhole alternative joins each hole to its island by a zero-width
channel that self-touches; it is not used.

An ROI whose label is absent keeps its Structure Set, Observation and ROI Contour items without a Contour
Sequence (Type 3): a planning system lists it as an empty structure, the same legend for every study, as the
SEG describes every segment.

Identifiers: server/imaging/result_identity.py (from the result, like the SEG's; the SOP class differs).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import uuid
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from skimage import measure

import ctseg
from models.bundle import Bundle
from models.labels import ANATOMICAL_STRUCTURE, Code, Label
from server.imaging.dicom_reader import DicomSeries, frames_of
from server.imaging.label_stats import plane_counts
from server.imaging.result_identity import result_identity
from server.imaging.sop import RT_STRUCTURE_SET_STORAGE

log = logging.getLogger(__name__)

# What RT Referenced Study Sequence's SOP Instance Reference names the study by (PS3.3 C.8.8.5): the Detached
# Study Management SOP Class (retired), as planning systems write and expect it.
STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
POINT_DECIMALS = 4  # mm: 0.1 micrometre, far below a pixel; 4 decimals keep each value within DS's 16 characters
CONTOUR_DATA = Tag(0x3006, 0x0050)


class RTStructError(ValueError):
    """The label map and the series cannot make a structure set (shape, unknown label values, geometry)."""


@dataclass(frozen=True)
class SourcePlane:
    """One source slice (or frame) as a contour references it and as its pixels lie in the patient."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based frame of a multi-frame instance; None for a single-frame image
    position: tuple[float, float, float]  # ImagePositionPatient: centre of pixel [0, 0], mm
    row_direction: tuple[float, float, float]  # ImageOrientationPatient[:3]: along a row (column index grows)
    column_direction: tuple[float, float, float]  # ImageOrientationPatient[3:]: down a column (row index grows)
    pixel_spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns), mm

    def __post_init__(self) -> None:
        values = (*self.position, *self.row_direction, *self.column_direction, *self.pixel_spacing)
        if not np.isfinite(values).all() or min(self.pixel_spacing) <= 0:
            raise RTStructError(f"source image {self.sop_instance_uid}: geometry is not finite and positive")
        r, c = np.asarray(self.row_direction), np.asarray(self.column_direction)
        if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
            raise RTStructError(f"source image {self.sop_instance_uid}: ImageOrientationPatient is not orthonormal")

    def to_patient(self, row_col: np.ndarray) -> np.ndarray:
        """(N, 2) (row, column) pixel coordinates -> (N, 3) patient (LPS) points in mm."""
        rc = np.asarray(row_col, dtype=float)
        return (np.asarray(self.position)
                + np.outer(rc[:, 1] * self.pixel_spacing[1], self.row_direction)
                + np.outer(rc[:, 0] * self.pixel_spacing[0], self.column_direction))

    def reference(self) -> Dataset:
        """This image as a Contour Image Sequence item (Image SOP Instance Reference Macro)."""
        item = Dataset()
        item.ReferencedSOPClassUID = self.sop_class_uid
        item.ReferencedSOPInstanceUID = self.sop_instance_uid
        if self.frame_number is not None:
            item.ReferencedFrameNumber = self.frame_number
        return item


def source_planes(series: DicomSeries) -> list[SourcePlane]:
    """The series' source slices in its slice order (the order of ``series.to_slices``), each with its own
    geometry as the reader parsed it (one frame of an Enhanced CT per plane)."""
    if series.multiframe:
        ds = series.datasets[0]
        frames = frames_of(ds)
        picked = [(frames[i], i + 1) for i in series.frame_order]  # type: ignore[attr-defined]
    else:
        picked = [(frames_of(ds)[0], None) for ds in series.datasets]
    planes = []
    for frame, number in picked:
        ori = np.asarray(frame.orientation, dtype=float)
        row, col = ori[:3] / np.linalg.norm(ori[:3]), ori[3:] / np.linalg.norm(ori[3:])
        planes.append(SourcePlane(
            str(frame.dataset.SOPClassUID), str(frame.dataset.SOPInstanceUID), number,
            tuple(float(v) for v in frame.position), tuple(float(v) for v in row),  # type: ignore[arg-type]
            tuple(float(v) for v in col), (float(frame.pixel_spacing[0]), float(frame.pixel_spacing[1])),  # type: ignore[arg-type]
        ))
    return planes


def _drop_collinear(polygon: np.ndarray) -> np.ndarray:
    """Vertices in the middle of a straight run removed (marching squares puts one on every pixel edge)."""
    before = polygon - np.roll(polygon, 1, axis=0)
    after = np.roll(polygon, -1, axis=0) - polygon
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = np.abs(turn) > 1e-9
    return polygon[keep] if keep.sum() >= 3 else polygon


def plane_contours(mask: np.ndarray) -> list[np.ndarray]:
    """One plane's binary mask -> its boundaries as closed polygons of (row, column) pixel coordinates (closing
    point not repeated): one per island and one per hole, holes wound opposite to islands. Diagonal neighbours
    belong to one island (the foreground is 8-connected)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    # cropped to the organ and padded by one background pixel: every boundary closes inside the array
    crop = np.pad(mask[r0:rows[-1] + 1, c0:cols[-1] + 1], 1).astype(np.float64)
    out = []
    for line in measure.find_contours(crop, 0.5, fully_connected="high", positive_orientation="high"):
        if len(line) < 4 or not np.array_equal(line[0], line[-1]):
            raise RTStructError("marching squares returned an open boundary on a padded mask")  # cannot happen
        out.append(_drop_collinear(line[:-1]) + (r0 - 1, c0 - 1))
    return out


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme, code.meaning
    return item


def contour_data(points: np.ndarray) -> RawDataElement:
    """(N, 3) patient points -> the Contour Data element, encoded here: rounded to POINT_DECIMALS, trailing zeros
    dropped, backslash-separated, padded to even length. pydicom writes such an element as it is; building one
    DSfloat per value instead (a 512x512x300 series has hundreds of thousands) would take most of the writer's time."""
    rounded = np.round(np.asarray(points, dtype=float).ravel(), POINT_DECIMALS) + 0.0  # no negative zero
    text = "\\".join(f"{v:.{POINT_DECIMALS}f}".rstrip("0").rstrip(".") for v in rounded.tolist())
    if not np.isfinite(rounded).all() or np.abs(rounded).max() >= 1e10:
        raise RTStructError("contour points are not finite numbers that fit a DS value")
    data = text.encode("ascii")
    if len(data) % 2:
        data += b" "
    return RawDataElement(CONTOUR_DATA, "DS", len(data), data, 0, False, True)


def _contours(plane: SourcePlane, mask: np.ndarray, first_number: int) -> list[Dataset]:
    items = []
    for n, polygon in enumerate(plane_contours(mask)):
        item = Dataset()
        item.ContourNumber = first_number + n
        item.ContourImageSequence = [plane.reference()]
        item.ContourGeometricType = "CLOSED_PLANAR"
        item.NumberOfContourPoints = len(polygon)
        item[CONTOUR_DATA] = contour_data(plane.to_patient(polygon))
        items.append(item)
    return items


def _algorithm(bundle: Bundle) -> Dataset:
    item = Dataset()
    family = codes.cid7162.ArtificialIntelligence
    item.AlgorithmFamilyCodeSequence = [_code_item(Code(family.value, family.scheme_designator, family.meaning))]
    item.AlgorithmName = bundle.name[:64]
    item.AlgorithmVersion = bundle.version[:64]
    item.AlgorithmSource = "ctseg"
    return item


def _roi_items(label: Label, bundle: Bundle, frame_of_reference_uid: str) -> tuple[Dataset, Dataset]:
    """The Structure Set ROI and RT ROI Observations items of one label."""
    roi = Dataset()
    roi.ROINumber = label.value
    roi.ReferencedFrameOfReferenceUID = frame_of_reference_uid
    roi.ROIName = label.name[:64]
    meaning = label.type.meaning if label.type is not None else label.name  # Label requires a type code
    roi.ROIDescription = (f"{meaning}, {label.modifier.meaning}" if label.modifier is not None else meaning)[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"ctseg {bundle.name} {bundle.version}"[:64]
    roi.ROIDerivationAlgorithmIdentificationSequence = [_algorithm(bundle)]
    obs = Dataset()
    obs.ObservationNumber = label.value
    obs.ReferencedROINumber = label.value
    obs.SegmentedPropertyCategoryCodeSequence = [_code_item(label.category)]
    identification = _code_item(label.type)  # type: ignore[arg-type]  # Label requires a type code
    if label.modifier is not None:
        identification.SegmentedPropertyTypeModifierCodeSequence = [_code_item(label.modifier)]
    obs.RTROIIdentificationCodeSequence = [identification]
    # Anatomy is an ORGAN; anything else (a tumour) gets no interpreted type: a planning role (GTV, ...) is a
    # clinician's decision, not the model's (Type 2: present, empty).
    obs.RTROIInterpretedType = "ORGAN" if label.category == ANATOMICAL_STRUCTURE else ""
    obs.ROIInterpreter = ""
    return roi, obs


def _referenced_frame_of_reference(series: DicomSeries, planes: list[SourcePlane]) -> Dataset:
    """The frame of reference, the study, the CT series and every source image (Contour Image Sequence)."""
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = [plane.reference() for plane in planes]
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_REFERENCE_CLASS
    study.ReferencedSOPInstanceUID = series.study_uid
    study.RTReferencedSeriesSequence = [referenced_series]
    item = Dataset()
    item.FrameOfReferenceUID = series.frame_of_reference_uid
    item.RTReferencedStudySequence = [study]
    return item


def _roi_contour(label: Label, planes: list[SourcePlane], on_slices: np.ndarray, counts: np.ndarray) -> Dataset:
    """One label's ROI Contour item: its colour and its contours on every source plane that holds it (``counts``:
    its voxels per plane); an absent label has no Contour Sequence (see the module docstring)."""
    item = Dataset()
    item.ReferencedROINumber = label.value
    item.ROIDisplayColor = list(label.color)
    sequence: list[Dataset] = []
    for k in np.flatnonzero(counts):
        sequence += _contours(planes[k], on_slices[k] == label.value, len(sequence) + 1)
    if sequence:
        item.ContourSequence = sequence
    return item


def build_rtstruct(series: DicomSeries, labels: np.ndarray, bundle: Bundle, result_id: str | None = None,
                   seg_sop_instance_uid: str | None = None) -> bytes:
    """``labels`` [D, H, W] on the series grid (slice order of ``series``) -> RT Structure Set bytes.
    ``result_id`` (the job's id) seeds the UIDs; without one they are random. ``seg_sop_instance_uid``: the
    DICOM-SEG written from the same labels, named in Derivation Description (ROI number = segment number)."""
    if labels.shape != series.volume.shape:
        raise RTStructError(f"label map {labels.shape} is not on the series grid {series.volume.shape}")
    on_slices = series.to_slices(labels)  # a gantry-tilted series: one plane per source slice, on that slice
    planes = source_planes(series)
    first = series.datasets[0]
    if len(planes) != on_slices.shape[0] or on_slices.shape[1:] != (int(first.Rows), int(first.Columns)):
        raise RTStructError(f"{len(planes)} source planes of {first.Rows}x{first.Columns} pixels do not match "
                            f"the label map on the slices {on_slices.shape}")
    by_value = {label.value: label for label in bundle.labels}
    counts = plane_counts(on_slices, minlength=max(by_value, default=0) + 1)
    found = np.flatnonzero(counts.sum(axis=0))
    unknown = sorted(int(v) for v in found if v != 0 and int(v) not in by_value)
    if unknown:
        raise RTStructError(f"label values {unknown} are not labels of bundle {bundle.name} {bundle.version}")

    identity = result_identity(result_id or uuid.uuid4().hex, series, bundle, RT_STRUCTURE_SET_STORAGE, "RTSTRUCT")
    now = dt.datetime.now()
    ds = hd.SOPClass(
        study_instance_uid=series.study_uid, series_instance_uid=identity.series_uid,
        series_number=identity.series_number, sop_instance_uid=identity.sop_instance_uid,
        sop_class_uid=RT_STRUCTURE_SET_STORAGE, instance_number=1, modality="RTSTRUCT", manufacturer="ctseg",
        transfer_syntax_uid=ExplicitVRLittleEndian, series_description=identity.description,
        manufacturer_model_name=bundle.name[:64], software_versions=ctseg.__version__, device_serial_number="0",
        series_date=now.date(), series_time=now.time(), specific_character_set=first.get("SpecificCharacterSet"),
    )
    ds.copy_patient_and_study_information(first)  # Patient, General Study, Patient Study, Clinical Trial: as the SEG
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")

    ds.StructureSetLabel = "CTSEG"
    ds.StructureSetName = identity.description
    present = sum(1 for v in by_value if counts[:, v].any())
    ds.StructureSetDescription = (f"Automatic segmentation by {bundle.name} {bundle.version} (ctseg "
                                  f"{ctseg.__version__}): {present} of {len(by_value)} structures found; not reviewed")
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame_of_reference(series, planes)]
    rois, observations = zip(*(_roi_items(by_value[v], bundle, series.frame_of_reference_uid) for v in sorted(by_value)))
    contours = [_roi_contour(by_value[v], planes, on_slices, counts[:, v]) for v in sorted(by_value)]
    ds.StructureSetROISequence = list(rois)
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = list(observations)
    ds.ApprovalStatus = "UNAPPROVED"  # an automatic result: a planner reviews and approves it in the TPS
    if seg_sop_instance_uid:
        ds.DerivationDescription = (f"Contours of the label map also written as DICOM-SEG {seg_sop_instance_uid} "
                                    "(ROI Number = Segment Number), half-way between inside and outside pixel centres")
    log.info("RTSTRUCT: %d ROIs, %d contours", len(rois), sum(len(c.get("ContourSequence", [])) for c in contours))
    _keep_raw_contour_data(contours)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _keep_raw_contour_data(contours: list[Dataset]) -> None:
    """Mark each contour item as encoded as it will be written (explicit VR little endian, the data set's
    character set), so pydicom writes its raw Contour Data as it is instead of decoding it into DSfloat values
    first. Only speed depends on this: were the mark not to match, pydicom would decode and re-encode."""
    for roi in contours:
        for item in roi.get("ContourSequence", []):
            charset = getattr(item, "_character_set", None)  # what the item inherits; pydicom keeps it private
            if charset is not None:
                item.set_original_encoding(False, True, charset)
