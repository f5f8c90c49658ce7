"""The key image (server/imaging/key_image.py): a Secondary Capture dciodvfy accepts, whose pixels are the preview's
over a caption, in the source's study with its patient, flagged as derived with burned-in text."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from dicom_factory import series_from_image, write_files
from PIL import Image
from test_api import phantom
from test_dicom_conformance import dciodvfy_errors

from server.core.vocabulary import InputKind, Output
from server.inference.engine import Engine
from server.inference.pipeline import run_pipeline


def test_the_key_image_is_the_preview_over_a_caption_in_the_source_study(intensity_bundle, tmp_path):
    source = series_from_image(phantom("axial")[0])
    files = write_files(source, tmp_path / "in")
    result = run_pipeline(Engine.from_dir(intensity_bundle, overlap=0.25), InputKind.DICOM, files, tmp_path / "out",
                          (Output.SC,), result_id="key-image-test")
    assert [r.value for r in result.produced] == ["sc.dcm", "volumes.json", "preview.png"]
    path = tmp_path / "out" / "sc.dcm"
    assert dciodvfy_errors(path) == []
    sc = pydicom.dcmread(path)
    preview = np.asarray(Image.open(io.BytesIO((tmp_path / "out" / "preview.png").read_bytes())).convert("RGB"))
    pixels = sc.pixel_array
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert pixels.shape[1:] == preview.shape[1:] and pixels.shape[0] > preview.shape[0]
    assert np.array_equal(pixels[: preview.shape[0]], preview)
    caption = pixels[preview.shape[0]:]
    assert (caption[..., 0] > 200).any()  # the caption's text is burned in
    assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert "not for diagnosis" in sc.SeriesDescription
    src = source[0]
    assert (sc.StudyInstanceUID, sc.PatientID, sc.PatientName) == (src.StudyInstanceUID, src.PatientID,
                                                                   src.PatientName)
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID
    again = run_pipeline(Engine.from_dir(intensity_bundle, overlap=0.25), InputKind.DICOM, files,
                         tmp_path / "again", (Output.SC,), result_id="key-image-test")
    assert again.produced and pydicom.dcmread(tmp_path / "again" / "sc.dcm").SOPInstanceUID == sc.SOPInstanceUID
