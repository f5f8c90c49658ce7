"""``ctseg predict`` runs the service's engine offline on files and folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from dicom_factory import series_from_image, write_files
from test_api import BLOCK, centroid_mm, phantom

ROOT = Path(__file__).resolve().parents[1]


def test_predict_nifti_and_dicom_folder(intensity_bundle: Path, tmp_path: Path):
    image, _ = phantom("coronal")
    nifti = tmp_path / "patient1.nii.gz"
    sitk.WriteImage(image, str(nifti))
    folder = tmp_path / "patient2"
    write_files(series_from_image(image), folder)
    proc = subprocess.run(
        [sys.executable, "-m", "ctseg", "predict", str(nifti), str(folder), "--out", str(tmp_path / "out"),
         "--bundles", str(intensity_bundle), "--outputs", "both"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "windows" in proc.stderr  # progress was shown
    label = sitk.ReadImage(str(tmp_path / "out" / "patient1" / "labelmap.nii.gz"))
    assert label.GetSize() == image.GetSize()
    assert np.linalg.norm(centroid_mm(label, 2) - np.asarray(BLOCK.center)) < 1.5
    assert "no DICOM-SEG: the input was NIfTI" in proc.stdout
    seg = pydicom.dcmread(tmp_path / "out" / "patient2" / "seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"


def test_predict_missing_input_and_bad_bundle(intensity_bundle: Path, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "ctseg", "predict", str(tmp_path / "nope.nii.gz"), "--out",
                           str(tmp_path / "o"), "--bundles", str(intensity_bundle)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and "no such file or folder" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ctseg", "predict", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--bundles", str(tmp_path / "empty")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "no model bundle found" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_refuses_to_start_without_a_valid_bundle(tmp_path: Path, intensity_bundle: Path):
    proc = subprocess.run([sys.executable, "-m", "ctseg", "serve", "--bundles", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no model bundle found" in proc.stderr and "Traceback" not in proc.stderr
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(intensity_bundle, broken)
    (broken / "model.onnx").write_bytes(b"tampered")
    proc = subprocess.run([sys.executable, "-m", "ctseg", "serve", "--bundles", str(broken)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "checksum mismatch for model.onnx" in proc.stderr
