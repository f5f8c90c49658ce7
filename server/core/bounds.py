"""What a DICOM header may declare before anything is decoded (settings ``CTSEG_DICOM_MAX_*``).

A few kilobytes of header can declare gigabytes of pixels (RLE, JPEG 2000 and deflate compress almost anything to
almost nothing), and a worker that believes them is killed for memory. Staging compares every declared size with
these bounds and refuses the input naming the value and the setting (docs/operations.md "Input bounds").
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MB = 1 << 20

# bound -> the setting that sets it; refusals name the setting (one place for the names)
SETTING = {
    "max_rows_columns": "CTSEG_DICOM_MAX_ROWS_COLUMNS",
    "max_frames": "CTSEG_DICOM_MAX_FRAMES",
    "max_frame_bytes": "CTSEG_DICOM_MAX_FRAME_MB",
    "max_volume_voxels": "CTSEG_DICOM_MAX_VOLUME_MVOXELS",
    "max_header_bytes": "CTSEG_DICOM_MAX_HEADER_MB",
}


@dataclass(frozen=True)
class DicomBounds:
    """Declared sizes accepted per image, per instance and per series; the defaults fit any clinical CT."""

    max_rows_columns: int = 4096  # Rows, Columns of one frame
    max_frames: int = 8192  # NumberOfFrames of one instance
    max_frame_bytes: int = 64 * MB  # one decoded frame: Rows x Columns x SamplesPerPixel x bytes per sample
    max_volume_voxels: int = 1024 * 10**6  # the chosen series: sum of Rows x Columns x frames
    # A deflated data set: its header inflated in memory at most this far; the whole may inflate to its declared
    # pixel data plus this (the rest is streamed and counted, never held).
    max_header_bytes: int = 64 * MB

    def __post_init__(self) -> None:
        for f in fields(self):
            if int(getattr(self, f.name)) < 1:
                raise ValueError(f"{SETTING[f.name]} must be at least 1")
