"""A hostile-input corpus, generated here (nothing large is committed): every case gets a 4xx that names the problem
(or is accepted with a note where the input is usable), the server keeps answering, and no file of a refused or
failed job is left in the storage.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicom_factory import series_from_image, to_bytes
from phantoms import make_phantom
from server.app import create_app
from server.core.settings import Settings
from test_api import nifti_bytes, phantom

Files = list[tuple[str, bytes]]


def series(**kw) -> list[pydicom.Dataset]:
    image, _ = phantom(**kw)
    return series_from_image(image)


def files_of(datasets) -> Files:  # type: ignore[no-untyped-def]
    return [(f"IM{i:04d}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]


def zipped(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def nifti(array: np.ndarray, spacing=(2.0, 2.0, 2.0), direction=None) -> bytes:  # type: ignore[no-untyped-def]
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.SetSpacing(spacing)
        if direction is not None:
            image.SetDirection(direction)
    return nifti_bytes(image)


def truncated_header() -> Files:
    files = files_of(series())
    name, data = files[7]
    files[7] = (name, data[:600])  # cut inside the header, before Rows and the pixels
    return files


def short_pixel_data() -> Files:
    datasets = series()
    datasets[3].PixelData = datasets[3].PixelData[:100]
    return files_of(datasets)


def huge_header_values() -> Files:
    datasets = series()
    for ds in datasets:
        ds.Rows = ds.Columns = 65535  # 8 GB of pixels claimed
    return files_of(datasets)


def mixed_orientation() -> Files:
    datasets = series()
    datasets[4].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    return files_of(datasets)


def mismatched_rows() -> Files:
    datasets = series()
    small, _ = phantom(shape=(20, 18, 30))
    odd = series_from_image(small, series_uid=datasets[0].SeriesInstanceUID)[5]
    odd.ImagePositionPatient = datasets[5].ImagePositionPatient
    datasets[5] = odd
    return files_of(datasets)


def gantry_tilt() -> Files:
    datasets = series()
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * 2.5 * np.tan(np.radians(50)), z]  # beyond any gantry (15 degrees is run)
    return files_of(datasets)


def mixed_series() -> Files:
    a = series()
    b = series_from_image(phantom()[0], study_uid=a[0].StudyInstanceUID, series_number=3)
    return files_of(a + b)


def wrong_modality(datasets=None) -> Files:  # type: ignore[no-untyped-def]
    datasets = datasets or series()
    for ds in datasets:
        ds.Modality = "MR"
    return files_of(datasets)


def duplicate_positions() -> Files:
    datasets = series()
    extra = series_from_image(phantom()[0], series_uid=datasets[0].SeriesInstanceUID)[:3]
    return files_of(datasets + extra)


def hundred_mm_slices() -> Files:
    image, _ = make_phantom((40, 36, 4), (2.0, 2.0, 100.0), "axial", seed=3, noise=3.0)
    return files_of(series_from_image(image))


def zip_bomb() -> Files:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("bomb.dcm", "w", force_zip64=True) as member:
            zeros = bytes(1 << 24)
            for _ in range(24):  # 384 MiB of zeros, about 0.4 MB compressed
                member.write(zeros)
    return [("bomb.zip", buf.getvalue())]


def bad_crc_zip() -> Files:
    blob = bytearray(zipped(files_of(series()), method=zipfile.ZIP_STORED))
    blob[2000] ^= 0xFF  # inside the first member's data: its CRC-32 no longer matches
    return [("study.zip", bytes(blob))]


def sheared_nifti() -> Files:
    shear = (1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    arr = np.full((20, 24, 24), 40, np.int16)
    image = sitk.GetImageFromArray(arr)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sheared-{os.getpid()}.nii"
    sitk.WriteImage(image, str(path))
    data = bytearray(path.read_bytes())
    path.unlink()
    # sform with a shear (ITK refuses non-orthonormal directions): srow_x/y/z at bytes 280..327, sform_code at 254
    struct.pack_into("<h", data, 254, 1)
    for row, values in enumerate(((shear[0] * 2, shear[1] * 2, 0.0, 0.0), (0.0, 2.0, 0.0, 0.0), (0.0, 0.0, 2.0, 0.0))):
        struct.pack_into("<4f", data, 280 + 16 * row, *values)
    struct.pack_into("<h", data, 252, 0)  # no qform: the sform decides
    return [("sheared.nii", bytes(data))]


def four_d_nifti() -> Files:
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((10, 12, 12), np.int16))] * 3)
    return [("4d.nii.gz", nifti_bytes(image))]


def two_d_nifti() -> Files:
    return [("2d.nii.gz", nifti_bytes(sitk.GetImageFromArray(np.zeros((32, 32), np.int16))))]


def tiny_pixels_nifti() -> Files:
    image, _ = phantom()
    image.SetSpacing((0.001, 0.001, 2.5))
    return [("ct.nii.gz", nifti_bytes(image))]


def traversal_zip() -> Files:
    members = [(f"../../../../tmp/evil{i}.dcm" if i % 2 else f"/etc/abs{i}.dcm", data)
               for i, (_, data) in enumerate(files_of(series()))]
    return [("study.zip", zipped(members))]


def cd_export_zip() -> Files:
    members = [(f"DICOM/S0001/I{i:04d}", data) for i, (_, data) in enumerate(files_of(series()))]
    dicomdir = pydicom.Dataset()
    dicomdir.FileSetID = "EXPORT"
    members += [("DICOMDIR", _raw_part10(dicomdir, "1.2.840.10008.1.3.10")), ("README.TXT", b"Viewer on this CD"),
                ("AUTORUN.INF", b"[autorun]\r\nopen=viewer.exe")]
    return [("cd.zip", zipped(members))]


def _raw_part10(ds: pydicom.Dataset, sop_class: str) -> bytes:
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def without_part10_header() -> Files:
    out = []
    for i, ds in enumerate(series()):
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)  # no preamble, no 'DICM', no file meta: as older archives store them
        out.append((f"IM{i:04d}", fp.getvalue()))
    return out


def nan_nifti() -> Files:
    image, _ = phantom()
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    arr[0, :3, :3] = np.nan
    arr[1, :2, :2] = np.inf
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return [("ct.nii.gz", nifti_bytes(out))]


# name -> (files, expected status, words the message must hold)
REFUSED: dict[str, tuple[Callable[[], Files], int, str]] = {
    "truncated header": (truncated_header, 422, "file 8 of the upload is a damaged DICOM"),
    "pixel data shorter than the header says": (short_pixel_data, 422, "pixel data is shorter than its header says"),
    "non-DICOM with a .dcm name": (lambda: [("IM0001.dcm", b"just text, not DICOM")], 422, "no DICOM image found"),
    "wrong modality": (wrong_modality, 422, "no CT series in the upload (found modality MR)"),
    "mixed series without series_uid": (mixed_series, 422, "2 candidate series; choose one with series_uid"),
    "missing slice": (lambda: files_of((s := series())[:10] + s[11:]), 422, "1 slice(s) missing"),
    "duplicate positions": (duplicate_positions, 422, "occur more than once"),
    "mixed orientation": (mixed_orientation, 422, "different ImageOrientationPatient"),
    "gantry tilt beyond any gantry": (gantry_tilt, 422, "gantry tilt of 50.0 degrees"),
    "one slice": (lambda: files_of(series()[:1]), 422, "a single slice is not a volume"),
    "mismatched Rows/Columns": (mismatched_rows, 422, "slices have different sizes"),
    "huge header values": (huge_header_values, 422, "pixel data is shorter than its header says"),
    "100 mm slices": (hundred_mm_slices, 422, "implausible slice spacing of 100 mm"),
    "broken NIfTI": (lambda: [("ct.nii.gz", b"\x1f\x8b\x08\x00broken")], 422, "not a readable NIfTI file"),
    "sheared NIfTI affine": (sheared_nifti, 422, "not a readable NIfTI file ("),
    "4D NIfTI": (four_d_nifti, 422, "expected a 3D volume"),
    "2D NIfTI": (two_d_nifti, 422, "expected a 3D volume"),
    "0.001 mm pixels": (tiny_pixels_nifti, 422, "implausible pixel spacing (rows) of 0.001 mm"),
    "empty zip": (lambda: [("empty.zip", zipped([]))], 422, "holds no files"),
    "zip bomb": (zip_bomb, 422, "a zip bomb?"),
    "zip with a damaged member": (bad_crc_zip, 422, "member 1 of the zip is damaged (bad CRC)"),
    "not a zip with a .zip name": (lambda: [("study.zip", b"PK\x03\x04 not really")], 422, "not a valid zip archive"),
}
ACCEPTED: dict[str, tuple[Callable[[], Files], str | None]] = {
    "CD export zip (DICOMDIR, README, AUTORUN, sub-folders)": (cd_export_zip, "file(s) that are not DICOM were skipped"),
    "files without the Part-10 header": (without_part10_header, "without the DICOM Part-10 header"),
    "NaN and infinite voxels": (nan_nifti, "NaN or infinite"),
    "'../' and absolute member names": (traversal_zip, None),
}


@pytest.fixture(scope="module")
def client(intensity_bundle, tmp_path_factory):  # type: ignore[no-untyped-def]
    storage = tmp_path_factory.mktemp("hostile") / "storage"
    with TestClient(create_app(Settings(bundle_dirs=[intensity_bundle], storage_dir=storage))) as c:
        c.storage = storage  # type: ignore[attr-defined]
        yield c


def post(client: TestClient, files: Files, **params) -> object:
    return client.post("/v1/segmentations", files=[("files", (n, d, "application/octet-stream")) for n, d in files],
                       params={"wait": "true", **params})


def assert_no_files_of_failed_jobs(client: TestClient) -> None:
    jobs = {j["id"]: j["state"] for j in client.get("/v1/segmentations", params={"limit": 500}).json()["jobs"]}
    for job_dir in (client.storage / "jobs").iterdir():  # type: ignore[attr-defined]
        leftovers = [p for p in job_dir.rglob("*") if p.is_file()]
        assert jobs.get(job_dir.name) == "succeeded" or not leftovers, (jobs.get(job_dir.name), leftovers)
    assert not list((client.storage / "jobs").glob("*/input"))  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_a_clear_4xx(client, case):
    make, status, words = REFUSED[case]
    r = post(client, make())
    assert r.status_code == status, (r.status_code, r.text[:500])
    detail = r.json()["detail"]
    assert words in detail, detail
    assert "Traceback" not in r.text and "internal error" not in detail
    assert client.get("/healthz").status_code == 200
    assert_no_files_of_failed_jobs(client)


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_usable_input_is_accepted_with_a_note(client, case):
    make, note = ACCEPTED[case]
    r = post(client, make())
    assert r.status_code == 200, r.text[:500]
    if note:
        assert any(note in n for n in r.json()["notes"]), r.json()["notes"]
    assert not Path("/tmp/evil1.dcm").exists() and not Path("/etc/abs0.dcm").exists()
    assert_no_files_of_failed_jobs(client)


def test_explicit_series_uid_does_not_skip_the_modality_check(client):
    datasets = series()
    r = post(client, wrong_modality(datasets), series_uid=datasets[0].SeriesInstanceUID)
    assert r.status_code == 422 and "has modality MR; the model takes CT" in r.json()["detail"]


def test_upload_limits_and_multipart_without_a_file(intensity_bundle, tmp_path):
    with TestClient(create_app(Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "s", max_upload_mb=1))) as c:
        big = [("files", ("ct.nii.gz", b"\0" * (2 << 20), "application/octet-stream"))]
        declared = c.post("/v1/segmentations", files=big)
        assert declared.status_code == 413 and "larger than the limit of 1 MB" in declared.json()["detail"]
        boundary = "ctsegboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"ct.nii.gz\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * (2 << 20) + f"\r\n--{boundary}--\r\n".encode()
        streamed = c.post("/v1/segmentations", content=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413 and "larger than the limit" in streamed.json()["detail"]
        assert "content-length" not in {k.lower() for k in streamed.request.headers}
        empty = c.post("/v1/segmentations", files={"other": ("x.txt", b"hello", "text/plain")})
        assert empty.status_code == 422 and "no file uploaded" in empty.json()["detail"]
        assert not [p for p in (tmp_path / "s" / "jobs").rglob("*") if p.is_file()]


def test_nan_voxels_are_air_not_the_zero_itk_reads(client):
    r = post(client, nan_nifti())
    assert r.status_code == 200
    data = client.get(f"/v1/segmentations/{r.json()['id']}/labelmap.nii.gz").content
    path = Path(client.storage) / "nan-labels.nii.gz"  # type: ignore[attr-defined]
    path.write_bytes(data)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    path.unlink()
    # ITK reads NaN as 0 HU (soft tissue: label 1 of the test bundle); as air they are background
    assert (labels[0, :3, :3] == 0).all() and (labels[1, :2, :2] == 0).all()
