"""Typed options that several packages read: how the SEG is written. Checked once, here."""

from __future__ import annotations

from dataclasses import dataclass

from server.core.vocabulary import SegCompression, SegType

# BINARY frames are bit-packed: the standard (and highdicom) allow only JPEG 2000 among the compressions.
BINARY_COMPRESSIONS = (SegCompression.NONE, SegCompression.JPEG2000)


@dataclass(frozen=True)
class SegOptions:
    """How the SEG is written (settings ``seg_type``, ``seg_keep_empty_frames``, ``seg_compression``)."""

    seg_type: SegType = SegType.BINARY
    keep_empty_frames: bool = False
    compression: SegCompression = SegCompression.NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "seg_type", SegType(self.seg_type))
        object.__setattr__(self, "compression", SegCompression(self.compression))
        if self.seg_type is SegType.BINARY and self.compression not in BINARY_COMPRESSIONS:
            raise ValueError(
                f"seg_compression={self.compression.value!r} does not fit seg_type='BINARY': a BINARY SEG is stored "
                "uncompressed or as JPEG 2000 (use seg_type=LABELMAP for rle or jpegls)")


PHASE_WORDS = ("first", "last")


@dataclass(frozen=True)
class PhaseChoice:
    """Which acquisition (phase) of a multi-phase series is segmented (request parameter ``phase``, route option
    ``phase``): ``first`` or ``last`` in time order, or its number (1 = first), as the 422 listing them numbers them."""

    value: str

    def __post_init__(self) -> None:
        text = str(self.value).strip().lower()
        if text not in PHASE_WORDS:
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"phase must be first, last or a phase number (1, 2, ...); got {self.value!r}")
            text = str(int(text))
        object.__setattr__(self, "value", text)

    def index(self, count: int) -> int | None:
        """The chosen phase's index among ``count`` phases; None when there is no such phase."""
        if self.value == "first":
            return 0
        if self.value == "last":
            return count - 1
        number = int(self.value)
        return number - 1 if number <= count else None

    def __str__(self) -> str:
        return self.value
