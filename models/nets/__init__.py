"""Torch networks of ctseg. Import only where torch is installed (training, export)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from models.config import ModelConfig
from models.nets.encoder import InputShapeError, ViTEncoder3d
from models.nets.segmenter import ViTSegmenter
from models.registry import list_models, model_config, register_model

if TYPE_CHECKING:
    from models.nets.swin import SwinSegmenter


def create_model(name_or_config: str | ModelConfig, **overrides: Any) -> ViTSegmenter | SwinSegmenter:
    """Build a registered variant by name (with keyword overrides), or a network from a ModelConfig."""
    if isinstance(name_or_config, ModelConfig):
        config = name_or_config.with_updates(**overrides) if overrides else name_or_config
    else:
        config = model_config(name_or_config, **overrides)
    if config.is_swin:
        from models.nets.swin import SwinSegmenter

        return SwinSegmenter(config)
    return ViTSegmenter(config)


def encoder_prefix(model: torch.nn.Module) -> str:
    """The state-dict prefix of a network's encoder (the part pre-training initialises)."""
    return getattr(model, "ENCODER_PREFIX", "encoder.")


__all__ = [
    "InputShapeError", "ModelConfig", "ViTEncoder3d", "ViTSegmenter", "create_model", "encoder_prefix", "list_models",
    "model_config", "register_model",
]
