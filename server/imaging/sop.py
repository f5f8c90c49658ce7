"""The DICOM classes and encodings ctseg reads and writes: one list each, used by the reader, the listener, C-GET
and the senders, so what is negotiated is exactly what can be read."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    LabelMapSegmentationStorage,
    LegacyConvertedEnhancedCTImageStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from server.core.vocabulary import SegCompression, SegType

# CT images: single-frame, Enhanced (multi-frame, functional groups) and Legacy Converted Enhanced (the same
# functional groups, made from single frames by a PACS).
CT_IMAGE_STORAGE: tuple[UID, ...] = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
MULTIFRAME_CT_STORAGE = frozenset(CT_IMAGE_STORAGE[1:])

# What the reader decodes (pydicom + pylibjpeg's openjpeg, libjpeg and rle plugins), accepted as sent so a PACS
# need not transcode.
READABLE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1, JPEGLossless,
    JPEGBaseline8Bit, JPEGExtended12Bit, RLELossless,
)
UNCOMPRESSED: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

SEG_STORAGE: dict[SegType, UID] = {SegType.BINARY: SegmentationStorage, SegType.LABELMAP: LabelMapSegmentationStorage}
SEG_TRANSFER_SYNTAX: dict[SegCompression, UID] = {
    SegCompression.NONE: ExplicitVRLittleEndian, SegCompression.RLE: RLELossless,
    SegCompression.JPEG2000: JPEG2000Lossless, SegCompression.JPEGLS: JPEGLSLossless,
}

# The other result objects. The RTSTRUCT writer sets its class from here; highdicom sets the SR's and the key
# image's itself, and these name what it writes for whoever must check or offer them (a sender's contexts).
RT_STRUCTURE_SET_STORAGE: UID = RTStructureSetStorage
COMPREHENSIVE_3D_SR_STORAGE: UID = Comprehensive3DSRStorage
SECONDARY_CAPTURE_STORAGE: UID = SecondaryCaptureImageStorage
