"""Write real DICOM CT series (pydicom) from phantom images, the way scanners and anonymisers write them."""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _base(study_uid: str, series_uid: str, for_uid: str, series_number: int, description: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM-001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = dt.date.today().strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ctseg-tests"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "ABDOMEN"
    return ds


def series_from_image(
    image: sitk.Image,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    description: str = "Phantom CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> list[Dataset]:
    """One single-frame CT instance per slice (index z), positions and orientation from the image geometry."""
    arr = sitk.GetArrayFromImage(image).astype(np.float64)  # [z, y, x] HU
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    origin = np.asarray(image.GetOrigin())
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    out = []
    for k in range(arr.shape[0]):
        ds = _base(study_uid, series_uid, for_uid, series_number, description)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * spacing[2] * direction[:, 2]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in list(direction[:, 0]) + list(direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.4f}", f"{spacing[0]:.4f}"]
        ds.SliceThickness = f"{spacing[2]:.4f}"
        ds.KVP = "120"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU"
        stored = np.round((arr[k] - intercept) / slope)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.clip(stored, 0, 65535).astype(np.uint16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def compress_jpeg2000(ds: Dataset) -> Dataset:
    ds.compress(JPEG2000Lossless)
    return ds


def anonymise_without_uids(datasets: list[Dataset]) -> list[Dataset]:
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
            setattr(ds, keyword, "")
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
        ds.PatientName = ""
        ds.PatientID = ""
    return datasets


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_files(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"IM{i:04d}.dcm"
        p.write_bytes(to_bytes(ds))
        paths.append(p)
    return paths


def zip_of(datasets: list[Dataset]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, ds in enumerate(datasets):
            z.writestr(f"study/series_{ds.SeriesNumber}/IM{i:04d}.dcm", to_bytes(ds))
    return buf.getvalue()


def enhanced_from_image(image: sitk.Image) -> Dataset:
    """One Enhanced CT instance (multi-frame, functional groups) holding the whole volume."""
    singles = series_from_image(image)
    first = singles[0]
    ds = _base(first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID, 3, "Enhanced phantom")
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.NumberOfFrames = len(singles)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    shared = Dataset()
    meas = Dataset()
    meas.PixelSpacing = first.PixelSpacing
    meas.SliceThickness = first.SliceThickness
    shared.PixelMeasuresSequence = [meas]
    ori = Dataset()
    ori.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PlaneOrientationSequence = [ori]
    trans = Dataset()
    trans.RescaleSlope, trans.RescaleIntercept, trans.RescaleType = first.RescaleSlope, first.RescaleIntercept, "HU"
    shared.PixelValueTransformationSequence = [trans]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    order = list(range(len(singles)))[::-1]  # frames stored in reverse slice order, as some scanners do
    frames = []
    for k in order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = singles[k].ImagePositionPatient
        item.PlanePositionSequence = [pos]
        fc = Dataset()
        fc.StackID = "1"
        fc.InStackPositionNumber = k + 1
        item.FrameContentSequence = [fc]
        per.append(item)
        frames.append(singles[k].PixelData)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = b"".join(frames)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
