"""End to end through the HTTP API with a real bundle: NIfTI and DICOM in, label map and DICOM-SEG out."""

from __future__ import annotations

import io
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient

from dicom_factory import (
    anonymise_without_uids,
    compress_jpeg2000,
    enhanced_from_image,
    series_from_image,
    to_bytes,
    zip_of,
)
from models.volume import Geometry
from phantoms import Organ, make_phantom
from server.app import create_app
from server.core.settings import Settings

BLOCK = Organ(2, "block", (10.0, -6.0, 8.0), (8.0, 8.0, 8.0), 400.0)  # bright: nearest centre 0.95 -> label 2


def phantom(orientation: str = "axial", shape=(40, 36, 30), spacing=(2.0, 2.0, 2.5)):
    return make_phantom(shape, spacing, orientation, seed=3, noise=3.0, organs=(BLOCK,))


@pytest.fixture()
def client(intensity_bundle: Path, tmp_path: Path):
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage", sw_overlap=0.25)
    with TestClient(create_app(settings)) as c:
        yield c


def post(client: TestClient, files: list[tuple[str, bytes]], **params) -> object:
    multipart = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/v1/segmentations", files=multipart, params={"wait": "true", **params})


def nifti_bytes(image: sitk.Image) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "ct.nii.gz"
        sitk.WriteImage(image, str(p))
        return p.read_bytes()


def read_labelmap(client: TestClient, job_id: str) -> sitk.Image:
    r = client.get(f"/v1/segmentations/{job_id}/labelmap.nii.gz")
    assert r.status_code == 200
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "l.nii.gz"
        p.write_bytes(r.content)
        return sitk.ReadImage(str(p))


def centroid_mm(image: sitk.Image, value: int) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    idx = np.argwhere(arr == value)
    geo = Geometry.of(image)
    return geo.index_to_physical(idx).mean(0)


