"""Response and request bodies of the API: what the OpenAPI schema promises is what comes back."""

from __future__ import annotations

from pydantic import BaseModel, Field

from server.core.vocabulary import (
    DeliveryState,
    DestinationChoice,
    ErrorKind,
    InputKind,
    OriginKind,
    Output,
    QualityFlag,
    ResultFile,
)
from server.imaging.quality import StoredFlags
from server.jobs.model import Delivery, Job, JobState


class ErrorOut(BaseModel):
    detail: str = Field(description="what is wrong, in one sentence")


class OriginOut(BaseModel):
    kind: OriginKind
    calling_ae_title: str | None = Field(None, description="C-STORE: the sender's AE title")
    source: str | None = Field(None, description="pull: the configured source")


class InputOut(BaseModel):
    kind: InputKind | None = Field(None, description="known once the input is staged")
    origin: OriginOut | None = None
    series_uid: str | None = Field(None, description="DICOM: the series chosen at staging")
    description: str | None = Field(None, description="what was chosen, e.g. 'CT series of 300 slices'")
    files: int = Field(0, description="files of the chosen input")
    phase: str | None = Field(None, description="the acquisition (phase) asked for: first, last or its number")


class ProgressOut(BaseModel):
    windows_done: int
    windows_total: int


class DeliveryOut(BaseModel):
    destination: str
    object: ResultFile = Field(ResultFile.SEG, description="the result file sent (seg.dcm, rtstruct.dcm, sr.dcm, "
                               "sc.dcm): a destination receives the objects it is configured for")
    state: DeliveryState
    attempts: int
    last_error: str | None = None
    warning: str | None = Field(None, description="the destination stored the SEG with this warning")
    next_attempt: float | None = Field(None, description="pending: when the next try is due (Unix time)")
    delivered_at: float | None = Field(None, description="delivered: when the destination acknowledged (Unix time)")


class QualityOut(BaseModel):
    flags: list[QualityFlag] = Field(description="each flag once, whether the whole scan or a label raised it")
    job: list[QualityFlag] = Field(description="flags of the whole scan (HU implausible, no structure found)")
    labels: dict[str, list[QualityFlag]] = Field(description="label name -> its flags (only labels with one)")


class JobOut(BaseModel):
    id: str
    state: JobState
    model: str
    input: InputOut
    outputs_requested: list[Output]
    destinations: list[str] = Field(description="where the job's SEG goes")
    destination_choice: DestinationChoice = Field(description="why: named in the request, back to the sender, or "
                                                  "the default destinations")
    created: float
    updated: float
    progress: ProgressOut
    timings: dict[str, float] = Field(description="seconds per stage")
    error: str | None = None
    error_kind: ErrorKind | None = None
    notes: list[str]
    results: dict[str, str] = Field(description="result name -> URL")
    quality: QualityOut | None = Field(None, description="succeeded: signs the result may be wrong (from its "
                                       "volumes.json); None before, or for a job of a version without flags")
    deliveries: list[DeliveryOut]
    viewer_url: str | None = Field(None, description="the study in the configured viewer (CTSEG_VIEWER_URL), for a "
                                   "job with DICOM input")
    review: bool = Field(False, description="its deliveries wait (state held) until a person releases or discards "
                         "them: POST /v1/segmentations/{id}/release or /discard")
    attempt: int = Field(0, description="runs of this job so far (a run whose worker stopped is repeated)")
    supersedes: str | None = Field(None, description="the job on an earlier part of the same received series that "
                                   "this one replaces")
    superseded_by: str | None = Field(None, description="the job that replaces this one (more instances arrived)")


class JobListOut(BaseModel):
    jobs: list[JobOut]
    next_before: float | None = Field(None, description="pass as ?before= for the next (older) page")


class InputErrorOut(BaseModel):
    detail: str
    job: JobOut | None = None


class PullRequest(BaseModel):
    """Retrieve a series from a configured source (``CTSEG_SOURCES``) and segment it."""

    source: str = Field(description="a configured source's name")
    study_uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9.]+$")
    series_uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9.]+$")


def job_out(job: Job, deliveries: list[Delivery], quality: StoredFlags | None = None,
            viewer_url: str | None = None) -> JobOut:
    staged, origin = job.staged, job.origin
    return JobOut(
        id=job.id, state=job.state, model=job.model,
        input=InputOut(
            kind=job.input_kind, series_uid=staged.series_uid if staged else job.spec.series_uid,
            origin=OriginOut(kind=origin.kind, calling_ae_title=origin.calling_ae_title, source=origin.source),
            description=staged.display_name if staged else None, files=len(staged.files) if staged else 0,
            phase=str(job.spec.phase) if job.spec.phase is not None else None,
        ),
        outputs_requested=list(job.spec.outputs), destinations=list(job.spec.destinations),
        destination_choice=job.spec.destination_choice, created=job.created, updated=job.updated,
        progress=ProgressOut(windows_done=job.progress_done, windows_total=job.progress_total),
        timings=job.timings, error=job.error, error_kind=job.error_kind, notes=job.notes,
        results={r.value: f"/v1/segmentations/{job.id}/{r.value}" for r in job.results},
        quality=QualityOut(flags=quality.all_flags(), job=list(quality.job),
                           labels={k: list(v) for k, v in quality.labels.items()}) if quality is not None else None,
        deliveries=[DeliveryOut(destination=d.destination, object=d.object, state=d.state, attempts=d.attempts, last_error=d.last_error,
                                warning=d.warning,
                                next_attempt=d.next_attempt if d.state == DeliveryState.PENDING else None,
                                delivered_at=d.delivered_at) for d in deliveries],
        review=job.spec.review, attempt=job.attempt, supersedes=job.supersedes, superseded_by=job.superseded_by,
        viewer_url=viewer_url,
    )


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str = Field(description="'ready', 'starting', or 'no worker: <reason>'")
    models: dict[str, bool]


class CodeOut(BaseModel):
    value: str
    meaning: str


class LabelOut(BaseModel):
    value: int
    name: str
    color: list[int] = Field(description="sRGB, 0-255")
    snomed: CodeOut | None = None


class ModelOut(BaseModel):
    name: str
    version: str
    default: bool
    modality: str
    description: str
    device: str = Field(description="cpu or cuda")
    engine: str = Field(description="inference backend: onnxruntime, openvino, cuda or tensorrt")
    precision: str = Field(description="fp32, bf16 or fp16")
    precision_reason: str = Field(description="why this precision (parity check figures, or why not lower)")
    roi: list[int] = Field(description="(D, H, W) voxels")
    spacing: list[float] = Field(description="(D, H, W) mm")
    orientation: str
    intensity_window: list[float]
    mode: str = Field(description="3d or 2.5d")
    labels: list[LabelOut]
    metrics: dict | None = None


class ModelsOut(BaseModel):
    models: list[ModelOut]
