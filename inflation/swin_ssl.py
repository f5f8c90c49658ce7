"""Self-supervised Swin UNETR encoder weights: the released checkpoint format and ctseg's own (``ctseg pretrain-ssl``).

The release (Tang et al. 2022, ``model_swinvit.pt``): a dict with ``state_dict``; every key prefixed ``module.``;
the encoder's 126 tensors named as MONAI's ``SwinTransformer`` without the ``swinViT.`` segment, MLP layers
``mlp.fc1``/``mlp.fc2`` where MONAI has ``mlp.linear1``/``mlp.linear2``; the pre-training heads (``norm``,
``rotation_head``, ``contrastive_head``, ``convTrans3d``) beside them. It was trained with MONAI 0.9-1.4's patch
merging order. ctseg's checkpoints record their layout in their model config.

The patch-merging layout cannot be read from a file (same names, same shapes in every layout), so it is decided by
provenance: a model config that does not name a layout takes the checkpoint's; one that names another is refused,
because loading would give weights that compute a different function without any error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inflation.checkpoint import FORMAT, load_torch_file
from inflation.errors import WeightsFileError
from models.config import MergingLayout, SwinEncoderConfig

log = logging.getLogger("ctseg.swin_ssl")
RELEASE_HEADS = ("norm.", "rotation_head.", "contrastive_head.", "convTrans3d.")
RELEASE_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
ENCODER = "swinViT."  # MONAI's SwinUNETR attribute; ctseg's SwinSegmenter puts it under "net."


@dataclass
class SwinWeights:
    """An encoder state dict in MONAI's ``SwinTransformer`` names (no prefix), with where it came from."""

    state: dict[str, torch.Tensor]
    layout: MergingLayout
    source: str  # "released format" or "ctseg pretrain-ssl"
    dropped: list[str] = field(default_factory=list)  # pre-training heads and anything else not in the encoder
    feature_size: int | None = None


@dataclass
class KeyReport:
    mapped: list[tuple[str, str]]
    dropped: list[str]
    missing: list[str]
    layout: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "merging_layout": self.layout, "mapped": len(self.mapped),
                "dropped": self.dropped, "missing": self.missing}

    def summary(self) -> str:
        return (f"{self.source}: {len(self.mapped)} encoder tensors mapped, {len(self.dropped)} dropped "
                f"({', '.join(sorted({k.split('.')[0] for k in self.dropped})) or 'none'}), {len(self.missing)} missing; "
                f"patch merging layout {self.layout}")


def read_swin_ssl(path: str | Path) -> SwinWeights:
    path = Path(path)
    payload = load_torch_file(path, "Swin self-supervised weights file")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        meta = payload.get("meta", {})
        enc = payload.get("model_config", {}).get("encoder", {})
        if meta.get("kind") != "swin-ssl" or enc.get("kind") != "swin":
            raise WeightsFileError(f"{path}: a ctseg checkpoint, but not from 'ctseg pretrain-ssl' (kind "
                                   f"{meta.get('kind')!r}); use init: checkpoint for it")
        prefix = "net." + ENCODER
        state = {k[len(prefix):]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
        dropped = [k for k in payload["state_dict"] if not k.startswith(prefix)]
        return SwinWeights(state, MergingLayout(enc.get("merging", MergingLayout.MONAI_1_5.value)),
                           "ctseg pretrain-ssl", dropped, enc.get("feature_size"))
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"{path}: expected the released Swin UNETR format (a dict with 'state_dict') or a "
                               "checkpoint written by 'ctseg pretrain-ssl'")
    out, dropped = {}, []
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        name = name[len(ENCODER):] if name.startswith(ENCODER) else name
        if name.startswith(RELEASE_HEADS) or not name.startswith(("patch_embed.", "layers")):
            dropped.append(key)
            continue
        for old, new in RELEASE_RENAMES:
            name = name.replace(old, new)
        out[name] = value
    if not out:
        raise WeightsFileError(f"{path}: no Swin encoder tensor found (expected keys like "
                               "'module.patch_embed.proj.weight' or 'module.layers1.0.blocks.0...')")
    feature = out.get("patch_embed.proj.weight")
    return SwinWeights(out, MergingLayout.MONAI_0_9, "released format", dropped,
                       int(feature.shape[0]) if feature is not None else None)


def resolve_layout(weights: SwinWeights, asked: MergingLayout | None, path: str | Path) -> MergingLayout:
    """The layout the fine-tuned model must use: the checkpoint's, unless the config names another (refused)."""
    if asked is None:
        log.info("patch merging layout %s, as the weights were trained (%s)", weights.layout.value, weights.source)
        return weights.layout
    if asked != weights.layout:
        raise WeightsFileError(
            f"{path}: its Swin encoder was trained with patch merging layout {weights.layout.value!r} "
            f"({weights.source}) but the model config asks for {asked.value!r}. The layers have the same names and "
            "shapes in both layouts, so these weights would load without an error and compute a different function. "
            f"Remove model.overrides.merging (the weights' layout is then used) or set it to {weights.layout.value!r}.")
    return asked


def load_swin_encoder(model: torch.nn.Module, weights: SwinWeights, path: str | Path) -> KeyReport:
    """Copy ``weights`` into ``model``'s Swin encoder; every key logged; refused if any encoder tensor is missing or
    has another shape (e.g. a different feature size)."""
    enc_cfg = model.config.encoder
    if not isinstance(enc_cfg, SwinEncoderConfig):
        raise WeightsFileError(f"{path}: Swin weights need a Swin UNETR model; got {type(enc_cfg).__name__}")
    if enc_cfg.merging != weights.layout:
        raise WeightsFileError(f"{path}: layout {weights.layout.value} does not match the model's "
                               f"{enc_cfg.merging.value}; resolve it with resolve_layout first")
    target = model.encoder.state_dict()
    mapped, missing = [], []
    for name, tensor in target.items():
        source = weights.state.get(name)
        if source is None:
            missing.append(name)
            continue
        if source.shape != tensor.shape:
            raise WeightsFileError(
                f"{path}: encoder tensor {name} has shape {tuple(source.shape)}, the model's is {tuple(tensor.shape)} "
                f"(weights of feature size {weights.feature_size}, model feature size {enc_cfg.feature_size})")
        mapped.append((name, "swinViT." + name))
        log.debug("swin-ssl: %s -> swinViT.%s %s", name, name, tuple(tensor.shape))
    unexpected = sorted(set(weights.state) - set(target))
    if missing:
        raise WeightsFileError(f"{path}: {len(missing)} encoder tensor(s) missing from the weights, e.g. "
                               f"{missing[:3]}: refusing a partial initialisation")
    model.encoder.load_state_dict({name: weights.state[name] for name in target})
    report = KeyReport(mapped, weights.dropped + unexpected, missing, weights.layout.value, weights.source)
    log.info("swin-ssl weights %s", report.summary())
    return report
