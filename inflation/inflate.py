"""Inflate a 2D checkpoint into a 3D segmentation model, timm ``checkpoint_filter_fn`` style.

Shape-driven: every source key is matched to the 3D encoder's key of the same name. Keys whose shape must
change (patch embedding, position embedding, relative position tables) are adapted and logged; all others
are copied unchanged and must match exactly; classifier-head keys are dropped; the decoder starts fresh.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from inflation.errors import IncompatibleWeightsError, ShapeMismatchError
from inflation.ops import (
    DEPTH_RULES,
    DepthRule,
    adapt_input_channels,
    inflate_kernel_depth,
    inflate_pos_embed,
    resize_patch_kernel,
    resize_rel_pos_table,
)
from inflation.sources import Checkpoint2D
from models.config import EncoderConfig, ModelConfig
from models.nets import ViTSegmenter, create_model

log = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
# Keys of a 2D classifier that have no place in a segmentation encoder.
HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.", "attn_pool.", "pre_logits.", "head_dist.", "dist_token")
# Buffers the model computes itself; old checkpoints sometimes carry them.
DERIVED_SUFFIXES = ("relative_position_index", "k_bias")


@dataclass(frozen=True)
class KeyChange:
    key: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    how: str


@dataclass
class InflationReport:
    """What happened to every key: adapted (reshaped), copied, dropped (source only), missing (target only)."""

    backbone: str
    origin: str
    rule: str
    adapted: list[KeyChange] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    decoder_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"inflated {self.backbone} ({self.origin}) with depth rule '{self.rule}': "
            f"{len(self.adapted)} adapted, {len(self.copied)} copied, {len(self.dropped)} dropped, "
            f"{len(self.missing)} missing; decoder {self.decoder_params:,} parameters initialised fresh"
        ]
        lines += [f"  adapted {c.key}: {list(c.source_shape)} -> {list(c.target_shape)} ({c.how})" for c in self.adapted]
        lines += [f"  dropped {k}" for k in self.dropped]
        lines += [f"  missing {k}" for k in self.missing]
        return "\n".join(lines)


def check_encoder_compatible(source: EncoderConfig, target: EncoderConfig, backbone: str) -> None:
    """The 3D encoder must mirror the 2D one in everything that decides the parameters."""
    fields_that_matter = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "block", "rel_pos_bias")
    diffs = [
        f"{name}: checkpoint {getattr(source, name)!r}, model {getattr(target, name)!r}"
        for name in fields_that_matter
        if getattr(source, name) != getattr(target, name)
    ]
    if (source.init_values is None) != (target.init_values is None):
        diffs.append(f"layer scale: checkpoint {source.init_values!r}, model {target.init_values!r}")
    if diffs:
        raise IncompatibleWeightsError(f"{backbone} does not fit the model's encoder: " + "; ".join(diffs))


def inflate_state_dict(
    checkpoint: Checkpoint2D, model: ViTSegmenter, rule: DepthRule = "center"
) -> tuple[dict[str, torch.Tensor], InflationReport]:
    """Map a 2D state dict onto ``model.encoder``'s keys. Returns the encoder state dict and the report."""
    if rule not in DEPTH_RULES:
        raise ValueError(f"depth rule must be one of {DEPTH_RULES}; got {rule!r}")
    config = model.config
    check_encoder_compatible(checkpoint.encoder, config.encoder, checkpoint.backbone)
    target = model.encoder.state_dict()
    report = InflationReport(backbone=checkpoint.backbone, origin=checkpoint.origin, rule=rule)
    out: dict[str, torch.Tensor] = {}
    src_prefix = 0 if checkpoint.encoder.no_embed_class else checkpoint.encoder.num_prefix_tokens
    dst_prefix = 0 if config.encoder.no_embed_class else config.encoder.num_prefix_tokens

    for key, tensor in checkpoint.state_dict.items():
        if key.startswith(HEAD_PREFIXES) or key.endswith(DERIVED_SUFFIXES) or key not in target:
            report.dropped.append(key)
            continue
        want = tuple(target[key].shape)
        have = tuple(tensor.shape)
        value = tensor.detach().float()
        if key == "patch_embed.proj.weight":
            pd, ph, pw = config.patch_size
            steps = []
            if value.shape[1] != config.in_chans:
                steps.append(f"input channels {value.shape[1]} -> {config.in_chans}")
                value = adapt_input_channels(value, config.in_chans)
            if tuple(value.shape[-2:]) != (ph, pw):
                steps.append(f"in-plane {tuple(value.shape[-2:])} -> {(ph, pw)} (pseudo-inverse resize)")
                value = resize_patch_kernel(value, (ph, pw))
            value = inflate_kernel_depth(value, pd, rule)
            steps.append(f"depth 1 -> {pd} ({rule})")
            how = "; ".join(steps)
        elif key == "pos_embed":
            if value.ndim != 3 or value.shape[-1] != want[-1]:
                raise ShapeMismatchError(key, have, want, "embedding width differs")
            value, how = inflate_pos_embed(value, src_prefix, dst_prefix, config.grid_size)
        elif key.endswith("relative_position_bias_table"):
            value = resize_rel_pos_table(value, (config.grid_size[1], config.grid_size[2]))
            how = f"relative position table resized to the {config.grid_size[1]}x{config.grid_size[2]} grid"
        else:
            if have != want:
                raise ShapeMismatchError(key, have, want)
            out[key] = value.to(target[key].dtype).clone()
            report.copied.append(key)
            continue
        if tuple(value.shape) != want:
            raise ShapeMismatchError(key, have, want, f"after adapting: {list(value.shape)}")
        out[key] = value.to(target[key].dtype).contiguous()
        change = KeyChange(key, have, want, how)
        report.adapted.append(change)
        log.info("inflate %s: %s -> %s (%s)", key, list(have), list(want), how)

    report.missing = [k for k in target if k not in out and not k.endswith(DERIVED_SUFFIXES)]
    report.decoder_params = sum(p.numel() for p in model.decoder.parameters())
    for key in report.dropped:
        log.info("inflate: dropped %s (not part of the segmentation encoder)", key)
    for key in report.missing:
        log.warning("inflate: %s is not in the checkpoint; it keeps its fresh initialisation", key)
    return out, report


