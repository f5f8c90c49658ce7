"""A BINARY DICOM-SEG from a single-frame series, with the frames stamped out as bytes.

Why: highdicom builds one pydicom Dataset per frame and pydicom writes each element by element (about 2 ms a
frame), so a 20-label abdominal SEG (about 1,200 frames) takes about 3 s. The frames of a BINARY SEG over a
single-frame series differ in four places only: the source instance (per plane), the plane position (per plane),
the segment number (per segment) and the dimension index values (per frame). So highdicom builds the header and
one template frame on a one-slice proxy of the series; each per-plane and per-segment piece is then encoded once
(the template's constant parts by pydicom, the UIDs and positions as explicit-VR bytes), and every frame is the
concatenation of its pieces: about 0.8 s for the same SEG. Frame order, dimension indices, omitted empty
frames and the header follow highdicom's rules; tests/test_binary_seg.py compares the result with highdicom's own
output element by element.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import format_number_as_ds

from server.imaging.label_stats import plane_counts

DERIVATION_IMAGE = Tag(0x0008, 0x9124)
FRAME_CONTENT = Tag(0x0020, 0x9111)
PLANE_POSITION = Tag(0x0020, 0x9113)
SEGMENT_IDENTIFICATION = Tag(0x0062, 0x000A)
SOURCE_IMAGE = Tag(0x0008, 0x2112)
CLASS_UID = Tag(0x0008, 0x1150)
INSTANCE_UID = Tag(0x0008, 0x1155)
POSITION = Tag(0x0020, 0x0032)
PER_FRAME_GROUPS = Tag(0x5200, 0x9230)
PIXEL_DATA = Tag(0x7FE0, 0x0010)
FRAME_ITEM_TAGS = [DERIVATION_IMAGE, FRAME_CONTENT, PLANE_POSITION, SEGMENT_IDENTIFICATION]  # ascending, as written
_SENTINEL = (0xC75E6A01, 0xC75E6A02)

# Builds a highdicom Segmentation of ``pixel`` over ``sources`` with every other option fixed by the caller.
ProxyBuilder = Callable[[list[Dataset], np.ndarray], hd.seg.Segmentation]


class TemplateError(RuntimeError):
    """highdicom's template frame no longer has the shape this writer stamps out (a highdicom upgrade)."""


def _encode(elem: DataElement) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


def _item(content: bytes) -> bytes:
    """A sequence item of defined length (what pydicom writes for items)."""
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _sq(tag: BaseTag, *items: bytes) -> bytes:
    """A sequence of defined length (what pydicom writes for sequences it did not read)."""
    body = b"".join(_item(i) for i in items)
    return struct.pack("<HH2sHI", tag.group, tag.element, b"SQ", 0, len(body)) + body


def _text(tag: BaseTag, vr: str, value: str) -> bytes:
    """A short-VR text element (UI padded with NUL, others with a space), explicit VR little endian."""
    data = value.encode("ascii")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return struct.pack("<HH2sH", tag.group, tag.element, vr.encode(), len(data)) + data


