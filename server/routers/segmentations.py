"""Segmentation jobs: submit a CT, follow the job, fetch the results."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import SimpleITK as sitk
from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response

from server.deps import AuthDep, ServiceDep
from server.dicom_input import inspect_series
from server.errors import InputError
from server.jobs import JobState
from server.nifti_io import is_nifti_name
from server.service import Submission
from server.uploads import extract_zip

router = APIRouter(prefix="/v1/segmentations", tags=["segmentations"], dependencies=[AuthDep])

MEDIA = {"labelmap.nii.gz": "application/gzip", "seg.dcm": "application/dicom", "preview.png": "image/png",
         "volumes.json": "application/json"}
OUTPUT_CHOICES = {"nifti": ["nifti"], "dicom-seg": ["dicom-seg"], "both": ["nifti", "dicom-seg"]}
CHUNK = 1 << 20


def _safe_name(name: str | None, index: int) -> str:
    base = Path(name or f"file{index}").name
    return f"{index:05d}_" + (re.sub(r"[^A-Za-z0-9._-]", "_", base)[:120] or "file")


def _parse_outputs(value: str) -> list[str]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    out: list[str] = []
    for p in parts:
        if p not in OUTPUT_CHOICES:
            raise InputError(f"unknown output {p!r}; choose nifti, dicom-seg or both")
        out += [o for o in OUTPUT_CHOICES[p] if o not in out]
    if not out:
        raise InputError("outputs must name at least one of nifti, dicom-seg, both")
    return out


def _check_nifti_header(path: Path, name: str) -> None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{name}: not a readable NIfTI file") from None
    size = reader.GetSize()
    if len(size) not in (3, 4) or (len(size) == 4 and size[3] != 1):
        raise InputError(f"{name}: expected a 3D volume; got size {size}")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{name}: expected grey-scale CT (one value per voxel)")


@router.post(
    "",
    status_code=202,
    summary="Segment a CT (NIfTI file, DICOM files, or a zip of a series/study)",
    responses={
        200: {"description": "finished (wait=true)"},
        202: {"description": "accepted; follow the Location header",
              "content": {"application/json": {"example": {"id": "3f2c...", "state": "queued"}}}},
        404: {"description": "unknown model"},
        413: {"description": "upload over the size limit"},
        422: {"description": "unreadable input, several candidate series, NIfTI with dicom-seg, ..."},
    },
)
async def submit(
    request: Request,
    service: ServiceDep,
    files: Annotated[list[UploadFile], File(description="one .nii/.nii.gz, or DICOM files, or .zip archive(s)")],
    model: Annotated[str | None, Query(description="bundle name; default: the service's default model")] = None,
    outputs: Annotated[str, Query(description="nifti, dicom-seg or both", examples=["both"])] = "nifti",
    series_uid: Annotated[str | None, Query(description="SeriesInstanceUID to segment when several are sent")] = None,
    wait: Annotated[bool, Query(description="answer when done (up to the sync timeout) instead of 202")] = False,
) -> Response:
    engine = service.engine(model)
    wanted = _parse_outputs(outputs)
    names = [f.filename or "" for f in files]
    if not files:
        raise InputError("no file uploaded (multipart field 'files')")
    nifti = [n for n in names if is_nifti_name(n)]
    if nifti and len(files) > 1:
        raise InputError("send one NIfTI file per request (or DICOM files / zips, not both)")
    kind = "nifti" if nifti else "dicom"
    if kind == "nifti" and "dicom-seg" in wanted:
        raise InputError("dicom-seg needs DICOM input: a NIfTI file carries no source instances for a SEG to "
                         "reference; ask for outputs=nifti or send the DICOM series")
    job = service.create_job(Submission(engine.bundle.name, kind, wanted, series_uid))
    inbox = service.store.job_dir(job.id) / "input"
    inbox.mkdir()
    try:
        for i, upload in enumerate(files):
            target = inbox / _safe_name(upload.filename, i)
            with open(target, "wb") as out:
                while chunk := await upload.read(CHUNK):
                    out.write(chunk)
        if kind == "nifti":
            await run_in_threadpool(_check_nifti_header, next(inbox.iterdir()), names[0])
        else:
            for path in [p for p in inbox.iterdir() if p.suffix.lower() == ".zip"]:
                unpacked = inbox / (path.stem + "_unzipped")
                unpacked.mkdir()
                await run_in_threadpool(extract_zip, path, unpacked, service.settings.max_upload_mb * 2**20 * 4)
                path.unlink()
            paths = [p for p in inbox.rglob("*") if p.is_file()]
            await run_in_threadpool(inspect_series, [(p.name, p) for p in paths], series_uid, {engine.bundle.modality})
    except BaseException:
        service.store.delete(job.id)
        raise
    service.enqueue(job)
    location = f"/v1/segmentations/{job.id}"
    if wait:
        done = await run_in_threadpool(service.wait, job.id, service.settings.sync_timeout_s)
        job = service.get(job.id)
        if done and job.state == JobState.FAILED and job.error_kind == "input":
            return JSONResponse({"detail": job.error, "job": job.to_public()}, status_code=422)
        if done and job.state.finished:
            code = 200 if job.state == JobState.SUCCEEDED else 500
            return JSONResponse(job.to_public(), status_code=code, headers={"Location": location})
    return JSONResponse(service.get(job.id).to_public(), status_code=202, headers={"Location": location})


@router.get("/{job_id}", summary="Job state, progress, timings and errors")
def status(job_id: str, service: ServiceDep) -> dict:
    return service.get(job_id).to_public()


@router.delete("/{job_id}", status_code=204, summary="Cancel a job and remove its files")
def delete(job_id: str, service: ServiceDep) -> Response:
    service.cancel(job_id)
    return Response(status_code=204)


@router.get("/{job_id}/{name}", summary="A result: labelmap.nii.gz, seg.dcm, preview.png or volumes.json")
def result(job_id: str, name: str, service: ServiceDep) -> FileResponse:
    path = service.result_path(job_id, name)
    return FileResponse(path, media_type=MEDIA[name], filename=name if name != "preview.png" else None)