@pytest.mark.parametrize("orientation", ["axial", "ras", "coronal", "sagittal", "oblique"])
def test_nifti_in_labelmap_out_on_the_input_grid(client, orientation):
    image, _ = phantom(orientation)
    r = post(client, [("ct.nii.gz", nifti_bytes(image))])
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded" and set(job["timings"]) >= {"decode", "preprocess", "inference", "postprocess"}
    out = read_labelmap(client, job["id"])
    assert out.GetSize() == image.GetSize()
    assert np.allclose(out.GetSpacing(), image.GetSpacing()) and np.allclose(out.GetOrigin(), image.GetOrigin())
    assert np.allclose(out.GetDirection(), image.GetDirection())
    # the bright block lands where it is in physical space
    assert np.linalg.norm(centroid_mm(out, 2) - np.asarray(BLOCK.center)) < 1.5
    vols = client.get(f"/v1/segmentations/{job['id']}/volumes.json").json()
    block_ml = 4 / 3 * np.pi * 8 ** 3 / 1000
    assert abs(vols["labels"]["aorta"]["ml"] - block_ml) / block_ml < 0.2
    png = client.get(f"/v1/segmentations/{job['id']}/preview.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def read_seg(client: TestClient, job_id: str) -> hd.seg.Segmentation:
    r = client.get(f"/v1/segmentations/{job_id}/seg.dcm")
    assert r.status_code == 200
    return hd.seg.segread(io.BytesIO(r.content))


def seg_centroid_mm(seg: hd.seg.Segmentation, segment: int) -> np.ndarray:
    """Physical centroid of a segment from the SEG's own plane positions (independent of our reader)."""
    ori = np.asarray(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.asarray(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing, float)
    row, col = ori[:3], ori[3:]
    pts = []
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != segment:
            continue
        pos = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        pixels = seg.pixel_array[i] if seg.pixel_array.ndim == 3 else seg.pixel_array
        rr, cc = np.nonzero(pixels)
        pts.append(pos + np.outer(cc * spacing[1], row) + np.outer(rr * spacing[0], col))
    return np.concatenate(pts).mean(0)


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal", "oblique"])
def test_dicom_series_shuffled_with_one_jpeg2000_file_gives_a_seg_at_the_right_place(client, orientation):
    image, _ = phantom(orientation)
    datasets = series_from_image(image)
    compress_jpeg2000(datasets[len(datasets) // 2])
    order = np.random.default_rng(0).permutation(len(datasets))
    files = [(f"f{i}.dcm", to_bytes(datasets[i])) for i in order]
    r = post(client, files, outputs="both")
    assert r.status_code == 200, r.text
    job = r.json()
    seg = read_seg(client, job["id"])
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for item in s.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in datasets}
    descs = {d.SegmentNumber: d for d in seg.SegmentSequence}
    assert descs[1].SegmentLabel == "liver" and descs[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "15825003"
    assert np.linalg.norm(seg_centroid_mm(seg, 2) - np.asarray(BLOCK.center)) < 1.5
    out = read_labelmap(client, job["id"])
    assert np.linalg.norm(centroid_mm(out, 2) - np.asarray(BLOCK.center)) < 1.5


def test_multi_series_zip_needs_a_choice_then_segments_the_chosen_one(client):
    image, _ = phantom("axial")
    a = series_from_image(image, series_number=2, description="arterial")
    b = series_from_image(image, study_uid=a[0].StudyInstanceUID, series_number=3, description="venous")
    blob = zip_of(a + b)
    r = post(client, [("study.zip", blob)])
    assert r.status_code == 422
    body = r.json()
    assert "2 candidate series" in body["detail"]
    assert {s["description"] for s in body["series"]} == {"arterial", "venous"}
    assert all(s["slices"] == len(a) for s in body["series"])
    r = post(client, [("study.zip", blob)], series_uid=b[0].SeriesInstanceUID, outputs="dicom-seg")
    assert r.status_code == 200, r.text
    seg = read_seg(client, r.json()["id"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == b[0].SeriesInstanceUID


def test_anonymised_series_without_uids_gets_consistent_generated_ones(client):
    image, _ = phantom("axial")
    datasets = anonymise_without_uids(series_from_image(image))
    files = [(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]
    r = post(client, files, outputs="both")
    assert r.status_code == 200, r.text
    job = r.json()
    assert any("generated" in n for n in job["notes"])
    seg = read_seg(client, job["id"])
    referenced = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    assert len(set(referenced)) == len(datasets) and all(referenced)
    # the same upload twice gets the same generated source UIDs (from its content), and each result its own SEG UIDs
    seg2 = read_seg(client, post(client, files, outputs="dicom-seg").json()["id"])
    assert seg2.StudyInstanceUID == seg.StudyInstanceUID
    assert {i.ReferencedSOPInstanceUID for s in seg2.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence} \
        == set(referenced)
    assert seg2.SeriesInstanceUID != seg.SeriesInstanceUID and seg2.SOPInstanceUID != seg.SOPInstanceUID
    # another anonymised patient with the same blank IDs, slice count and positions gets other UIDs
    other_image, _ = make_phantom((40, 36, 30), (2.0, 2.0, 2.5), "axial", seed=99, noise=3.0, organs=(BLOCK,))
    other = anonymise_without_uids(series_from_image(other_image))
    seg3 = read_seg(client, post(client, [(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(other)],
                                 outputs="dicom-seg").json()["id"])
    assert seg3.StudyInstanceUID != seg.StudyInstanceUID
    assert not {i.ReferencedSOPInstanceUID for s in seg3.ReferencedSeriesSequence
                for i in s.ReferencedInstanceSequence} & set(referenced)


def test_anonymiser_blanked_sop_class_is_taken_from_the_file_meta(client):
    image, _ = phantom("axial")
    datasets = series_from_image(image)
    for ds in datasets:
        ds.SOPClassUID = ""  # what some anonymisers do; MediaStorageSOPClassUID stays
        compress_jpeg2000(ds)
    r = post(client, [(f"{i:08d}", to_bytes(ds)) for i, ds in enumerate(datasets)], outputs="both")
    assert r.status_code == 200, r.text
    seg = read_seg(client, r.json()["id"])
    classes = {i.ReferencedSOPClassUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert classes == {"1.2.840.10008.5.1.4.1.1.2"}


def test_each_result_has_its_own_seg_and_tracking_uids():
    from server.imaging.seg import build_seg
    from server.imaging.dicom_reader import load_series
    from bundles import labels_only_bundle

    image, _ = phantom("axial")
    datasets = series_from_image(image)
    series = load_series([(f"f{i}", to_bytes(ds)) for i, ds in enumerate(datasets)])
    labels = np.zeros(series.volume.shape, np.uint8)
    labels[5:10, 5:10, 5:10] = 1
    bundle = labels_only_bundle(2)
    read = lambda data: pydicom.dcmread(io.BytesIO(data))  # noqa: E731
    binary = read(build_seg(series, labels, bundle, "BINARY", result_id="job-1"))
    labelmap = read(build_seg(series, labels, bundle, "LABELMAP", result_id="job-1"))
    again = read(build_seg(series, labels, bundle, "BINARY", result_id="job-1"))
    other_job = read(build_seg(series, labels, bundle, "BINARY", result_id="job-2"))
    assert binary.SOPInstanceUID == again.SOPInstanceUID  # one result keeps its UIDs (delivery retries)
    uids = [(s.SOPInstanceUID, s.SeriesInstanceUID) for s in (binary, labelmap, other_job)]
    assert len({u for pair in uids for u in pair}) == 6
    tracking = lambda s: {d.TrackingUID for d in s.SegmentSequence}  # noqa: E731
    assert not tracking(binary) & tracking(other_job) and len(tracking(binary)) == 2


def test_enhanced_multiframe_ct(client):
    image, _ = phantom("axial")
    ds = enhanced_from_image(image)
    r = post(client, [("enhanced.dcm", to_bytes(ds))], outputs="both")
    assert r.status_code == 200, r.text
    seg = read_seg(client, r.json()["id"])
    assert np.linalg.norm(seg_centroid_mm(seg, 2) - np.asarray(BLOCK.center)) < 1.5
    out = read_labelmap(client, r.json()["id"])
    assert np.linalg.norm(centroid_mm(out, 2) - np.asarray(BLOCK.center)) < 1.5


def test_models_health_and_metrics(client):
    models = client.get("/v1/models").json()["models"]
    assert models[0]["name"] == "intensity-test" and models[0]["roi"] == [16, 32, 32]
    assert models[0]["labels"][1]["snomed"]["meaning"] == "Aorta"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    text = client.get("/metrics").text
    assert "ctseg_requests_total" in text and "ctseg_queue_depth" in text and 'ctseg_jobs{state="queued"}' in text


def test_async_job_with_progress_and_delete(client):
    image, _ = phantom("axial")
    r = client.post("/v1/segmentations", files=[("files", ("ct.nii.gz", nifti_bytes(image)))])
    assert r.status_code == 202
    location = r.headers["Location"]
    for _ in range(200):
        job = client.get(location).json()
        if job["state"] == "succeeded":
            break
        time.sleep(0.05)
    assert job["state"] == "succeeded"
    assert job["progress"]["windows_done"] == job["progress"]["windows_total"] > 0
    assert client.delete(location).status_code == 204
    assert client.get(location).status_code == 404


def test_preview_of_a_long_scan_is_bounded_and_shows_the_label():
    from PIL import Image

    from models.labels import label_for
    from models.volume import Geometry, Volume
    from server.imaging.preview import PANEL, render_preview

    shape = (600, 40, 300)  # (D, H, W): longer than a panel along depth and width
    ct = np.full(shape, -1000, np.int16)
    labels = np.zeros(shape, np.uint8)
    ct[200:400, 10:30, 100:200] = 40
    labels[200:400, 10:30, 100:200] = 1
    volume = Volume(ct, Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    liver = label_for(1, "liver")
    png = Image.open(io.BytesIO(render_preview(volume, labels, (liver,)))).convert("RGB")
    assert png.width <= 3 * PANEL + 32
    pixels = np.asarray(png).reshape(-1, 3).astype(float)
    grey = np.clip((40 + 160) / 400, 0, 1) * 255
    blended = 0.45 * grey + 0.55 * np.asarray(liver.color, dtype=float)
    assert (np.abs(pixels - blended).max(axis=1) <= 2).sum() > 100  # the overlay colour over the block
