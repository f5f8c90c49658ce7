"""``outputs`` as a list through the API: SR and key image downloaded from a tiny DICOM upload, the quality flags on
the job, and a 422 that names an unknown output or a DICOM output asked of a NIfTI input."""

from __future__ import annotations

import io

import pydicom
from dicom_factory import series_from_image, to_bytes
from test_api import client, nifti_bytes, phantom, post  # noqa: F401  (client is a fixture)

from server.core.vocabulary import OUTPUT_CHOICES


def test_nifti_sr_and_sc_from_a_dicom_upload(client):  # noqa: F811
    image = phantom("axial")[0]
    files = [(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(series_from_image(image))]
    r = post(client, files, outputs="nifti,sr,sc")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["outputs_requested"] == ["nifti", "sr", "sc"]
    assert set(job["results"]) == {"labelmap.nii.gz", "sr.dcm", "sc.dcm", "volumes.json", "preview.png"}
    for name, sop_class in (("sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34"), ("sc.dcm", "1.2.840.10008.5.1.4.1.1.7")):
        got = client.get(job["results"][name])
        assert got.status_code == 200 and got.headers["content-type"] == "application/dicom"
        assert f'filename="{name}"' in got.headers["content-disposition"]
        assert pydicom.dcmread(io.BytesIO(got.content)).SOPClassUID == sop_class
    # the body runs through every slice of the phantom: its label is flagged, and the job says so
    volumes = client.get(job["results"]["volumes.json"]).json()
    assert "touches-scan-end" in job["quality"]["flags"]
    assert job["quality"]["labels"]["liver"] == volumes["labels"]["liver"]["flags"]
    assert job["quality"]["job"] == volumes["quality"]["flags"]
    assert client.get(f"/v1/segmentations/{job['id']}/seg.dcm").status_code == 404  # not asked for
    assert "ctseg_quality_flags_total" in client.get("/metrics").text


def test_an_unknown_output_is_a_422_naming_it_and_the_choices(client):  # noqa: F811
    image = phantom("axial")[0]
    files = [("f0.dcm", to_bytes(series_from_image(image)[0]))]
    r = post(client, files, outputs="nifti,bogus")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "'bogus'" in detail and all(name in detail for name in OUTPUT_CHOICES)


def test_a_dicom_output_of_a_nifti_input_is_refused_like_a_seg(client):  # noqa: F811
    r = post(client, [("ct.nii.gz", nifti_bytes(phantom("axial")[0]))], outputs="nifti,sr,sc")
    assert r.status_code == 422
    assert "sr, sc need DICOM input" in r.json()["detail"]


def test_the_job_links_its_study_in_the_configured_viewer(intensity_bundle, tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.core.settings import Settings

    datasets = series_from_image(phantom("axial")[0])
    settings = Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "storage",
                        viewer_url="http://127.0.0.1:3000/")
    with TestClient(create_app(settings)) as c:
        r = post(c, [(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)], outputs="dicom-seg")
        assert r.status_code == 200, r.text
        assert r.json()["viewer_url"] == (f"http://127.0.0.1:3000/viewer?StudyInstanceUIDs="
                                          f"{datasets[0].StudyInstanceUID}")
        nifti = post(c, [("ct.nii.gz", nifti_bytes(phantom("axial")[0]))])
        assert nifti.json()["viewer_url"] is None  # no study to open
