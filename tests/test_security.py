"""Who gets in and what leaks out: keys on every route but the probes, no patient data or file names in logs or
answers, patient data on disk readable by the service user only, and the security lint clean."""

from __future__ import annotations

import logging
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from dicom_factory import series_from_image, to_bytes, zip_of
from common import require_tool
from server.app import create_app
from server.core.settings import Settings
from test_api import phantom

REPO = Path(__file__).resolve().parents[1]
PHI = ("Doe^Jane", "Doe_Jane", "MRN-99341", "19450203")


def keyed_client(bundle: Path, tmp_path: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(bundle_dirs=[bundle], storage_dir=tmp_path / "storage",
                                          api_keys=["k3y-one", "k3y-two"], **settings)))


def every_route(routes, prefix: str = "") -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(method, path) of every route, descending into included routers (FastAPI wraps them)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            out += every_route(inner.routes, prefix + route.include_context.prefix)
        elif isinstance(route, (APIRoute, Route)):
            path = (prefix + route.path).replace("{job_id}", "nope").replace("{name}", "seg.dcm")
            out += [(method, path) for method in sorted(route.methods or {"GET"}) if method != "HEAD"]
    return out


def test_every_route_but_the_probes_needs_a_key(intensity_bundle, tmp_path):
    with keyed_client(intensity_bundle, tmp_path) as c:
        routes = every_route(c.app.routes)
        assert ("POST", "/v1/segmentations") in routes and ("GET", "/openapi.json") in routes and len(routes) >= 10
        for method, path in routes:
            r = c.request(method, path)
            if path in ("/healthz", "/readyz"):
                assert r.status_code == 200, (method, path)
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.headers["www-authenticate"] == "ApiKey"
                assert c.request(method, path, headers={"X-API-Key": "k3y-on"}).status_code == 403
        assert c.get("/v1/models", headers={"X-API-Key": "k3y-two"}).status_code == 200
        assert c.get("/metrics", headers={"X-API-Key": "k3y-one"}).status_code == 200


def test_metrics_open_only_by_an_explicit_setting(intensity_bundle, tmp_path):
    with keyed_client(intensity_bundle, tmp_path, metrics_public=True) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models").status_code == 401


def test_no_patient_data_or_file_names_in_logs_or_answers(intensity_bundle, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    image, _ = phantom()
    datasets = series_from_image(image)
    for ds in datasets:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-99341", "19450203"
        ds.SeriesDescription = "CT ABDOMEN"
    named = [(f"Doe_Jane_MRN-99341_{i:03d}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]
    answers = []
    with TestClient(create_app(Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "s"))) as c:
        def post(files, **params):  # type: ignore[no-untyped-def]
            r = c.post("/v1/segmentations", params={"wait": "true", **params},
                       files=[("files", (n, d, "application/octet-stream")) for n, d in files])
            answers.append(r.text)
            return r

        assert post(named, outputs="both").status_code == 200
        assert post(named[:10] + named[11:]).status_code == 422  # a slice missing: fails, with a message
        assert post(named + [("Doe_Jane_notes.txt", b"Jane Doe, MRN-99341")]).status_code == 200
        assert post([("Doe_Jane_MRN-99341.zip", zip_of(datasets[:1]))]).status_code == 422
        assert post([("Doe_Jane_MRN-99341.nii.gz", b"not nifti")]).status_code == 422
        assert post([("Doe_Jane_MRN-99341.dcm", to_bytes(datasets[0])[:700])]).status_code == 422
        answers.append(c.get("/v1/segmentations").text)
    text = caplog.text + "".join(answers)
    for value in PHI:
        assert value not in text, value


def test_stored_patient_data_is_readable_by_the_service_user_only(intensity_bundle, tmp_path):
    image, _ = phantom()
    files = [("files", (f"f{i}", to_bytes(ds), "application/dicom")) for i, ds in enumerate(series_from_image(image))]
    with TestClient(create_app(Settings(bundle_dirs=[intensity_bundle], storage_dir=tmp_path / "s"))) as c:
        job = c.post("/v1/segmentations", files=files, params={"wait": "true", "outputs": "both"}).json()
        results = [p for p in (tmp_path / "s" / "jobs" / job["id"] / f"run-{job['attempt']}").iterdir()]
    assert {p.name for p in results} >= {"labelmap.nii.gz", "seg.dcm", "preview.png", "volumes.json"}
    for path in [tmp_path / "s", *results, *(tmp_path / "s").glob("jobs.sqlite3*"), tmp_path / "s" / "ctseg.lock"]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path, oct(path.stat().st_mode))


def test_security_lint_is_clean():
    ruff = require_tool(shutil.which("ruff") or (str(Path(sys.executable).parent / "ruff")
                                                 if (Path(sys.executable).parent / "ruff").exists() else None),
                        "ruff (pip install ruff; part of the dev extra)")
    proc = subprocess.run([ruff, "check", "--select", "S", "--output-format", "concise", "server", "models",
                           "inflation", "ctseg"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