def _plane_order(datasets: list[Dataset]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Positions (N, 3), the order highdicom sorts planes in (by distance along its normal), the orientation."""
    orientation = [float(v) for v in datasets[0].ImageOrientationPatient]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    normal = hd.spatial.get_normal_vector(orientation, index_convention=hd.spatial.VOLUME_INDEX_CONVENTION)
    _, order = np.unique(positions @ normal, return_index=True)
    if len(order) != len(datasets):
        raise ValueError("two source images share a plane position; a SEG needs one frame per position")
    return positions, order, orientation


def _presence(counts: np.ndarray, values: list[int]) -> np.ndarray:
    """present[plane, k]: segment ``values[k]`` has a voxel in that plane."""
    present = np.zeros((counts.shape[0], len(values)), dtype=bool)
    for k, v in enumerate(values):
        if v < counts.shape[1]:
            present[:, k] = counts[:, v] > 0
    return present


class FrameStamper:
    """Per-frame functional group items assembled from pieces encoded once per plane and once per segment."""

    def __init__(self, template: Dataset, datasets: list[Dataset], segment_numbers: list[int]) -> None:
        found = sorted(template.keys())
        # With one segment highdicom moves the segment identification to the shared functional groups.
        self.segment_in_frame = SEGMENT_IDENTIFICATION in found
        expected = FRAME_ITEM_TAGS if self.segment_in_frame else FRAME_ITEM_TAGS[:3]
        if found != expected:
            raise TemplateError(f"highdicom's per-frame item holds {found}; this writer stamps out {expected}")
        # Derivation Image > Source Image > [class UID, instance UID, constant rest]: the two UIDs come first by tag
        # order, so each plane's piece is its two UIDs between constant bytes encoded once.
        derivation_item = template[DERIVATION_IMAGE].value[0]
        source_item = derivation_item.SourceImageSequence[0]
        source_rest = [tag for tag in sorted(source_item.keys()) if tag not in (CLASS_UID, INSTANCE_UID)]
        if sorted(source_item.keys())[:2] != [CLASS_UID, INSTANCE_UID] or any(tag < INSTANCE_UID for tag in source_rest):
            raise TemplateError(f"unexpected Source Image item {sorted(source_item.keys())}")
        source_tail = b"".join(_encode(source_item[tag]) for tag in source_rest)
        derivation_rest = [tag for tag in sorted(derivation_item.keys()) if tag != SOURCE_IMAGE]
        if any(tag < SOURCE_IMAGE for tag in derivation_rest):
            raise TemplateError(f"unexpected Derivation Image item {sorted(derivation_item.keys())}")
        derivation_tail = b"".join(_encode(derivation_item[tag]) for tag in derivation_rest)
        position_item = template[PLANE_POSITION].value[0]
        if list(position_item.keys()) != [POSITION]:
            raise TemplateError(f"unexpected Plane Position item {list(position_item.keys())}")
        self.planes: list[tuple[bytes, bytes]] = []
        for ds in datasets:
            source = _text(CLASS_UID, "UI", ds.SOPClassUID) + _text(INSTANCE_UID, "UI", ds.SOPInstanceUID) + source_tail
            derivation = _sq(DERIVATION_IMAGE, _sq(SOURCE_IMAGE, source) + derivation_tail)
            ipp = "\\".join(str(v) for v in ds.ImagePositionPatient)  # DS text as pydicom writes it
            self.planes.append((derivation, _sq(PLANE_POSITION, _text(POSITION, "DS", ipp))))
        self.segments: dict[int, bytes] = {number: b"" for number in segment_numbers}
        if self.segment_in_frame:
            segment = template[SEGMENT_IDENTIFICATION]
            for number in segment_numbers:
                segment.value[0].ReferencedSegmentNumber = number
                self.segments[number] = _encode(segment)
        content = template[FRAME_CONTENT]
        if len(content.value[0].DimensionIndexValues) != 2:
            raise TemplateError("expected two dimension index values (segment, plane position); highdicom wrote "
                                f"{content.value[0].DimensionIndexValues}")
        content.value[0].DimensionIndexValues = list(_SENTINEL)
        encoded = _encode(content)
        at = encoded.find(struct.pack("<2I", *_SENTINEL))
        self.content_head, self.content_tail = encoded[:at], encoded[at + 8:]

    def item(self, segment: int, segment_index: int, plane: int, position_index: int) -> bytes:
        """Indices are 1-based positions in the segment list and among the included planes (highdicom's rule)."""
        derivation, position = self.planes[plane]
        content = self.content_head + struct.pack("<2I", segment_index, position_index) + self.content_tail
        return derivation + content + position + self.segments[segment]


def _pack_frames(labels: np.ndarray, frames: list[tuple[int, int]]) -> bytes:
    """Frames (segment, plane) as 1-bit pixels, first pixel in the lowest bit, frames back to back."""
    if not frames:
        return b""
    per_frame = labels.shape[1] * labels.shape[2]
    if per_frame % 8 == 0:
        data = b"".join(np.packbits(labels[p].ravel() == s, bitorder="little").tobytes() for s, p in frames)
    else:  # frames do not end on a byte boundary: pack them as one bit stream
        bits = np.concatenate([(labels[p] == s).ravel() for s, p in frames])
        data = np.packbits(bits, bitorder="little").tobytes()
    return data + b"\x00" * (len(data) % 2)


def _references(template: Dataset, datasets: list[Dataset]) -> list[Dataset]:
    """The proxy's reference item once per source image (new UID elements, the rest shared, never mutated)."""
    shared = [elem for elem in template if elem.tag not in (CLASS_UID, INSTANCE_UID)]
    items = []
    for ds in datasets:
        item = Dataset()
        item.add_new(CLASS_UID, "UI", ds.SOPClassUID)
        item.add_new(INSTANCE_UID, "UI", ds.SOPInstanceUID)
        for elem in shared:
            item.add(elem)
        items.append(item)
    return items


def write_binary_seg(datasets: list[Dataset], labels: np.ndarray, segment_numbers: list[int],
                     keep_empty_frames: bool, build_proxy: ProxyBuilder, counts: np.ndarray | None = None) -> bytes:
    """``labels`` [N, rows, cols] in the order of ``datasets`` (single-frame sources) -> the SEG file's bytes.

    ``build_proxy(sources, pixel)`` is the caller's highdicom call (uncompressed BINARY), used on one slice;
    ``counts`` is ``plane_counts(labels)`` if the caller has it already.
    """
    if labels.shape[0] != len(datasets):
        raise ValueError(f"{labels.shape[0]} label planes for {len(datasets)} source images")
    positions, order, orientation = _plane_order(datasets)
    present = _presence(plane_counts(labels) if counts is None else counts, segment_numbers)
    any_present = present.any(axis=1)
    omit = not keep_empty_frames and bool(any_present.any())  # highdicom keeps every frame of an all-empty result
    included = [int(p) for p in order if any_present[p] or not omit]
    frames: list[tuple[int, int, int, int]] = []  # (segment, segment index, plane, position index)
    for k, number in enumerate(segment_numbers):
        for index, plane in enumerate(included, start=1):
            if omit and not present[plane, k]:
                continue
            frames.append((number, k + 1, plane, index))

    first = frames[0][0] if frames else segment_numbers[0]
    proxy_pixel = np.zeros((1, *labels.shape[1:]), dtype=labels.dtype)
    proxy_pixel.flat[0] = first
    seg = build_proxy(datasets[:1], proxy_pixel)
    stamper = FrameStamper(seg.PerFrameFunctionalGroupsSequence[0], datasets, segment_numbers)

    # The header facts that depend on the whole series rather than the proxy's one slice.
    seg.NumberOfFrames = len(frames)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if "SpacingBetweenSlices" not in datasets[0]:  # else highdicom copied the source's own value
        spacing, _ = hd.spatial.get_volume_positions(positions, orientation)
        if spacing is not None:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)
        elif "SpacingBetweenSlices" in measures:
            del measures.SpacingBetweenSlices
    if "DimensionOrganizationType" in seg:
        del seg.DimensionOrganizationType
    if len(included) > 1 and len(segment_numbers) == 1:  # highdicom: "3D" only for one channel at many positions
        kept = sorted(included)  # regular spacing is checked in source order
        spacing, _ = hd.spatial.get_volume_positions(positions[kept], orientation, sort=False)
        if spacing is not None and spacing > 0:
            seg.DimensionOrganizationType = hd.DimensionOrganizationTypeValues.THREE_DIMENSIONAL.value
    seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence = _references(
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0], datasets)
    if "SourceImageSequence" in seg:
        seg.SourceImageSequence = _references(seg.SourceImageSequence[0], datasets)

    del seg[PER_FRAME_GROUPS], seg[PIXEL_DATA]
    for tag in seg.keys():
        if tag >= PER_FRAME_GROUPS:
            raise TemplateError(f"highdicom's header holds {tag} after the per-frame groups; this writer appends them")
    header = io.BytesIO()
    seg.save_as(header, enforce_file_format=True)
    # The two big elements are appended as bytes: handing pydicom a raw sequence would make it parse it back.
    out = [header.getvalue(), _sq(PER_FRAME_GROUPS, *(stamper.item(*frame) for frame in frames))]
    pixels = _pack_frames(labels, [(s, p) for s, _, p, _ in frames])
    out += [struct.pack("<HH2sHI", PIXEL_DATA.group, PIXEL_DATA.element, b"OB", 0, len(pixels)), pixels]
    return b"".join(out)
