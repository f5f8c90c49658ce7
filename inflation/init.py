"""Where fine-tuning starts: ``model.init`` in a training config, one of

- ``scratch``: random initialisation;
- ``inflate``: a 2D ViT inflated to 3D, either a ``ctseg inflate`` output (``init_checkpoint``) or on the fly
  from a timm name (``backbone``, hub) or a local 2D file (``backbone`` + ``weights``), with ``rule``;
- ``swin-ssl``: Swin UNETR's encoder from self-supervised weights (``weights``: the released file or
  ``ctseg pretrain-ssl`` output; inflation/swin_ssl.py);
- ``vdt``: a ViT encoder from ``ctseg pretrain-vdt`` (``weights``);
- ``checkpoint``: any ctseg checkpoint (``init_checkpoint``), every tensor whose name and shape match.

Every path logs each key it maps, adapts or drops (timm's shape-driven filter), and the report goes into the
checkpoint's metadata and from there into the bundle's manifest.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import torch
from torch import nn

from inflation.checkpoint import read_checkpoint
from inflation.config import ConfigError, TrainConfig
from inflation.errors import WeightsFileError
from models.config import MergingLayout, ModelConfig
from models.nets import create_model, encoder_prefix
from models.registry import model_config

log = logging.getLogger("ctseg.init")


class InitKind(str, Enum):
    SCRATCH = "scratch"
    INFLATE = "inflate"
    SWIN_SSL = "swin-ssl"
    VDT = "vdt"
    CHECKPOINT = "checkpoint"


def init_kind(cfg: TrainConfig) -> InitKind:
    """``model.init``, or for older configs what their fields imply."""
    m = cfg.model
    if m.init is not None:
        try:
            kind = InitKind(m.init)
        except ValueError:
            raise ConfigError(f"model.init must be one of {[k.value for k in InitKind]}; got {m.init!r}") from None
    else:
        kind = InitKind.INFLATE if (m.init_checkpoint or m.backbone) else InitKind.SCRATCH
    needs = {InitKind.SWIN_SSL: "weights", InitKind.VDT: "weights", InitKind.CHECKPOINT: "init_checkpoint"}
    if kind in needs and not getattr(m, needs[kind]):
        raise ConfigError(f"model.init: {kind.value} needs model.{needs[kind]} (a file)")
    if kind == InitKind.INFLATE and not (m.init_checkpoint or m.backbone):
        raise ConfigError("model.init: inflate needs model.init_checkpoint (ctseg inflate output) or model.backbone")
    return kind


def build_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The network to fine-tune and the metadata that says how it was initialised."""
    kind = init_kind(cfg)
    roi = tuple(cfg.preprocess.roi)
    meta: dict[str, Any] = {"init": {"kind": kind.value}, "inflation": None}
    m = cfg.model
    if kind == InitKind.INFLATE and m.init_checkpoint:
        payload = read_checkpoint(m.init_checkpoint)
        config = ModelConfig.from_dict(payload["model_config"])
        if tuple(config.img_size) != roi:
            raise ConfigError(f"init_checkpoint was inflated for ROI {list(config.img_size)}, config asks {list(roi)}")
        model = create_model(config.with_updates(num_classes=num_classes))
        prefix = encoder_prefix(model)
        model.encoder.load_state_dict({k[len(prefix):]: v for k, v in payload["state_dict"].items()
                                       if k.startswith(prefix)})
        meta["inflation"] = payload.get("meta", {}).get("inflation")
        log.info("encoder initialised from %s", m.init_checkpoint)
        return model, meta
    overrides = dict(m.overrides)
    if kind == InitKind.SWIN_SSL:
        from inflation.swin_ssl import load_swin_encoder, read_swin_ssl, resolve_layout

        weights = read_swin_ssl(m.weights)
        asked = MergingLayout(overrides.pop("merging")) if "merging" in overrides else None
        layout = resolve_layout(weights, asked, m.weights)
        config = model_config(m.name, img_size=roi, num_classes=num_classes, merging=layout, **overrides)
        if not config.is_swin:
            raise ConfigError(f"model.init: swin-ssl initialises a Swin UNETR; model.name {m.name!r} is not one "
                              "(swin_unetr_f24 / f36 / f48)")
        model = create_model(config)
        meta["init"]["report"] = load_swin_encoder(model, weights, m.weights).to_dict()
        return model, meta
    config = model_config(m.name, img_size=roi, num_classes=num_classes, **overrides)
    if kind == InitKind.INFLATE:
        from inflation.inflate import inflate
        from inflation.sources import from_file, from_timm_hub

        ckpt = from_file(m.weights, m.backbone) if m.weights else from_timm_hub(m.backbone)
        model, report = inflate(ckpt, config.with_updates(backbone=m.backbone), rule=m.rule)  # type: ignore[arg-type]
        meta["inflation"] = report.to_dict()
        return model, meta
    model = create_model(config)
    if kind == InitKind.SCRATCH:
        log.warning("no pretrained weights configured: the network starts from random initialisation")
        return model, meta
    if kind == InitKind.VDT:
        payload = read_checkpoint(m.weights)
        if payload.get("meta", {}).get("kind") != "vdt":
            raise WeightsFileError(f"{m.weights}: not a 'ctseg pretrain-vdt' checkpoint")
        if config.is_swin:
            raise ConfigError("model.init: vdt initialises a ViT encoder; a Swin UNETR takes swin-ssl")
        source = {k[len("encoder."):]: v for k, v in payload["state_dict"].items() if k.startswith("encoder.")}
        meta["init"]["report"] = load_matching(model.encoder, source, "vdt", adapt_pos_embed=True)
        meta["init"]["vdt"] = payload["meta"].get("vdt")
        return model, meta
    payload = read_checkpoint(m.init_checkpoint)  # CHECKPOINT
    meta["init"]["report"] = load_matching(model, payload["state_dict"], "checkpoint")
    return model, meta


def load_matching(module: nn.Module, source: dict[str, torch.Tensor], what: str,
                  adapt_pos_embed: bool = False) -> dict[str, Any]:
    """Copy every tensor of ``source`` whose name and shape match ``module``'s; with ``adapt_pos_embed``, a position
    embedding on another grid is resampled (a one-depth-token grid is inflated like a 2D one). Every key is logged;
    nothing matching at all is an error."""
    from inflation.ops import inflate_pos_embed

    target = module.state_dict()
    loaded, adapted, dropped = {}, [], []
    for name, value in source.items():
        want = target.get(name)
        if want is None:
            dropped.append(f"{name} (not in the model)")
        elif want.shape == value.shape:
            loaded[name] = value
        elif adapt_pos_embed and name == "pos_embed" and hasattr(module, "grid_size"):
            prefix = getattr(module, "num_prefix_tokens", 0)  # a (1, h, w) grid flattens like a 2D one
            loaded[name], how = inflate_pos_embed(value, prefix, prefix, module.grid_size)
            adapted.append(f"{name}: {how}")
        else:
            dropped.append(f"{name} (shape {tuple(value.shape)}, model {tuple(want.shape)})")
        log.debug("%s: %s", what, name)
    if not loaded:
        raise WeightsFileError(f"{what}: no tensor of the weights matches the model by name and shape")
    missing = sorted(set(target) - set(loaded))
    module.load_state_dict({**target, **loaded})
    report = {"loaded": len(loaded), "adapted": adapted, "dropped": dropped, "missing": missing}
    log.info("%s weights: %d tensors loaded, %d adapted, %d dropped, %d left as initialised", what, len(loaded),
             len(adapted), len(dropped), len(missing))
    for line in adapted + dropped:
        log.info("%s: %s", what, line)
    return report
