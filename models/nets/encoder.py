"""3D ViT encoder that keeps timm's parameter names, so a timm 2D ViT/DeiT/BEiT state dict maps key for key.

Only ``patch_embed.proj.weight`` (Conv2d -> Conv3d) and ``pos_embed`` (2D grid -> 3D grid) change shape on
inflation; the transformer blocks are timm's own ``Block`` classes.
"""

from __future__ import annotations

from functools import partial

import torch

import models.nets._torchvision_compat  # noqa: F401  (before timm)
from timm.models.beit import Block as BeitBlock
from timm.models.vision_transformer import Block as VitBlock
from torch import nn

from models.config import ModelConfig


class InputShapeError(ValueError):
    """The network was given a tensor whose shape it cannot take."""


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patches -> tokens; named like timm's ``PatchEmbed`` (``proj``)."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D'*H'*W', E), D' slowest


class ViTEncoder3d(nn.Module):
    """Transformer encoder over a (D', H', W') token grid; returns the token sequences at the skip depths."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        enc = config.encoder
        self.config = config
        self.img_size = config.img_size
        self.grid_size = config.grid_size
        self.num_prefix_tokens = enc.num_prefix_tokens
        self.no_embed_class = enc.no_embed_class
        self.skip_blocks = enc.skip_blocks
        num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        dim = enc.embed_dim

        self.patch_embed = PatchEmbed3d(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if enc.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, enc.reg_tokens, dim)) if enc.reg_tokens else None
        if enc.abs_pos_embed:
            embed_len = num_patches if enc.no_embed_class else num_patches + self.num_prefix_tokens
            self.pos_embed = nn.Parameter(torch.randn(1, embed_len, dim) * 0.02)
        else:
            self.pos_embed = None

        norm_layer = partial(nn.LayerNorm, eps=enc.norm_eps)
        dpr = [x.item() for x in torch.linspace(0, enc.drop_path_rate, enc.depth)]
        if enc.block == "beit":
            window = (self.grid_size[1], self.grid_size[2]) if enc.rel_pos_bias else None
            self.blocks = nn.ModuleList(
                BeitBlock(
                    dim=dim, num_heads=enc.num_heads, qkv_bias=enc.qkv_bias, mlp_ratio=enc.mlp_ratio,
                    drop_path=dpr[i], init_values=enc.init_values, norm_layer=norm_layer, window_size=window,
                )
                for i in range(enc.depth)
            )
        else:
            self.blocks = nn.ModuleList(
                VitBlock(
                    dim=dim, num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio, qkv_bias=enc.qkv_bias,
                    init_values=enc.init_values, drop_path=dpr[i], norm_layer=norm_layer,
                )
                for i in range(enc.depth)
            )
        self.norm = norm_layer(dim) if enc.final_norm else nn.Identity()
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or tuple(x.shape[2:]) != tuple(self.img_size) or x.shape[1] != self.config.in_chans:
            raise InputShapeError(
                f"expected input (B, {self.config.in_chans}, {', '.join(map(str, self.img_size))}) "
                f"[B, C, D, H, W]; got {tuple(x.shape)}. Feed ROI-sized windows (sliding window) or pad."
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + prefix tokens + absolute position embedding, as timm's ``_pos_embed``."""
        x = self.patch_embed(x)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.pos_embed is None:
            return torch.cat(prefix + [x], dim=1) if prefix else x
        if self.no_embed_class:
            x = x + self.pos_embed
            return torch.cat(prefix + [x], dim=1) if prefix else x
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        return x + self.pos_embed

    def forward_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token sequences (with prefix tokens) after each skip block; the last one is final-normed."""
        if not torch.jit.is_tracing():
            self.check_input(x)
        x = self.embed(x)
        kept: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks, start=1):
            x = block(x)
            if index in self.skip_blocks:
                kept[index] = x
        kept[len(self.blocks)] = self.norm(x)
        return [kept[i] for i in self.skip_blocks]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and the final norm, like timm's ``forward_features``."""
        return self.forward_tokens(x)[-1]

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + D'H'W', E) -> (B, E, D', H', W'), dropping prefix tokens."""
        d, h, w = self.grid_size
        x = tokens[:, self.num_prefix_tokens:, :]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], d, h, w)
