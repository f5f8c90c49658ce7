"""DICOM-SEG output with highdicom: same Study and Frame of Reference as the source, a new Series.

BINARY by default (the most viewers read it); LABELMAP (Supplement 243) as an option. Segment descriptions
carry name, SNOMED CT category/type (and laterality modifier), recommended display colour and the algorithm
(bundle name and version).

Identifiers: the SEG's Series and SOP Instance UIDs and each segment's Tracking UID are derived (pydicom's
``generate_uid`` with entropy sources, a SHA-512 hash under ctseg's UID root) from the *result*: the job's id,
the source series, the bundle, the SOP class and the SEG options. So two results never share a UID (a BINARY and
a LABELMAP SEG of one series differ, as do two jobs on the same series), while one result keeps its UIDs across
delivery retries, which makes a resend replace the instance in a PACS rather than add one.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import ctseg
from models.bundle import Bundle
from models.labels import Label
from server.core.options import SegOptions
from server.core.vocabulary import SegCompression, SegType
from server.imaging.binary_seg import TemplateError, write_binary_seg
from server.imaging.dicom_reader import DicomSeries
from server.imaging.label_stats import plane_counts
from server.imaging.sop import SEG_STORAGE, SEG_TRANSFER_SYNTAX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegIdentity:
    """The UIDs, number and description of one SEG result (see the module docstring for the derivation)."""

    series_uid: str
    sop_instance_uid: str
    series_number: int
    description: str

    def tracking_uid(self, label: Label) -> str:
        return generate_uid(entropy_srcs=[self.sop_instance_uid, "tracking", str(label.value), label.name])


def _code(code) -> hd.sr.CodedConcept:  # type: ignore[no-untyped-def]
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _rgb_to_lab(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    """sRGB (0..255) -> CIELab (D65), the colour space DICOM's RecommendedDisplayCIELabValue uses."""
    c = np.asarray(rgb, dtype=float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return hd.color.CIELabColor(float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)),
                                float(np.clip(lab[2], -128, 127)))


def segment_description(number: int, label: Label, algorithm: hd.AlgorithmIdentificationSequence,
                        identity: SegIdentity) -> hd.seg.SegmentDescription:
    regions = None
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name.replace("_", " ")[:64],
        segmented_property_category=_code(label.category),
        segmented_property_type=_code(label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=identity.tracking_uid(label),
        tracking_id=label.name[:64],
        anatomic_regions=regions,
        display_color=_rgb_to_lab(label.color),
    )
    if label.modifier is not None:
        from pydicom.dataset import Dataset

        mod = Dataset()
        mod.CodeValue, mod.CodingSchemeDesignator, mod.CodeMeaning = label.modifier.value, label.modifier.scheme, label.modifier.meaning
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [mod]
    return desc


def seg_identity(series: DicomSeries, bundle: Bundle, options: SegOptions, result_id: str) -> SegIdentity:
    base = [result_id, series.series_uid, bundle.name, bundle.version, SEG_STORAGE[options.seg_type],
            options.compression.value, str(options.keep_empty_frames)]
    source_number = getattr(series.datasets[0], "SeriesNumber", None)
    number = (int(source_number) if source_number not in (None, "") else 0) % 1000 + 9000
    return SegIdentity(generate_uid(entropy_srcs=[*base, "series"]), generate_uid(entropy_srcs=[*base, "instance"]),
                       number, f"ctseg {bundle.name} {bundle.version}"[:64])


def build_seg(series: DicomSeries, labels: np.ndarray, bundle: Bundle, seg_type: SegType | str = SegType.BINARY,
              keep_empty_frames: bool = False, compression: SegCompression | str = SegCompression.NONE,
              fast_binary: bool = True, result_id: str | None = None) -> bytes:
    """``labels`` [D, H, W] on the series grid (slice order of ``series``) -> DICOM-SEG bytes. ``result_id``
    (the job's id) seeds the SEG's UIDs; without one they are random."""
    if labels.shape != series.volume.shape:
        raise ValueError(f"label map {labels.shape} is not on the series grid {series.volume.shape}")
    labels = series.to_slices(labels)  # a gantry-tilted series: one frame per source slice, on that slice
    options = SegOptions(seg_type, keep_empty_frames, compression)
    identity = seg_identity(series, bundle, options, result_id or uuid.uuid4().hex)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=bundle.name[:64], family=codes.cid7162.ArtificialIntelligence, version=bundle.version[:64],
    )
    counts = plane_counts(labels)
    present = np.flatnonzero(counts[:, 1:].sum(axis=0)) + 1
    by_value = {label.value: label for label in bundle.labels}
    # Every label of the model is described, found or not, so a viewer shows the same legend for every study.
    descriptions = [segment_description(v, by_value[v], algorithm, identity) for v in sorted(by_value)]
    pixel_dtype = np.uint16 if len(by_value) > 255 else np.uint8

    def segmentation(sources: list, pixel: np.ndarray) -> hd.seg.Segmentation:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixel.astype(pixel_dtype, copy=False),
            segmentation_type=hd.seg.SegmentationTypeValues[options.seg_type.value],
            segment_descriptions=descriptions,
            series_instance_uid=identity.series_uid,
            series_number=identity.series_number,
            sop_instance_uid=identity.sop_instance_uid,
            instance_number=1,
            manufacturer="ctseg",
            manufacturer_model_name=bundle.name[:64],
            software_versions=ctseg.__version__,
            device_serial_number="0",
            omit_empty_frames=not keep_empty_frames,
            transfer_syntax_uid=SEG_TRANSFER_SYNTAX[options.compression],
            content_label="CTSEG",
            content_description=f"Automatic segmentation, {len(present)} structures found"[:64],
            content_creator_name="ctseg^automatic",
        )
        seg.SeriesDescription = identity.description
        return seg

    if series.multiframe:
        pixel = np.empty_like(labels)
        pixel[np.asarray(series.frame_order)] = labels  # back to the source's frame order
        seg = segmentation(series.datasets, pixel)
    else:
        if options.seg_type is SegType.BINARY and options.compression is SegCompression.NONE and fast_binary:
            # The default output: frames stamped out as bytes (server/binary_seg.py), same dataset as highdicom's.
            try:
                return write_binary_seg(series.datasets, labels.astype(pixel_dtype, copy=False), sorted(by_value),
                                        keep_empty_frames, segmentation, counts)
            except TemplateError as err:  # highdicom changed under the fast writer: its own (slower) writer
                log.warning("fast BINARY SEG writer does not fit highdicom %s (%s); writing with highdicom",
                            hd.__version__, err)
        seg = segmentation(series.datasets, labels)
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
