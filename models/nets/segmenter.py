"""Encoder + decoder: the network that ``create_model`` returns."""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.nets.decoder import UnetrDecoder
from models.nets.encoder import ViTEncoder3d


class ViTSegmenter(nn.Module):
    """Inflated ViT encoder with a UNETR-style decoder.

    Input ``(B, C, D, H, W)`` of exactly ``config.img_size``; output logits ``(B, classes, *config.out_size)``:
    the whole ROI in 3D mode, the centre slice in 2.5D mode.
    """

    ENCODER_PREFIX = "encoder."

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder3d(config)
        self.decoder = UnetrDecoder(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_tokens(x)
        grids = [self.encoder.tokens_to_grid(t) for t in tokens]
        return self.decoder(x, grids)
