"""Where 2D weights come from: timm's hub (``pretrained=True``), a local file, or a state dict in memory.

Whatever the source, the architecture is read from the timm model of the same name (built on the meta device,
so no memory is spent), and the weights are checked against it shape by shape later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

import models.nets._torchvision_compat  # noqa: F401  (before timm)
import timm
from torch import nn

from inflation.errors import UnsupportedBackboneError, WeightsFileError
from models.config import EncoderConfig

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass
class Checkpoint2D:
    """A 2D ViT's weights with the encoder hyper-parameters of its architecture."""

    backbone: str
    state_dict: dict[str, torch.Tensor]
    encoder: EncoderConfig
    in_chans: int
    patch_size: tuple[int, int]
    origin: str


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def encoder_config_from_timm(model: nn.Module, backbone: str = "") -> EncoderConfig:
    """Read the encoder hyper-parameters off a timm ViT/DeiT/BEiT; refuse what the 3D encoder can't mirror."""
    name = backbone or type(model).__name__
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise UnsupportedBackboneError(
            f"{name}: {type(model).__name__} is not supported; use a timm vit_*, deit_* (non-distilled) or beit_* model"
        )
    first = blocks[0]
    dim = int(model.embed_dim)
    attn = first.attn
    cls = type(model).__name__
    if cls == "Beit":
        if getattr(model, "rel_pos_bias", None) is not None:
            raise UnsupportedBackboneError(f"{name}: a shared relative position bias is not supported")
        return EncoderConfig(
            embed_dim=dim, depth=len(blocks), num_heads=int(attn.num_heads),
            mlp_ratio=first.mlp.fc1.out_features / dim, qkv_bias=attn.q_bias is not None,
            norm_eps=float(first.norm1.eps), class_token=True, block="beit",
            init_values=float(first.init_values) if first.gamma_1 is not None else None,
            abs_pos_embed=model.pos_embed is not None,
            rel_pos_bias=attn.relative_position_bias_table is not None,
            final_norm=not _is_identity(model.norm),
        )
    if cls != "VisionTransformer":
        raise UnsupportedBackboneError(
            f"{name}: {cls} is not supported; use a timm vit_*, deit_* (non-distilled) or beit_* model"
        )
    checks = {
        "qk_norm": not _is_identity(getattr(attn, "q_norm", None)),
        "pre-norm (norm_pre)": not _is_identity(getattr(model, "norm_pre", None)),
        "patch-embedding norm": not _is_identity(getattr(model.patch_embed, "norm", None)),
        "non-standard MLP": not hasattr(first.mlp, "fc1") or not hasattr(first.mlp, "fc2"),
        "non-learned position embedding": model.pos_embed is None,
    }
    bad = [what for what, present in checks.items() if present]
    if bad:
        raise UnsupportedBackboneError(f"{name}: uses {', '.join(bad)}, which the 3D encoder does not implement")
    init_values = float(first.ls1.init_values) if not _is_identity(first.ls1) else None
    return EncoderConfig(
        embed_dim=dim, depth=len(blocks), num_heads=int(attn.num_heads),
        mlp_ratio=first.mlp.fc1.out_features / dim, qkv_bias=attn.qkv.bias is not None,
        norm_eps=float(first.norm1.eps), class_token=model.cls_token is not None,
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)), no_embed_class=bool(model.no_embed_class),
        block="vit", init_values=init_values, abs_pos_embed=True, final_norm=not _is_identity(model.norm),
    )


def _architecture(backbone: str) -> tuple[EncoderConfig, int, tuple[int, int]]:
    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise UnsupportedBackboneError(f"unknown timm model {backbone!r}: {err}") from None
    encoder = encoder_config_from_timm(model, backbone)
    proj = model.patch_embed.proj
    return encoder, int(proj.in_channels), tuple(proj.kernel_size)  # type: ignore[return-value]


def _unwrap(obj: object, origin: str) -> dict[str, torch.Tensor]:
    """Accept the common containers: {'model': ...}, {'state_dict': ...}, DDP's 'module.' prefix."""
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFileError(f"{origin}: no state dict found (expected a mapping of parameter names to tensors)")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key[len("module."):] if key.startswith("module.") else key] = value
    if not out:
        raise WeightsFileError(f"{origin}: the file holds no tensors")
    return out


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file of a timm model (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsFileError(f"{path.name}: unknown weights file type {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _unwrap(load_file(str(path)), str(path))
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True), str(path))
    except WeightsFileError:
        raise
    except Exception as err:  # corrupt file, pickle with code, truncated download
        raise WeightsFileError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None


def from_state_dict(state_dict: Mapping[str, torch.Tensor], backbone: str, origin: str = "memory") -> Checkpoint2D:
    encoder, in_chans, patch = _architecture(backbone)
    return Checkpoint2D(backbone, _unwrap(dict(state_dict), origin), encoder, in_chans, patch, origin)


def from_file(path: str | Path, backbone: str) -> Checkpoint2D:
    return from_state_dict(load_weights_file(path), backbone, origin=f"file:{Path(path).name}")


def from_timm_hub(backbone: str, pretrained_cfg_overlay: dict | None = None) -> Checkpoint2D:
    """timm's own pretrained loading (Hugging Face hub, URL, or ``pretrained_cfg_overlay=dict(file=...)``)."""
    try:
        model = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=pretrained_cfg_overlay)
    except RuntimeError as err:
        raise UnsupportedBackboneError(f"unknown timm model {backbone!r}: {err}") from None
    except OSError as err:  # no network, hub refused, file missing
        raise WeightsFileError(f"could not fetch pretrained weights for {backbone!r}: {err}") from None
    encoder = encoder_config_from_timm(model, backbone)
    proj = model.patch_embed.proj
    origin = "timm:" + backbone + (f" (file {Path(pretrained_cfg_overlay['file']).name})" if pretrained_cfg_overlay and "file" in pretrained_cfg_overlay else "")
    log.info("loaded %s through timm", origin)
    return Checkpoint2D(
        backbone, dict(model.state_dict()), encoder, int(proj.in_channels),
        tuple(proj.kernel_size), origin,  # type: ignore[arg-type]
    )
