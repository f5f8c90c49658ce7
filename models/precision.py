"""Numeric precision of inference, and the parity checks that let a lower precision serve a bundle.

``ctseg export --parity-ct`` and ``ctseg check-precision`` run a real CT through each engine present on the machine
at each precision that engine can run there, compare the argmax with ONNX Runtime fp32 on the CPU (the reference),
and record the figures in the manifest's ``precisions`` section, keyed by engine and precision, with the runtime
that ran them. The service's ``CTSEG_PRECISION=auto`` lowers precision only where the record of that exact
(engine, precision) pair passed: a lower precision is a model change, each runtime rounds and fuses differently
(ONNX Runtime's fp16 graph on a CPU says nothing about TensorRT fp16 or OpenVINO f16), and a bundle is trusted for
what was measured on it, not for what usually holds.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.995  # argmax agreement with fp32 over the check's windows
MIN_CLASS_DICE = 0.99  # Dice with fp32, per class present in the check's windows
MIN_CLASS_VOXELS = 200  # classes with fewer voxels in the check are reported, not judged (Dice is noise there)


class Precision(str, Enum):
    """``auto``: the lowest precision the bundle's parity check passed for the engine, else fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class EngineKind(str, Enum):
    """``auto``: CUDA where onnxruntime-gpu sees a GPU, else OpenVINO where installed, else ONNX Runtime on CPU.

    Declared here, not in models/backends.py, because the parity records are keyed by it (backends re-exports it).
    """

    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"  # CPU
    OPENVINO = "openvino"  # CPU
    CUDA = "cuda"  # ONNX Runtime, CUDA execution provider
    TENSORRT = "tensorrt"  # ONNX Runtime, TensorRT execution provider (CUDA for what TensorRT does not take)
    TORCHSCRIPT = "torchscript"  # the bundle's model.ts through PyTorch, on a GPU where torch sees one (needs torch)


# what every other (engine, precision) is compared with: it needs no check of its own
REFERENCE = (EngineKind.ONNXRUNTIME, Precision.FP32)


@dataclass(frozen=True)
class PrecisionCheck:
    """One (engine, precision) compared with the reference (ONNX Runtime fp32 on the CPU) on a real CT."""

    engine: EngineKind
    precision: Precision
    runtime: str  # what ran it, with its version, e.g. "openvino 2024.4.0 CPU bf16"
    windows: int
    argmax_agreement: float
    per_class_dice: dict[str, float]  # label name -> Dice against fp32 (classes with enough voxels)
    data: str  # what the windows were cut from (no file names, no PHI)
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", EngineKind(self.engine))
        object.__setattr__(self, "precision", Precision(self.precision))
        if self.engine == EngineKind.AUTO or self.precision == Precision.AUTO:
            raise ValueError("a precision check is of one named engine and precision; got auto")
        if self.key == REFERENCE:
            raise ValueError("onnxruntime fp32 is the reference of every check; it is not checked against itself")
        if not 0 <= self.argmax_agreement <= 1:
            raise ValueError(f"argmax_agreement must be in [0, 1]; got {self.argmax_agreement}")
        ok = self.argmax_agreement >= MIN_AGREEMENT and all(d >= MIN_CLASS_DICE for d in self.per_class_dice.values())
        object.__setattr__(self, "passed", ok)

    @property
    def key(self) -> tuple[EngineKind, Precision]:
        return self.engine, self.precision

    @property
    def min_class_dice(self) -> float | None:
        return min(self.per_class_dice.values()) if self.per_class_dice else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["engine"], d["precision"] = self.engine.value, self.precision.value
        d["rule"] = f"argmax agreement >= {MIN_AGREEMENT}, Dice >= {MIN_CLASS_DICE} per class with >= {MIN_CLASS_VOXELS} voxels"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionCheck:
        """``passed`` is recomputed from the figures: a record cannot claim a pass its numbers do not show."""
        return cls(engine=EngineKind(data["engine"]), precision=Precision(data["precision"]),
                   runtime=str(data["runtime"]), windows=int(data["windows"]),
                   argmax_agreement=float(data["argmax_agreement"]),
                   per_class_dice={str(k): float(v) for k, v in data["per_class_dice"].items()},
                   data=str(data.get("data", "")))


PrecisionRecords = dict[tuple[EngineKind, Precision], PrecisionCheck]


def engine_of_runtime(runtime: str) -> EngineKind | None:
    """The engine an old record's ``runtime`` string names ("openvino cpu bf16", "onnxruntime cuda, the fp16
    graph of the CUDA engine"); None for one that names no serving engine (e.g. "torch cpu float16")."""
    words = runtime.lower().replace(",", " ").split()
    if words[:1] == ["openvino"]:
        return EngineKind.OPENVINO
    if words[:1] == ["onnxruntime"] and len(words) > 1:
        return {"tensorrt": EngineKind.TENSORRT, "cuda": EngineKind.CUDA, "cpu": EngineKind.ONNXRUNTIME}.get(words[1])
    return None


def parse_checks(section: Any) -> PrecisionRecords:
    """The manifest's ``precisions`` section: ``{engine: {precision: check}}``. Absent (older bundles): no lower
    precision is trusted.

    The first format, ``{precision: check}`` with a ``runtime`` string, still loads: each record is keyed by the
    engine its runtime string names, so it vouches for exactly what ran it, as the new records do (an fp16 record
    of "onnxruntime cpu" then enables nothing: that engine serves fp32 only). A record whose runtime names no
    serving engine is dropped, with a warning: trusting it for any engine would be the guess this keying forbids.
    """
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise TypeError(f"'precisions' must be a mapping of engine -> precision -> check; got {type(section).__name__}")
    engines, precisions = {e.value for e in EngineKind}, {p.value for p in Precision}
    if section and set(section) <= precisions:
        return _parse_first_format(section)
    records: PrecisionRecords = {}
    for engine, by_precision in section.items():
        if engine not in engines:
            raise ValueError(f"'precisions' key {engine!r} is not an engine ({', '.join(sorted(engines))})")
        if not isinstance(by_precision, dict):
            raise TypeError(f"'precisions.{engine}' must be a mapping of precision -> check")
        for precision, value in by_precision.items():
            if not isinstance(value, dict):
                raise TypeError(f"'precisions.{engine}.{precision}' must be a mapping (a check)")
            check = PrecisionCheck.from_dict({**value, "engine": engine, "precision": precision})
            records[check.key] = check
    return records


def _parse_first_format(section: dict[str, Any]) -> PrecisionRecords:
    records: PrecisionRecords = {}
    for precision, value in section.items():
        if not isinstance(value, dict):
            raise TypeError(f"'precisions.{precision}' must be a mapping (a check)")
        engine = engine_of_runtime(str(value.get("runtime", "")))
        if engine is None:
            log.warning("precision record %s (runtime %r) names no engine that serves it; not trusted", precision,
                        value.get("runtime"))
            continue
        check = PrecisionCheck.from_dict({**value, "engine": engine.value, "precision": precision})
        records[check.key] = check
    return records


def checks_section(records: PrecisionRecords) -> dict[str, dict[str, Any]]:
    """The manifest's ``precisions`` section for ``records`` (always the current format)."""
    section: dict[str, dict[str, Any]] = {}
    for (engine, precision), check in sorted(records.items(), key=lambda kv: (kv[0][0].value, kv[0][1].value)):
        section.setdefault(engine.value, {})[precision.value] = check.to_dict()
    return section
