"""Segmentation jobs: submit a CT (upload or pull by UID), list and follow jobs, fetch the results."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError

from server.api.deps import AuthDep, ServiceDep
from server.api.limits import read_json_body
from server.api.multipart import receive_files
from server.api.schemas import (
    ErrorOut,
    InputErrorOut,
    JobListOut,
    JobOut,
    PullRequest,
    job_out,
)
from server.core.errors import (
    STORAGE_FULL,
    InputError,
    InsufficientStorage,
    NotFound,
    storage_full,
)
from server.core.options import PhaseChoice
from server.core.vocabulary import (
    OUTPUT_NAMES,
    ErrorKind,
    OriginKind,
    ResultFile,
    parse_outputs,
)
from server.imaging.quality import StoredFlags, read_flags
from server.jobs.model import Job, JobRequest, JobState, Origin
from server.service import NothingHeld, SegmentationService

router = APIRouter(prefix="/v1/segmentations", tags=["segmentations"], dependencies=[AuthDep],
                   responses={422: {"model": ErrorOut, "description": "a parameter is not valid"}})

SUBMIT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                                     "description": "one .nii/.nii.gz, or DICOM files, or .zip archive(s)"}}}},
        "application/json": {"schema": PullRequest.model_json_schema()},
    },
}


def _parse_destinations(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    return () if names == ("none",) else names


def _parse_phase(value: str | None) -> PhaseChoice | None:
    try:
        return PhaseChoice(value) if value is not None else None
    except ValueError as err:
        raise InputError(str(err)) from None


def _public(service: SegmentationService, job: Job) -> JobOut:
    return job_out(job, service.deliveries(job.id), _quality(service, job), service.viewer_link(job))


def _quality(service: SegmentationService, job: Job) -> StoredFlags | None:
    """The flags a succeeded job's volumes.json holds (the job store keeps no copy of them)."""
    if job.state != JobState.SUCCEEDED or ResultFile.VOLUMES not in job.results:
        return None
    try:
        path, _ = service.result_path(job.id, ResultFile.VOLUMES.value)
    except NotFound:  # removed in between
        return None
    return read_flags(path)


async def _receive_upload(service: SegmentationService, request: JobRequest, http: Request) -> Job:
    """A ``staging`` job once the first file part begins (so a crash while the body streams in leaves a record that
    recovery fails with the reason, and a request that sends nothing holds no queue slot), then the parts streamed
    into its input folder, then staging. A body cut off (too slow, too large, malformed) removes the job."""
    opened: list[Job] = []

    def open_inbox() -> Path:  # called in a worker thread (the parser's): the store never runs on the event loop
        opened.append(service.open_job(request))
        return service.input_dir(opened[0].id)

    try:
        await receive_files(http, open_inbox, service.settings.zip_max_members)  # at least one file, or InputError
        return await run_in_threadpool(service.stage_and_enqueue, opened[0])
    except BaseException as err:
        if opened:
            await run_in_threadpool(service.discard, opened[0].id)
        if storage_full(err):
            raise InsufficientStorage(STORAGE_FULL) from None
        raise


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Segment a CT: upload it (NIfTI, DICOM files, zip) or pull a series by UID from a configured source",
    openapi_extra={"requestBody": SUBMIT_BODY},
    responses={
        200: {"model": JobOut, "description": "finished (wait=true)"},
        202: {"model": JobOut, "description": "accepted; follow the Location header"},
        404: {"model": ErrorOut, "description": "unknown model or source, or the series is not on the source"},
        408: {"model": ErrorOut, "description": "the request body stalled or arrived too slowly (cut off)"},
        413: {"model": ErrorOut, "description": "upload over the size limit, or a JSON body over its limit"},
        422: {"model": InputErrorOut, "description": "unreadable input, several candidate series, NIfTI with "
                                                      "a DICOM output, unknown output or destination, ..."},
        500: {"model": JobOut, "description": "the job failed inside the service (wait=true)"},
        502: {"model": ErrorOut, "description": "the source cannot be reached or failed"},
        507: {"model": ErrorOut, "description": "the service's storage is full"},
        503: {"model": ErrorOut, "description": "queue full or no worker; retry after Retry-After"},
    },
)
async def submit(
    request: Request,
    service: ServiceDep,
    model: Annotated[str | None, Query(description="bundle name; default: the service's default model")] = None,
    outputs: Annotated[str, Query(description=f"comma separated: {OUTPUT_NAMES} (both = nifti,dicom-seg); the "
                                              "DICOM outputs need DICOM input", examples=["both", "dicom-seg,sr,sc"])
                       ] = "nifti",
    series_uid: Annotated[str | None, Query(description="SeriesInstanceUID to segment when several are sent")] = None,
    destinations: Annotated[str | None, Query(description="destination names for the SEG, comma separated, or "
                                                          "'none'; default: CTSEG_DEFAULT_DESTINATIONS")] = None,
    wait: Annotated[bool, Query(description="answer when done (up to the sync timeout) instead of 202")] = False,
    phase: Annotated[str | None, Query(description="a series holding several acquisitions (phases): 'first', "
                                                   "'last' or the number the 422 listing them gives")] = None,
    review: Annotated[bool, Query(description="hold the deliveries until a person releases (POST .../release) or "
                                              "discards (POST .../discard) them")] = False,
) -> Response:
    job_request = JobRequest(model, parse_outputs(outputs), series_uid, Origin(OriginKind.UPLOAD),
                             _parse_destinations(destinations), _parse_phase(phase), review)
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        try:
            body = await read_json_body(request, service.settings.max_json_kb * 1024)
            pull = PullRequest.model_validate_json(body)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
            raise InputError(f"pull request body: {problems}") from None
        job_request = replace(job_request, series_uid=pull.series_uid, origin=Origin(OriginKind.PULL, source=pull.source))
        job = await run_in_threadpool(service.pull, job_request, pull.source, pull.study_uid, pull.series_uid)
    else:
        job = await _receive_upload(service, job_request, request)
    return await run_in_threadpool(_answer, service, job.id, wait)


