"""The DICOM-SEG against independent tools: dciodvfy (dicom3tools) and dcmqi's segimage2itkimage.

Both are installed by .ci/run (Debian's dicom3tools, PyPI's dcmqi); where one is missing its test skips and
says which tool it needs, except under CI=true, where it fails.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient

from dicom_factory import series_from_image, to_bytes
from server.app import create_app
from server.core.settings import Settings
from common import require_tool
from test_api import phantom, post, read_labelmap

DCIODVFY = shutil.which("dciodvfy")
SEGIMAGE2ITK = shutil.which("segimage2itkimage") or (
    str(Path(sys.executable).parent / "segimage2itkimage") if (Path(sys.executable).parent / "segimage2itkimage").exists() else None
)
# Debian's 2022 dicom3tools predates Supplement 243 (LABELMAP): it reports exactly these for that class only.
LABELMAP_FALSE_ERRORS = ("SegmentNumber not monotonically increasing from one", "Information Object Not found")


def make_seg(bundle: Path, storage: Path, orientation: str, **settings) -> tuple[bytes, sitk.Image]:
    with TestClient(create_app(Settings(bundle_dirs=[bundle], storage_dir=storage, **settings))) as c:
        image, _ = phantom(orientation)
        files = [(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(series_from_image(image))]
        r = post(c, files, outputs="both")
        assert r.status_code == 200, r.text
        job = r.json()["id"]
        return c.get(f"/v1/segmentations/{job}/seg.dcm").content, read_labelmap(c, job)


def dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool(DCIODVFY, "dciodvfy (Debian package dicom3tools)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("seg_type, compression", [("BINARY", "none"), ("BINARY", "jpeg2000"), ("LABELMAP", "none"), ("LABELMAP", "rle")])
def test_dciodvfy_reports_no_errors(intensity_bundle, tmp_path, seg_type, compression):
    data, _ = make_seg(intensity_bundle, tmp_path / "s", "oblique", seg_type=seg_type, seg_compression=compression)
    path = tmp_path / "seg.dcm"
    path.write_bytes(data)
    errors = dciodvfy_errors(path)
    if seg_type == "LABELMAP":
        errors = [e for e in errors if not any(f in e for f in LABELMAP_FALSE_ERRORS)]
    assert errors == []


@pytest.mark.parametrize("orientation, compression", [("axial", "none"), ("sagittal", "none"), ("oblique", "jpeg2000")])
def test_dcmqi_reads_back_the_same_voxels(intensity_bundle, tmp_path, orientation, compression):
    segimage2itk = require_tool(SEGIMAGE2ITK, "segimage2itkimage (PyPI package dcmqi)")
    data, labelmap = make_seg(intensity_bundle, tmp_path / "s", orientation, seg_compression=compression)
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = ds.pixel_array
        ds.decompress()  # dcmqi reads uncompressed SEGs only
        if ds.BitsAllocated == 1:  # BINARY: the uncompressed form is bit-packed
            from pydicom.pixels import pack_bits

            ds.PixelData = pack_bits(frames)
    seg_path = tmp_path / "seg.dcm"
    ds.save_as(seg_path, enforce_file_format=True)
    out = tmp_path / "dcmqi"
    out.mkdir()
    proc = subprocess.run([segimage2itk, "--inputDICOM", str(seg_path), "--outputDirectory", str(out),
                           "--outputType", "nifti"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours = sitk.GetArrayFromImage(labelmap)
    found = 0
    for segment in (1, 2):
        path = out / f"{segment}.nii.gz"
        if not (ours == segment).any():
            continue
        theirs = sitk.Resample(sitk.ReadImage(str(path)), labelmap, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        assert np.array_equal(sitk.GetArrayFromImage(theirs) > 0, ours == segment), f"segment {segment} differs"
        found += 1
    assert found == 2


def test_binary_seg_with_rle_is_refused_at_configuration():
    with pytest.raises(ValueError, match="BINARY SEG is stored uncompressed or as JPEG 2000"):
        Settings(seg_type="BINARY", seg_compression="rle")


def test_lateral_structures_carry_a_laterality_modifier():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from models.labels import label_for
    from server.imaging.seg import SegIdentity, segment_description

    algo = hd.AlgorithmIdentificationSequence(name="t", family=codes.cid7162.ArtificialIntelligence, version="1")
    identity = SegIdentity("1.2.3", "1.2.3.4", 9001, "test")
    desc = segment_description(3, label_for(3, "kidney_left"), algo, identity)
    prop = desc.SegmentedPropertyTypeCodeSequence[0]
    assert prop.CodeValue == "64033007" and prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert desc.SegmentLabel == "kidney left" and len(desc.RecommendedDisplayCIELabValue) == 3