def config_for_checkpoint(
    checkpoint: Checkpoint2D,
    *,
    img_size: tuple[int, int, int],
    patch_size: tuple[int, int, int],
    num_classes: int = 2,
    in_chans: int = 1,
    feature_size: int = 16,
    name: str | None = None,
) -> ModelConfig:
    """A ModelConfig whose encoder mirrors the checkpoint's architecture."""
    mode = "25d" if patch_size[0] == img_size[0] else "3d"
    return ModelConfig(
        name=name or f"{checkpoint.backbone}_{mode}",
        img_size=img_size,
        patch_size=patch_size,
        encoder=checkpoint.encoder,
        in_chans=in_chans,
        num_classes=num_classes,
        feature_size=feature_size,
        backbone=checkpoint.backbone,
    )


def inflate(
    checkpoint: Checkpoint2D,
    config: ModelConfig,
    rule: DepthRule = "center",
    strict: bool = True,
) -> tuple[ViTSegmenter, InflationReport]:
    """Build ``config``'s network and load the inflated 2D weights into its encoder.

    ``strict``: any encoder key absent from the checkpoint is an :class:`IncompatibleWeightsError`.
    """
    model = create_model(config)
    state, report = inflate_state_dict(checkpoint, model, rule)
    if strict and report.missing:
        raise IncompatibleWeightsError(
            f"{checkpoint.backbone} ({checkpoint.origin}) lacks encoder weights: {', '.join(report.missing)}"
        )
    model.encoder.load_state_dict(state, strict=False)
    log.info("%s", report.summary().splitlines()[0])
    return model, report
