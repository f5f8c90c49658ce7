"""Images in and out: DICOM series and NIfTI read into a Volume, the DICOM-SEG and RTSTRUCT, the preview, label
statistics, and the DICOM classes and encodings all of them accept (``sop``). No networking, no jobs."""

from server.imaging.dicom_reader import DicomSeries, inspect_series, load_series
from server.imaging.nifti import read_nifti
from server.imaging.preview import render_preview
from server.imaging.rtstruct import build_rtstruct
from server.imaging.seg import build_seg

__all__ = ["DicomSeries", "build_rtstruct", "build_seg", "inspect_series", "load_series", "read_nifti", "render_preview"]
