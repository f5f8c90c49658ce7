"""Torch networks of ctseg. Import only where torch is installed (training, export)."""

from __future__ import annotations

from typing import Any

from models.config import ModelConfig
from models.nets.encoder import InputShapeError, ViTEncoder3d
from models.nets.segmenter import ViTSegmenter
from models.registry import list_models, model_config, register_model


def create_model(name_or_config: str | ModelConfig, **overrides: Any) -> ViTSegmenter:
    """Build a registered variant by name (with keyword overrides), or a network from a ModelConfig."""
    if isinstance(name_or_config, ModelConfig):
        config = name_or_config.with_updates(**overrides) if overrides else name_or_config
    else:
        config = model_config(name_or_config, **overrides)
    return ViTSegmenter(config)


__all__ = [
    "InputShapeError", "ModelConfig", "ViTEncoder3d", "ViTSegmenter", "create_model", "list_models",
    "model_config", "register_model",
]
