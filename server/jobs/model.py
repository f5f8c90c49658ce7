"""What a job is: its request, its record, where its input came from, its claim by a worker, its deliveries.

Typed once here and stored field by field (server/jobs/sql_store.py), so no layer passes a dict of parameters
with hidden flags. The one decision every way in shares, what a job's input lets it produce and where its SEG may
go, is :func:`settle_outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from server.core.errors import InputError
from server.core.options import PhaseChoice
from server.core.vocabulary import (
    DeliveryState,
    DestinationChoice,
    ErrorKind,
    InputKind,
    OriginKind,
    Output,
    ResultFile,
)


class JobState(str, Enum):
    """``staging`` (input arriving) -> ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``;
    ``superseded``: a later job on more instances of the same received series replaced it before it finished."""

    STAGING = "staging"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"

    @property
    def finished(self) -> bool:
        return self not in ACTIVE_STATES


ACTIVE_STATES = (JobState.STAGING, JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class Origin:
    """How the input arrived. No patient data and no file names: this is shown on the job and logged."""

    kind: OriginKind
    calling_ae_title: str | None = None  # DIMSE: the sender's AE title
    source: str | None = None  # pull: the configured source's name

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OriginKind(self.kind))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "calling_ae_title": self.calling_ae_title, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Origin:
        return cls(OriginKind(data["kind"]), data.get("calling_ae_title"), data.get("source"))


@dataclass(frozen=True)
class StagedInput:
    """A job's input on disk, checked: ``files`` are relative to the job's input folder, in reading order."""

    kind: InputKind
    files: tuple[str, ...]
    series_uid: str | None  # DICOM: the chosen series (generated for anonymised input)
    display_name: str  # what messages call the input: never a file name
    origin: Origin
    notes: tuple[str, ...] = field(default=())  # what staging skipped or repaired
    study_uid: str | None = None  # DICOM: the chosen series' study (the viewer opens it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", InputKind(self.kind))
        object.__setattr__(self, "files", tuple(self.files))
        if not self.files:
            raise ValueError("a staged input needs at least one file")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "files": list(self.files), "series_uid": self.series_uid,
                "display_name": self.display_name, "origin": self.origin.to_dict(), "notes": list(self.notes),
                "study_uid": self.study_uid}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagedInput:
        return cls(InputKind(data["kind"]), tuple(data["files"]), data.get("series_uid"), data["display_name"],
                   Origin.from_dict(data["origin"]), tuple(data.get("notes", ())), data.get("study_uid"))


@dataclass(frozen=True)
class JobRequest:
    """What a caller asks, before the service resolved the model and destinations."""

    model: str | None
    outputs: tuple[Output, ...]
    series_uid: str | None
    origin: Origin
    destinations: tuple[str, ...] | None = None  # None: the default rule (sender, else the default destinations)
    phase: PhaseChoice | None = None  # which acquisition of a multi-phase series (None: refused if it has several)
    review: bool = False  # its deliveries are held until a person releases them


@dataclass(frozen=True)
class JobSpec:
    """A request resolved: the record's fixed fields."""

    model: str
    outputs: tuple[Output, ...]
    series_uid: str | None
    destinations: tuple[str, ...]
    destination_choice: DestinationChoice
    origin: Origin
    phase: PhaseChoice | None = None  # stored in the record's ``params`` JSON (server/jobs/sql_store.py)
    review: bool = False  # deliveries held for a person's release; in ``params`` too

    def __post_init__(self) -> None:
        if self.phase is not None and not isinstance(self.phase, PhaseChoice):
            object.__setattr__(self, "phase", PhaseChoice(str(self.phase)))
        object.__setattr__(self, "outputs", tuple(Output(o) for o in self.outputs))
        object.__setattr__(self, "destinations", tuple(self.destinations))
        object.__setattr__(self, "destination_choice", DestinationChoice(self.destination_choice))
        if not self.outputs:
            raise ValueError("a job needs at least one output")


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one run of a job. Every write it makes carries ``attempt``: once the job was given to
    another run (its lease expired) or removed, the write changes nothing and the worker stops."""

    job_id: str
    attempt: int
    owner: str


@dataclass(frozen=True)
class JobResult:
    results: tuple[ResultFile, ...]
    timings: dict[str, float]
    notes: tuple[str, ...]


@dataclass
class Job:
    id: str
    state: JobState
    spec: JobSpec
    created: float
    updated: float
    input_kind: InputKind | None = None  # known once staged
    staged: StagedInput | None = None
    progress_done: int = 0
    progress_total: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_kind: ErrorKind | None = None
    notes: list[str] = field(default_factory=list)
    results: tuple[ResultFile, ...] = ()
    attempt: int = 0  # runs claimed so far; the results of a succeeded job are its last run's
    lease_until: float | None = None
    superseded_by: str | None = None
    supersedes: str | None = None
    seg_seed: str = ""  # what the SEG's UIDs derive from: the job's id, or the job whose delivered SEG it replaces

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def origin(self) -> Origin:
        return self.spec.origin


@dataclass(frozen=True)
class Delivery:
    """One object (the SEG, an RTSTRUCT, an SR, a key image) to one destination."""

    id: int
    job_id: str
    destination: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    warning: str | None  # a destination stored it with a warning (DIMSE warning status, STOW-RS WarningReason)
    created: float
    next_attempt: float
    delivered_at: float | None
    claim: str | None = None  # the token of the sender holding it now
    object: ResultFile = ResultFile.SEG  # the result file it sends


def settle_outputs(kind: InputKind, spec: JobSpec, strict: bool = True,
                   sent: tuple[Output, ...] = (Output.DICOM_SEG,)
                   ) -> tuple[tuple[Output, ...], tuple[str, ...], list[str]]:
    """What a job with this input produces and where its SEG goes; the only place that decides it.

    A DICOM output (SEG, RTSTRUCT, SR, key image) references its source instances, study and patient, so it needs
    DICOM input. NIfTI input asking for one, or naming destinations, is refused (the caller asked for something
    that cannot be made); with ``strict`` off (``ctseg predict`` over a mix of inputs) those outputs are left out
    with a note. NIfTI input whose destinations came from a default rule simply sends nothing, with a note. A
    destination is a request for the objects it receives (``sent``: those of the job's destinations together).
    """
    outputs, destinations, notes = list(spec.outputs), list(spec.destinations), []
    if kind == InputKind.NIFTI:
        dicom_only = [o for o in outputs if o.needs_dicom]
        if dicom_only and strict:
            names = ", ".join(o.value for o in dicom_only)
            raise InputError(f"{names} need{'s' if len(dicom_only) == 1 else ''} DICOM input: a NIfTI file carries "
                             "no source instances, study or patient for a DICOM object to reference; ask for "
                             "outputs=nifti or send the DICOM series")
        if dicom_only:
            outputs = [o for o in outputs if not o.needs_dicom]
            notes.append(f"no {', '.join(o.title for o in dicom_only)}: the input was NIfTI, which has no source "
                         "instances to reference")
        if destinations and spec.destination_choice == DestinationChoice.NAMED:
            raise InputError("destinations receive a DICOM-SEG, which needs DICOM input: a NIfTI file carries no "
                             "source instances to reference")
        if destinations:
            notes.append("no SEG is sent to the default destinations: the input is NIfTI, which has no source "
                         "instances for a SEG to reference")
        destinations = []
    if destinations:
        outputs += [o for o in sent if o not in outputs]
    return tuple(outputs), tuple(destinations), notes
