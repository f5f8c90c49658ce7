"""Datasets: MSD / nnU-Net ``dataset.json`` or plain ``imagesTr/`` + ``labelsTr/``; label remapping; caching.

Cases are preprocessed once with the shared contract (``models.preprocess``) and kept in memory as
channel-first arrays, then randomly cropped and augmented with MONAI transforms every step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inflation.config import ConfigError, DataConfig, LabelSpec
from models.labels import Label, label_for
from models.preprocess import Preprocessor

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class CasePaths:
    case_id: str
    image: Path
    label: Path
    split: str = "training"  # "validation" for dataset.json's own validation list


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # float32 [1, D, H, W], preprocessed
    label: np.ndarray  # uint8 [1, D, H, W], remapped to 0..K-1
    eval_mask: np.ndarray | None = None  # bool [D, H, W]: where validation Dice is computed
    split: str = "training"


def _strip(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover(dataset: str | Path) -> list[CasePaths]:
    root = Path(dataset)
    if root.is_file() and root.name.endswith(".json"):
        spec = json.loads(root.read_text())
        if "training" not in spec:
            raise ConfigError(f"{root}: dataset.json has no 'training' list")
        cases = []
        listed = [(item, "training") for item in spec["training"]]
        listed += [(item, "validation") for item in spec.get("validation", []) if isinstance(item, dict) and "label" in item]
        for item, split in listed:
            image, label = root.parent / item["image"], root.parent / item["label"]
            # nnU-Net v1 lists images without the _0000 channel suffix
            if not image.exists() and image.name.endswith(".nii.gz"):
                alt = image.with_name(image.name[:-7] + "_0000.nii.gz")
                image = alt if alt.exists() else image
            cases.append(CasePaths(_strip(label.name), image, label, split))
    elif root.is_dir() and (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        labels = {_strip(p.name): p for p in sorted((root / "labelsTr").iterdir()) if p.name.endswith(NIFTI_SUFFIXES)}
        cases = []
        for img in sorted((root / "imagesTr").iterdir()):
            if not img.name.endswith(NIFTI_SUFFIXES):
                continue
            cid = _strip(img.name)
            key = cid[:-5] if cid.endswith("_0000") else cid
            if key not in labels:
                raise ConfigError(f"{img}: no label file for case {key!r} in {root / 'labelsTr'}")
            cases.append(CasePaths(key, img, labels[key]))
    else:
        raise ConfigError(f"{root}: expected a dataset.json or a folder with imagesTr/ and labelsTr/")
    missing = [str(p) for c in cases for p in (c.image, c.label) if not p.exists()]
    if missing:
        raise ConfigError(f"dataset files missing: {missing[:5]}")
    if not cases:
        raise ConfigError(f"{root}: no cases found")
    return cases


def output_labels(specs: list[LabelSpec]) -> list[Label]:
    out = []
    for value, spec in enumerate(specs, start=1):
        overrides = {k: v for k, v in (("color", spec.color), ("type", spec.type), ("modifier", spec.modifier)) if v}
        out.append(label_for(value, spec.name, overrides))
    return out


def remap_table(specs: list[LabelSpec], max_source: int) -> np.ndarray:
    """Lookup table: dataset label value -> output class (0 for values not picked)."""
    table = np.zeros(max(max_source, max(v for s in specs for v in s.source)) + 1, dtype=np.uint8)
    for value, spec in enumerate(specs, start=1):
        for src in spec.source:
            if table[src]:
                raise ConfigError(f"label source value {src} is assigned to two classes")
            table[src] = value
    return table


def load_case(paths: CasePaths, pre: Preprocessor, specs: list[LabelSpec]) -> Case:
    image = sitk.ReadImage(str(paths.image))
    label = sitk.ReadImage(str(paths.label))
    if image.GetSize() != label.GetSize():
        raise ConfigError(f"case {paths.case_id}: image size {image.GetSize()} != label size {label.GetSize()}")
    prepared = pre.forward(image)
    lab = pre.forward_labels(label)
    if lab.shape != prepared.array.shape:
        raise ConfigError(f"case {paths.case_id}: label grid {lab.shape} differs from image grid {prepared.array.shape}")
    table = remap_table(specs, int(lab.max()))
    remapped = table[lab.astype(np.int64)]
    return Case(paths.case_id, prepared.array[None].astype(np.float32), remapped[None].astype(np.uint8),
                split=paths.split)


def split_cases(cases: list[Case], data: DataConfig, roi_depth: int) -> tuple[list[Case], list[Case]]:
    """Training and validation cases. ``holdout_slab`` cuts a depth range out of every case for validation."""
    if data.holdout_slab:
        lo_f, hi_f = data.holdout_slab
        if not 0 <= lo_f < hi_f <= 1:
            raise ConfigError(f"data.holdout_slab must be [lo, hi] with 0 <= lo < hi <= 1; got {data.holdout_slab}")
        train, val = [], []
        for case in cases:
            depth = case.image.shape[1]
            lo, hi = int(round(lo_f * depth)), int(round(hi_f * depth))
            for part, rng in (("below", slice(0, lo)), ("above", slice(hi, depth))):
                if rng.stop - rng.start > 0:
                    train.append(Case(f"{case.case_id}-{part}", case.image[:, rng], case.label[:, rng]))
            mask = np.zeros(case.image.shape[1:], dtype=bool)
            mask[lo:hi] = True
            val.append(Case(f"{case.case_id}-slab", case.image, case.label, mask))
        return train, val
    listed_val = [c for c in cases if c.split == "validation"]
    if listed_val and not data.val_cases:
        return [c for c in cases if c.split != "validation"], listed_val
    if data.val_cases:
        if data.val_cases >= len(cases):
            raise ConfigError(f"data.val_cases={data.val_cases} leaves no training case (have {len(cases)})")
        return cases[: -data.val_cases], cases[-data.val_cases:]
    return cases, []
