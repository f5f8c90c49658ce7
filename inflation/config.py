"""Training configuration (YAML) as typed dataclasses; unknown keys are errors, not silently ignored."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """The training config is invalid; the message names the field."""


@dataclass
class LabelSpec:
    name: str
    source: list[int]  # label values in the dataset that make up this class
    color: list[int] | None = None
    type: dict[str, str] | None = None  # {value, scheme, meaning} to override the built-in SNOMED table
    modifier: dict[str, str] | None = None


@dataclass
class DataConfig:
    dataset: str  # dataset.json (MSD / nnU-Net layout) or a folder with imagesTr/ and labelsTr/
    labels: list[LabelSpec]
    val_cases: int = 0  # the last N cases are held out for validation
    holdout_slab: list[float] | None = None  # [lo, hi] fraction of depth held out (one-patient data)
    description: str = ""


@dataclass
class ModelSection:
    name: str = "vit3d_tiny_patch16"  # registered variant
    overrides: dict[str, Any] = field(default_factory=dict)
    # scratch | inflate | swin-ssl | vdt | checkpoint (inflation/init.py); unset: inflate when init_checkpoint or
    # backbone is given, else scratch
    init: str | None = None
    init_checkpoint: str | None = None  # `ctseg inflate` output (inflate) or any ctseg checkpoint (checkpoint)
    backbone: str | None = None  # or inflate on the fly from timm's hub / a local file
    weights: str | None = None  # a local 2D file (inflate), Swin SSL weights (swin-ssl), pretrain-vdt output (vdt)
    rule: str = "center"


@dataclass
class PreprocessSection:
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5])
    roi: list[int] = field(default_factory=lambda: [96, 96, 96])
    window: list[float] = field(default_factory=lambda: [-175.0, 250.0])


@dataclass
class AugmentSection:
    flip_axes: list[int] = field(default_factory=list)  # (D, H, W) axes; W flips swap left and right organs
    flip_prob: float = 0.5
    rotate_deg: float = 15.0
    rotate_prob: float = 0.3
    zoom: float = 0.15
    zoom_prob: float = 0.3
    intensity_shift: float = 0.1
    intensity_scale: float = 0.1
    intensity_prob: float = 0.5
    noise_std: float = 0.02
    noise_prob: float = 0.2


@dataclass
class OptimSection:
    """The optimiser and schedule fields every training config has (YAML keys of the same names), declared once.
    A config whose recipe differs redeclares only that field, with a comment. Fields of a base come first in
    ``fields()``/``asdict()``; a config with required fields of its own must then be ``kw_only``."""

    steps: int = 1000
    batch_size: int = 2
    lr: float = 5e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    seed: int = 0
    log_every: int = 10


@dataclass
class LoopSection(OptimSection):
    """The ``train`` section of the 3D training loops (train, pretrain-ssl, pretrain-vdt): gradient clipping, mixed
    precision and periodic checkpoints on top of the optimiser fields (pretrain-2d has none of the three)."""

    grad_clip: float = 1.0
    amp: bool = True  # on CUDA only
    ckpt_every: int = 200


@dataclass
class TrainSection(LoopSection):
    lr: float = 3e-4  # differs from OptimSection (5e-4, the pre-training recipes'): fine-tuning's own default
    crops_per_case: int = 2
    # weight of background-centred crops against each class's (None: the number of classes, i.e. half the crops):
    # too few random crops teach a position-aware ViT that an organ sits at the window centre
    background_ratio: float | None = None
    # per label name: crop-centre weight (default 1) and loss weight (default 1): more crops on, and a larger
    # share of the loss for, the small organs a Dice on one scan is hard on (e.g. {kidney_left: 3})
    class_ratios: dict[str, float] = field(default_factory=dict)
    class_weights: dict[str, float] = field(default_factory=dict)
    loss: Literal["dicece", "dicefocal"] = "dicece"
    val_every: int = 200
    num_workers: int = 0
    sw_overlap: float = 0.25
    sw_batch: int = 4


@dataclass
class TrainConfig:
    name: str
    data: DataConfig
    version: str = "0.1.0"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: str = "runs/train"

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        cfg = load_config(cls, path)
        base = Path(path).parent
        for attr in ("init_checkpoint", "weights"):  # files named in the config are relative to it, like the data
            value = getattr(cfg.model, attr)
            if value and not Path(value).is_absolute():
                setattr(cfg.model, attr, str((base / value).resolve()))
        return cfg

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        return _build(cls, raw, "config")


def read_yaml_config(kind: Any, path: str | Path, relative: tuple[str, ...] = ("output",)) -> Any:
    """A YAML config as the dataclass ``kind``; the top-level path fields named in ``relative`` are taken from the
    config's own folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    cfg = _build(kind, raw, "config")
    for attr in relative:
        value = getattr(cfg, attr)
        if value and not Path(value).is_absolute():
            setattr(cfg, attr, str((path.parent / value).resolve()))
    return cfg


def load_config(kind: Any, path: str | Path) -> Any:
    """A training-style config (with ``data`` and ``output``); relative paths are taken from its own folder."""
    cfg = read_yaml_config(kind, path)
    if not isinstance(cfg.data, DataConfig):
        raise ConfigError("config.data: a mapping with dataset and labels is required")
    if not Path(cfg.data.dataset).is_absolute():
        cfg.data.dataset = str((Path(path).parent / cfg.data.dataset).resolve())
    return cfg


def _build(kind: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(kind)}
    hints = typing.get_type_hints(kind)  # resolves the string annotations in kind's own module
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        ftype = hints[name]
        sub = ftype if is_dataclass(ftype) else None
        if sub is not None and isinstance(value, dict):
            values[name] = _build(sub, value, f"{where}.{name}")
        elif name == "labels" and kind is DataConfig:
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where}.labels: a non-empty list of {{name, source}} is required")
            values[name] = [_build(LabelSpec, item, f"{where}.labels[{i}]") for i, item in enumerate(value)]
        else:
            values[name] = value
    try:
        return kind(**values)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None
