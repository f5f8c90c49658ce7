"""The preview as a key image for PACS viewers that cannot draw a SEG: a DICOM Secondary Capture, RGB.

The preview (server/imaging/preview.py: three planes, coloured overlay, legend of the label names) over a caption
band that says what it is: derived and not for diagnosis. Same study and patient as the source CT (copied from
it), a series of its own; BurnedInAnnotation YES, since names and caption are in the pixels. Identifiers derive
from the result's SEG identity (server/imaging/seg.py ``seg_identity``), like the SR's.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import ctseg
from models.bundle import Bundle
from server.imaging.dicom_reader import DicomSeries
from server.imaging.seg import SegIdentity

SC_SERIES_OFFSET = 2000  # the key image's series number: the SEG's (9000 + source's) plus this
CAPTION_FONT = 14
CAPTION = "DERIVED IMAGE - NOT FOR DIAGNOSIS"


def caption_lines(bundle: Bundle) -> list[str]:
    return [CAPTION, f"automatic segmentation preview, ctseg {bundle.name} {bundle.version}"]


def with_caption(preview: np.ndarray, lines: list[str]) -> np.ndarray:
    """The preview's pixels unchanged, a caption band below them."""
    font = ImageFont.load_default(size=CAPTION_FONT)
    row = CAPTION_FONT + 6
    band = Image.new("RGB", (preview.shape[1], row * len(lines) + 8), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((8, 4 + i * row), line, fill=(255, 255, 0) if i == 0 else (235, 235, 235), font=font)
    return np.concatenate([preview, np.asarray(band, dtype=np.uint8)], axis=0)


def build_key_image(series: DicomSeries, preview_png: bytes, bundle: Bundle, seg: SegIdentity) -> bytes:
    """``preview_png``: the result's preview.png -> Secondary Capture bytes."""
    preview = np.asarray(Image.open(io.BytesIO(preview_png)).convert("RGB"), dtype=np.uint8)
    pixels = np.ascontiguousarray(with_caption(preview, caption_lines(bundle)))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=series.datasets[0], pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"),
        series_instance_uid=generate_uid(entropy_srcs=[seg.sop_instance_uid, "sc", "series"]),
        series_number=seg.series_number + SC_SERIES_OFFSET,
        sop_instance_uid=generate_uid(entropy_srcs=[seg.sop_instance_uid, "sc", "instance"]), instance_number=1,
        manufacturer="ctseg", transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # Three planes side by side have no one orientation: Patient Orientation (type 2C) is left empty.
    sc.PatientOrientation = None
    sc.Laterality = None  # type 2C (a paired body part): the planes show both sides
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.SeriesDescription = f"ctseg {bundle.name} key image (not for diagnosis)"[:64]
    sc.DerivationDescription = ("Preview of an automatic segmentation: axial, coronal and sagittal planes with a "
                                "coloured overlay and the structure names burned in; not for diagnosis")
    sc.ImageComments = "Derived, non-diagnostic image"
    sc.ManufacturerModelName = bundle.name[:64]
    sc.SoftwareVersions = ctseg.__version__
    buf = io.BytesIO()
    sc.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
