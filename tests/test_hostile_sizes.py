"""Declared sizes and deflate: what a DICOM header claims is bounded before anything is decoded, a deflated data set
is inflated under a bound (the API process's memory is measured), a correct deflated series is segmented, and lossy
input is said to be lossy. Everything is generated here with pydicom; nothing large is written to disk or held.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
import requests
from common import Serve
from dicom_factory import enhanced_from_image, series_from_image, to_bytes
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from test_api import phantom

from server.core.bounds import MB, DicomBounds
from server.core.errors import InputError
from server.core.settings import Settings
from server.imaging import dicom_reader
from server.jobs.staging import select_input

Files = list[tuple[str, bytes]]
ZEROS = bytes(16 * MB)


@pytest.fixture(scope="module")
def server(intensity_bundle, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hostile-sizes")
    serve = Serve(intensity_bundle, root / "storage", root / "ctseg.log").start()
    try:
        yield serve
    finally:
        serve.kill()


def upload(server: Serve, files: Files, wait: bool = True, outputs: str = "nifti") -> requests.Response:
    return requests.post(server.url + "/v1/segmentations",
                         params={"wait": "true" if wait else "false", "outputs": outputs},
                         files=[("files", (n, d, "application/octet-stream")) for n, d in files], timeout=300)


def small_series(shape=(20, 24, 6)) -> list[Dataset]:  # type: ignore[no-untyped-def]
    image, _ = phantom(shape=shape)
    return series_from_image(image)


def files_of(datasets: list[Dataset]) -> Files:
    return [(f"IM{i:04d}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]


def _raw_deflate(data: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(data) + z.flush(zlib.Z_FULL_FLUSH)


def deflate_bomb(ds: Dataset, pixel_bytes: int) -> bytes:
    """A Part-10 file in Deflated Explicit VR Little Endian: ``ds``'s header, then a pixel data element of
    ``pixel_bytes`` zeros, deflated. Deflate blocks after a full flush are independent, so 16 MiB of zeros are
    compressed once and repeated (the bomb is never held inflated, here either)."""
    header = Dataset()
    for elem in ds:
        if elem.tag != 0x7FE00010:
            header.add(elem)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, header)
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    full, rest = divmod(pixel_bytes, len(ZEROS))
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = (_raw_deflate(body.getvalue() + element) + _raw_deflate(ZEROS) * full + _raw_deflate(bytes(rest))
              + end.flush())
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + stream


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_deflate_bombs_are_refused_and_the_api_process_stays_under_its_bound(server):
    ds = small_series()[0]
    ds.Rows = ds.Columns = 10000
    ds.NumberOfFrames = 3
    declared_huge = deflate_bomb(ds, 3 * 10000 * 10000 * 2)  # 600 MB inflated, 0.6 MB sent (as in the report)
    lying = small_series()[0]
    lying.Rows = lying.Columns = 512  # declares 0.5 MB of pixels, inflates to 256 MB
    lying_bomb = deflate_bomb(lying, 256 * MB)
    assert len(declared_huge) < MB and len(lying_bomb) < MB
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    before = status_kb(pid, "VmRSS")

    huge, lying = upload(server, [("bomb.dcm", declared_huge)]), upload(server, [("bomb.dcm", lying_bomb)])
    grown_mb = (status_kb(pid, "VmHWM") - before) / 1024
    # the stated bound: one deflated header (CTSEG_DICOM_MAX_HEADER_MB) plus what a request costs anyway
    assert grown_mb < DicomBounds().max_header_bytes / MB + 32, f"API process grew by {grown_mb:.0f} MB"
    assert huge.status_code == 422, huge.text[:300]
    assert "10000x10000" in huge.json()["detail"] and "CTSEG_DICOM_MAX_ROWS_COLUMNS" in huge.json()["detail"]
    assert lying.status_code == 422, lying.text[:300]
    assert "a deflate bomb?" in lying.json()["detail"] and "CTSEG_DICOM_MAX_HEADER_MB" in lying.json()["detail"]
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def rle_huge() -> Files:
    datasets = small_series()[:3]
    for ds in datasets:
        ds.compress(RLELossless)
        ds.Rows = ds.Columns = 16000  # 1.8 KB files declaring 512 MB frames
    return files_of(datasets)


def j2k_huge() -> Files:
    datasets = small_series((40, 36, 3))  # openjpeg's default resolutions need at least 32x32
    for ds in datasets:
        ds.compress(JPEG2000Lossless)
        ds.Rows = ds.Columns = 30000
    return files_of(datasets)


def rle_many_frames() -> Files:
    image, _ = phantom(shape=(4, 24, 20))
    ds = enhanced_from_image(image)
    ds.compress(RLELossless)
    ds.NumberOfFrames = 100000
    return files_of([ds])


@pytest.mark.parametrize(("make", "words"), [
    (rle_huge, ("16000x16000 pixels", "CTSEG_DICOM_MAX_ROWS_COLUMNS")),
    (j2k_huge, ("30000x30000 pixels", "CTSEG_DICOM_MAX_ROWS_COLUMNS")),
    (rle_many_frames, ("100000 frames", "CTSEG_DICOM_MAX_FRAMES")),
], ids=["RLE 16000x16000", "JPEG 2000 30000x30000", "RLE 100000 frames"])
def test_encapsulated_images_declaring_huge_sizes_are_refused_at_staging(server, make, words):
    r = upload(server, make(), wait=False)  # refused at staging: no job is queued, nothing decoded
    assert r.status_code == 422, r.text[:300]
    assert all(w in r.json()["detail"] for w in words), r.json()["detail"]


def test_frame_and_volume_bounds_name_the_value_and_the_setting(tmp_path):
    paths = []
    for name, data in files_of(small_series()):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    bounds = Settings(dicom_max_volume_mvoxels=0.001, dicom_max_frame_mb=0.0005).dicom_bounds()
    assert (bounds.max_volume_voxels, bounds.max_frame_bytes) == (1000, 524)
    with pytest.raises(InputError, match=r"file 1 of the upload declares frames of 960 bytes decoded \(24x20 pixels"
                                         r".*at most 524 are accepted \(CTSEG_DICOM_MAX_FRAME_MB"):
        select_input(paths, None, {"CT"}, bounds=bounds)
    with pytest.raises(InputError, match=r"the series declares 2,880 voxels \(6 instance\(s\)\); at most 1,000 are "
                                         r"accepted \(CTSEG_DICOM_MAX_VOLUME_MVOXELS"):
        select_input(paths, None, {"CT"}, bounds=DicomBounds(max_volume_voxels=1000))
    assert select_input(paths, None, {"CT"}, bounds=DicomBounds(max_volume_voxels=2880, max_frame_bytes=960)).files


def deflated(datasets: list[Dataset]) -> Files:
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # pydicom deflates as it writes
    return files_of(datasets)


def test_a_deflated_series_is_segmented_as_its_uncompressed_original(server):
    image, _ = phantom()
    plain = upload(server, files_of(series_from_image(image)))
    files = deflated(series_from_image(image))
    assert pydicom.dcmread(io.BytesIO(files[0][1])).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    r = upload(server, files)
    assert plain.status_code == 200 and r.status_code == 200, r.text[:300]
    assert r.json()["state"] == "succeeded"
    volumes = [requests.get(f"{server.url}/v1/segmentations/{j.json()['id']}/volumes.json", timeout=10).json()
               for j in (plain, r)]
    assert volumes[0]["labels"] == volumes[1]["labels"]


def test_read_header_is_bounded_and_reads_deflate(tmp_path):
    good = tmp_path / "good.dcm"
    good.write_bytes(deflated(small_series())[0][1])
    header = dicom_reader.read_header(good)
    assert "PixelData" not in header and int(header.Rows) == 24 and header.filename == str(good)
    bomb = tmp_path / "bomb.dcm"
    ds = small_series()[0]
    bomb.write_bytes(deflate_bomb(ds, 8 * MB))
    with pytest.raises(InputError, match=r"inflates past its declared pixel data plus 1 MB \(CTSEG_DICOM_MAX_HEADER_MB"):
        dicom_reader.read_header(bomb, DicomBounds(max_header_bytes=MB))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(InputError, match="damaged DICOM file: the deflate stream ends early"):
        dicom_reader.read_header(cut)


def test_lossy_input_is_noted_on_the_job_and_the_seg_says_so(server):
    image, _ = phantom()
    datasets = series_from_image(image)
    for ds in datasets:
        ds.compress(JPEG2000, j2k_cr=[8])  # lossy JPEG 2000 (1.2.840.10008.1.2.4.91), as a PACS may send it
        assert "LossyImageCompression" not in ds  # the header does not say so: only the transfer syntax does
    r = upload(server, files_of(datasets), outputs="both")
    assert r.status_code == 200, r.text[:300]
    job = r.json()
    assert any(n.startswith(f"lossy-compressed input (JPEG 2000): {len(datasets)} of {len(datasets)}")
               for n in job["notes"]), job["notes"]
    seg = pydicom.dcmread(io.BytesIO(requests.get(f"{server.url}/v1/segmentations/{job['id']}/seg.dcm",
                                                  timeout=10).content))
    assert seg.LossyImageCompression == "01" and seg.LossyImageCompressionMethod == "ISO_15444_1"


def test_a_header_read_leaves_large_elements_on_disk(tmp_path):
    """64 MB of OverlayData before the pixel data: a header read (what staging and the DICOM listener do) does not
    hold it (it is left on disk, never asked for)."""
    import tracemalloc

    ds = small_series()[0]
    ds.add_new(0x60003000, "OW", bytes(64 * MB))  # OverlayData, group 6000: before (7FE0,0010)
    path = tmp_path / "overlay.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    tracemalloc.start()
    try:
        header = dicom_reader.read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert int(header.Rows) == 24
    assert peak < 8 * MB, f"a header read held {peak / MB:.0f} MB"


def test_one_instance_declaring_more_voxels_than_a_series_may_is_refused_before_its_body_is_inflated(tmp_path):
    import time

    ds = small_series()[0]
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = 8192  # each bound on its own holds; together 137 billion voxels
    path = tmp_path / "huge.dcm"
    path.write_bytes(deflate_bomb(ds, 64 * MB))
    started = time.monotonic()
    with pytest.raises(InputError, match=r"declares 137,438,953,472 voxels .* \(CTSEG_DICOM_MAX_VOLUME_MVOXELS"):
        dicom_reader.read_header(path)
    assert time.monotonic() - started < 5
