"""Small timm 2D models with random weights for the inflation tests."""

from __future__ import annotations

import torch

import models.nets._torchvision_compat  # noqa: F401
import timm
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """timm's init plus noise on every parameter: no test passes because a bias happens to be zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def tiny_vit(img: int = 32, patch: int = 8, **kw) -> VisionTransformer:
    return randomize_(VisionTransformer(img_size=img, patch_size=patch, embed_dim=32, depth=2, num_heads=2, **kw))


def tiny_beit(img: int = 32, patch: int = 8) -> Beit:
    return randomize_(
        Beit(img_size=img, patch_size=patch, embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=False,
             use_rel_pos_bias=True, init_values=0.1)
    )


def timm_model(name: str, **kw) -> torch.nn.Module:
    return randomize_(timm.create_model(name, pretrained=False, **kw))
