"""Model registry in timm's style: ``@register_model`` functions return a :class:`ModelConfig`.

The registry itself is torch-free (configs only); ``models.nets.create_model`` builds the network.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from models.config import EncoderConfig, ModelConfig, SwinEncoderConfig

ConfigFn = Callable[..., ModelConfig]
_REGISTRY: dict[str, ConfigFn] = {}


class UnknownModelError(KeyError):
    """No model of that name is registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_model(fn: ConfigFn) -> ConfigFn:
    """Register ``fn`` under its own name; it takes keyword overrides and returns a ModelConfig."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of a registered variant with ``overrides`` applied (model or encoder fields)."""
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name](**overrides)


_ENCODER_FIELDS = {f.name for f in fields(EncoderConfig)}


def _build(name: str, encoder: EncoderConfig, backbone: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    enc_over = {k: overrides.pop(k) for k in list(overrides) if k in _ENCODER_FIELDS}
    if enc_over:
        encoder = EncoderConfig(**{**encoder.__dict__, **enc_over})
    kwargs = {**defaults, **overrides}
    return ModelConfig(name=name, encoder=encoder, backbone=kwargs.pop("backbone", backbone), **kwargs)


# timm's widths: vit_tiny/small/base_patch16_224 (LayerNorm eps 1e-6, qkv bias, one class token).
VIT_TINY = EncoderConfig(embed_dim=192, depth=12, num_heads=3)
VIT_SMALL = EncoderConfig(embed_dim=384, depth=12, num_heads=6)
VIT_BASE = EncoderConfig(embed_dim=768, depth=12, num_heads=12)
# timm's beit_base_patch16_224: relative position bias per block, layer scale 0.1, no absolute embedding,
# mean pooling (so no final token norm).
BEIT_BASE = EncoderConfig(
    embed_dim=768, depth=12, num_heads=12, block="beit", init_values=0.1, abs_pos_embed=False,
    rel_pos_bias=True, final_norm=False,
)

FULL_3D = {"img_size": (96, 96, 96), "patch_size": (16, 16, 16)}
# TransSeg's 2.5D mode: 5 slices in one depth token, the centre slice predicted.
TWO_HALF_D = {"img_size": (5, 96, 96), "patch_size": (5, 16, 16)}


@register_model
def vit3d_tiny_patch16(**kw: Any) -> ModelConfig:
    return _build("vit3d_tiny_patch16", VIT_TINY, "vit_tiny_patch16_224", FULL_3D, kw)


@register_model
def vit3d_small_patch16(**kw: Any) -> ModelConfig:
    return _build("vit3d_small_patch16", VIT_SMALL, "vit_small_patch16_224", FULL_3D, kw)


@register_model
def vit3d_base_patch16(**kw: Any) -> ModelConfig:
    return _build("vit3d_base_patch16", VIT_BASE, "vit_base_patch16_224", FULL_3D, kw)


@register_model
def vit25d_tiny_patch16(**kw: Any) -> ModelConfig:
    return _build("vit25d_tiny_patch16", VIT_TINY, "vit_tiny_patch16_224", TWO_HALF_D, kw)


@register_model
def vit25d_small_patch16(**kw: Any) -> ModelConfig:
    return _build("vit25d_small_patch16", VIT_SMALL, "vit_small_patch16_224", TWO_HALF_D, kw)


@register_model
def vit25d_base_patch16(**kw: Any) -> ModelConfig:
    return _build("vit25d_base_patch16", VIT_BASE, "vit_base_patch16_224", TWO_HALF_D, kw)


@register_model
def beit25d_base_patch16(**kw: Any) -> ModelConfig:
    return _build("beit25d_base_patch16", BEIT_BASE, "beit_base_patch16_224", TWO_HALF_D, kw)


# ---- Swin UNETR (MONAI's architecture): feature sizes 24 / 36 / 48; 48 is the released self-supervised encoder's
_SWIN_FIELDS = {f.name for f in fields(SwinEncoderConfig)}


def _swin(name: str, feature_size: int, overrides: dict[str, Any]) -> ModelConfig:
    enc = {k: overrides.pop(k) for k in list(overrides) if k in _SWIN_FIELDS}
    encoder = SwinEncoderConfig(**{"feature_size": feature_size, **enc})
    kwargs = {"img_size": (96, 96, 96), "patch_size": (2, 2, 2), "feature_size": encoder.feature_size, **overrides}
    return ModelConfig(name=name, encoder=encoder, backbone=kwargs.pop("backbone", None), **kwargs)


@register_model
def swin_unetr_f24(**kw: Any) -> ModelConfig:
    return _swin("swin_unetr_f24", 24, kw)


@register_model
def swin_unetr_f36(**kw: Any) -> ModelConfig:
    return _swin("swin_unetr_f36", 36, kw)


@register_model
def swin_unetr_f48(**kw: Any) -> ModelConfig:
    return _swin("swin_unetr_f48", 48, kw)