def _answer(service: SegmentationService, job_id: str, wait: bool) -> JSONResponse:
    """202 with the job; with ``wait``, the finished job (200, 500, or 422 for a refused input) if it finishes in
    time."""
    location = f"/v1/segmentations/{job_id}"
    done = service.wait(job_id, service.settings.sync_timeout_s) if wait else False
    job = service.get(job_id)
    if done and job.state == JobState.FAILED and job.error_kind == ErrorKind.INPUT:
        body = InputErrorOut(detail=job.error or "input refused", job=_public(service, job))
        return JSONResponse(body.model_dump(mode="json"), status_code=422)
    code = (200 if job.state == JobState.SUCCEEDED else 500) if done and job.state.finished else 202
    return JSONResponse(_public(service, job).model_dump(mode="json"), status_code=code, headers={"Location": location})


@router.get("", response_model=JobListOut, summary="Jobs, newest first (whatever brought their input)")
def list_jobs(
    service: ServiceDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[float | None, Query(description="only jobs created before this Unix time (paging)")] = None,
) -> JobListOut:
    jobs = service.list_jobs(limit, state, before)
    return JobListOut(jobs=[_public(service, j) for j in jobs],
                      next_before=jobs[-1].created if len(jobs) == limit else None)


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}},
            summary="Job state, input, progress, timings, errors and deliveries")
def status(job_id: str, service: ServiceDep) -> JobOut:
    return _public(service, service.get(job_id))


@router.delete("/{job_id}", status_code=204, responses={404: {"model": ErrorOut}},
               summary="Cancel a job and remove its files (and its pending deliveries)")
def delete(job_id: str, service: ServiceDep) -> Response:
    service.cancel(job_id)
    return Response(status_code=204)


_REVIEW = {404: {"model": ErrorOut, "description": "no such job"},
           409: {"model": ErrorOut, "description": "the job has no delivery held for review (still running, not "
                                                   "under review, or released or discarded already)"}}


@router.post("/{job_id}/release", response_model=JobOut, responses=_REVIEW,
             summary="Review passed: send the job's held deliveries now")
def release(job_id: str, service: ServiceDep) -> JobOut:
    try:
        return _public(service, service.release_held(job_id))
    except NothingHeld as err:
        raise HTTPException(err.status_code, str(err)) from None


@router.post("/{job_id}/discard", response_model=JobOut, responses=_REVIEW,
             summary="Review refused: the job's held deliveries are never sent")
def discard(job_id: str, service: ServiceDep) -> JobOut:
    try:
        return _public(service, service.discard_held(job_id))
    except NothingHeld as err:
        raise HTTPException(err.status_code, str(err)) from None


@router.get("/{job_id}/{name}", response_class=FileResponse, responses={404: {"model": ErrorOut}},
            summary="A result: " + ", ".join(r.value for r in ResultFile))
def result(job_id: str, name: str, service: ServiceDep) -> FileResponse:
    path, kind = service.result_path(job_id, name)
    return FileResponse(path, media_type=kind.media_type, filename=kind.value if kind.download else None)
