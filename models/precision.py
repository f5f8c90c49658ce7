"""Numeric precision of inference, and the parity check that lets a lower precision serve a bundle.

``ctseg export`` runs the network at each lower precision it can run here on windows of a real CT and records, in
the manifest's ``precisions`` section, how the argmax compares with fp32. The service's ``CTSEG_PRECISION=auto``
lowers precision only where that record says the check passed: a lower precision is a model change, and a bundle
is trusted for what was measured on it, not for what usually holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

MIN_AGREEMENT = 0.995  # argmax agreement with fp32 over the check's windows
MIN_CLASS_DICE = 0.99  # Dice with fp32, per class present in the check's windows
MIN_CLASS_VOXELS = 200  # classes with fewer voxels in the check are reported, not judged (Dice is noise there)


class Precision(str, Enum):
    """``auto``: the lowest precision the bundle's parity check passed on this hardware, else fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


@dataclass(frozen=True)
class PrecisionCheck:
    """One lower precision compared with fp32 on real CT windows at export."""

    precision: Precision
    runtime: str  # what ran it, e.g. "openvino cpu bf16", "torch cpu float16"
    windows: int
    argmax_agreement: float
    per_class_dice: dict[str, float]  # label name -> Dice against fp32 (classes with enough voxels)
    data: str  # what the windows were cut from (no file names, no PHI)
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.precision in (Precision.AUTO, Precision.FP32):
            raise ValueError(f"a precision check compares a lower precision with fp32; got {self.precision.value}")
        if not 0 <= self.argmax_agreement <= 1:
            raise ValueError(f"argmax_agreement must be in [0, 1]; got {self.argmax_agreement}")
        ok = self.argmax_agreement >= MIN_AGREEMENT and all(d >= MIN_CLASS_DICE for d in self.per_class_dice.values())
        object.__setattr__(self, "passed", ok)

    @property
    def min_class_dice(self) -> float | None:
        return min(self.per_class_dice.values()) if self.per_class_dice else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precision"] = self.precision.value
        d["rule"] = f"argmax agreement >= {MIN_AGREEMENT}, Dice >= {MIN_CLASS_DICE} per class with >= {MIN_CLASS_VOXELS} voxels"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrecisionCheck":
        return cls(precision=Precision(data["precision"]), runtime=str(data["runtime"]), windows=int(data["windows"]),
                   argmax_agreement=float(data["argmax_agreement"]),
                   per_class_dice={str(k): float(v) for k, v in data["per_class_dice"].items()},
                   data=str(data.get("data", "")))


def parse_checks(section: Any) -> dict[Precision, PrecisionCheck]:
    """The manifest's ``precisions`` section (absent in older bundles: no lower precision is trusted)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"'precisions' must be a mapping of precision -> check; got {type(section).__name__}")
    checks = {}
    for key, value in section.items():
        check = PrecisionCheck.from_dict({**value, "precision": key})
        checks[check.precision] = check
    return checks
