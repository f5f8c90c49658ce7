"""The model bundle: a directory with ``model.onnx``, ``model.ts`` and a self-describing ``ctseg.json``.

Written by ``ctseg export``, read (torch-free) by the service. The loader validates the manifest's fields and
every file's sha256, and fails with an error that names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.labels import Label
from models.precision import PrecisionRecords, parse_checks
from models.preprocess import PreprocessSpec

MANIFEST = "ctseg.json"
FORMAT = "ctseg-bundle/1"
REQUIRED = ("format", "name", "version", "created", "model", "preprocess", "labels", "files", "modality")


class BundleError(ValueError):
    """A bundle is missing, incomplete, or its files do not match their checksums."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk."""

    path: Path
    name: str
    version: str
    modality: str
    model: ModelConfig
    preprocess: PreprocessSpec
    labels: tuple[Label, ...]
    files: dict[str, str]
    manifest: dict[str, Any] = field(repr=False)
    precisions: PrecisionRecords = field(default_factory=dict)  # parity checks, by (engine, precision)
    # label value -> (lo, hi) mL: a plausible adult range (a label's optional ``reference_volume_ml`` in the
    # manifest); a volume outside it is flagged (server/imaging/quality.py), never changed
    reference_volumes: dict[int, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {label.value: label.name for label in self.labels}
        checked: dict[int, tuple[float, float]] = {}
        for value, pair in self.reference_volumes.items():
            name = known.get(value, f"label {value}")
            if value not in known:
                raise BundleError(f"reference_volume_ml is given for {name}, which the bundle does not have")
            try:
                lo, hi = (float(x) for x in pair)
            except (TypeError, ValueError):
                raise BundleError(f"reference_volume_ml of {name!r} must be two numbers [lo, hi] in mL; "
                                  f"got {pair!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
                raise BundleError(f"reference_volume_ml of {name!r} must be [lo, hi] mL with 0 <= lo < hi; "
                                  f"got {[lo, hi]}")
            checked[value] = (lo, hi)
        object.__setattr__(self, "reference_volumes", checked)

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def torchscript_path(self) -> Path:
        return self.path / "model.ts"

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def label_names(self) -> dict[int, str]:
        return {label.value: label.name for label in self.labels}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Fill in ``files`` (sha256 of every listed file) and write ``ctseg.json``: whole or not at all (a temporary
    file renamed over it), since ``ctseg check-precision`` rewrites the manifest of a bundle a service may read."""
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["files"] = {name: sha256_of(directory / name) for name in manifest.get("files", {})}
    path = directory / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_bundle(directory: str | Path, verify_checksums: bool = True) -> Bundle:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"{directory}: not a model bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: invalid JSON ({err})") from None
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path}: missing field(s) {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise BundleError(f"{path}: format {manifest['format']!r} is not {FORMAT!r}")
    files = manifest["files"]
    if "model.onnx" not in files:
        raise BundleError(f"{path}: 'files' must list model.onnx")
    for name, digest in files.items():
        file = directory / name
        if not file.is_file():
            raise BundleError(f"{directory}: {name} is listed in {MANIFEST} but missing")
        if verify_checksums and sha256_of(file) != digest:
            raise BundleError(f"{directory}: checksum mismatch for {name} (file changed or corrupt)")
    try:
        model = ModelConfig.from_dict(manifest["model"])
        preprocess = PreprocessSpec.from_dict(manifest["preprocess"])
        labels = tuple(Label.from_dict(item) for item in manifest["labels"])
        precisions = parse_checks(manifest.get("precisions"))
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{path}: invalid model/preprocess/labels/precisions section: {err}") from None
    values = [label.value for label in labels]
    if sorted(values) != list(range(1, model.num_classes)):
        raise BundleError(
            f"{path}: labels must be numbered 1..{model.num_classes - 1} to match the model's "
            f"{model.num_classes} outputs; got {sorted(values)}"
        )
    try:
        return Bundle(
            path=directory, name=str(manifest["name"]), version=str(manifest["version"]),
            modality=str(manifest["modality"]), model=model, preprocess=preprocess, labels=labels, files=dict(files),
            manifest=manifest, precisions=precisions, reference_volumes=_reference_volumes(path, manifest["labels"]),
        )
    except BundleError as err:
        raise BundleError(f"{path}: {err}") from None


def _reference_volumes(path: Path, items: list[Any]) -> dict[int, tuple[float, float]]:
    """Each label's optional ``reference_volume_ml: [lo, hi]`` (checked by :class:`Bundle`); a manifest without
    any loads as before."""
    ranges: dict[int, tuple[float, float]] = {}
    for item in items:
        if "reference_volume_ml" in item:
            pair = item["reference_volume_ml"]
            if not isinstance(pair, list) or len(pair) != 2:
                raise BundleError(f"{path}: reference_volume_ml of {item.get('name')!r} must be a list [lo, hi] "
                                  f"in mL; got {pair!r}")
            ranges[int(item["value"])] = tuple(pair)  # type: ignore[assignment]
    return ranges
