"""Where a job's input came from and what was chosen from it: decided once, at staging, and stored on the job.

The REST upload, the DICOM listener and pull-by-UID all end in a :class:`StagedInput`: the worker reads exactly
the files it lists, as the kind it names, with the series it names, and decides none of it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.vocabulary import InputKind, OriginKind


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
    def from_dict(cls, data: dict[str, Any]) -> "Origin":
        return cls(OriginKind(data["kind"]), data.get("calling_ae_title"), data.get("source"))

    def describe(self) -> str:
        if self.kind == OriginKind.DIMSE:
            return f"C-STORE from {self.calling_ae_title}"
        if self.kind == OriginKind.PULL:
            return f"pulled from {self.source}"
        return "upload"


@dataclass(frozen=True)
class StagedInput:
    """A job's input on disk, checked: ``files`` are relative to the job's input folder, in reading order."""

    kind: InputKind
    files: tuple[str, ...]
    series_uid: str | None  # DICOM: the chosen series (generated for anonymised input)
    display_name: str  # what messages call the input: never a file name
    origin: Origin
    notes: tuple[str, ...] = field(default=())  # what staging skipped or repaired

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", InputKind(self.kind))
        if not self.files:
            raise ValueError("a staged input needs at least one file")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "files": list(self.files), "series_uid": self.series_uid,
                "display_name": self.display_name, "origin": self.origin.to_dict(), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StagedInput":
        return cls(InputKind(data["kind"]), tuple(data["files"]), data.get("series_uid"), data["display_name"],
                   Origin.from_dict(data["origin"]), tuple(data.get("notes", ())))
