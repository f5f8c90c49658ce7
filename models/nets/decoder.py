"""UNETR-style decoder: skip features from four encoder depths, logits at input resolution.

Level k is the resolution after k upsampling stages from the token grid (level 0 = tokens, level S = voxels,
S = log2 of the in-plane patch). As in UNETR (Hatamizadeh et al. 2022), the deepest tap feeds level 0, the
next ones levels 1, 2, 3, and a conv block on the raw input feeds level S.
"""

from __future__ import annotations

import torch
from torch import nn

from models.axes import Triple
from models.config import ModelConfig


class ConvBlock(nn.Module):
    """Two conv-norm-act layers with a residual connection (MONAI's UnetResBlock shape)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: Triple) -> None:
        super().__init__()
        pad = tuple(k // 2 for k in kernel)
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel, padding=pad, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_ch, affine=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, kernel, padding=pad, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = nn.Conv3d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class Upsample(nn.Module):
    """Learned upsampling by an integer factor per axis (transposed conv, kernel = stride = factor)."""

    def __init__(self, in_ch: int, out_ch: int, factor: Triple) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose3d(in_ch, out_ch, kernel_size=factor, stride=factor, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SkipProjection(nn.Module):
    """Token grid -> feature map at decoder level ``level`` (``level`` upsamplings, UNETR's PrUp block)."""

    def __init__(self, embed_dim: int, out_ch: int, factors: list[Triple], kernel: Triple) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = embed_dim
        for factor in factors:
            layers += [Upsample(in_ch, out_ch, factor), ConvBlock(out_ch, out_ch, kernel)]
            in_ch = out_ch
        if not factors:
            layers.append(ConvBlock(embed_dim, out_ch, kernel))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DecoderStage(nn.Module):
    """Upsample, concatenate the skip feature (if any), conv block."""

    def __init__(self, in_ch: int, out_ch: int, factor: Triple, kernel: Triple, has_skip: bool) -> None:
        super().__init__()
        self.up = Upsample(in_ch, out_ch, factor)
        self.block = ConvBlock(out_ch * 2 if has_skip else out_ch, out_ch, kernel)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class UnetrDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        embed_dim = config.encoder.embed_dim
        feat = config.feature_size
        factors = config.upsample_factors()
        stages = len(factors)
        kernel: Triple = (1, 3, 3) if config.mode == "2.5d" else (3, 3, 3)
        self.stages = stages

        def channels(level: int) -> int:
            return feat * 2 ** (stages - level)

        # Level S: the raw input. In 2.5D the depth window collapses to the centre slice by a valid depth conv.
        if config.mode == "2.5d":
            depth = config.img_size[0]
            self.input_stem = nn.Sequential(
                nn.Conv3d(config.in_chans, feat, (depth, 3, 3), padding=(0, 1, 1), bias=False),
                nn.InstanceNorm3d(feat, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
                ConvBlock(feat, feat, kernel),
            )
        else:
            self.input_stem = ConvBlock(config.in_chans, feat, kernel)
        # Levels 1..S-1 take the three shallower taps (deepest first); levels beyond 3 have no token skip.
        self.num_token_skips = min(3, stages - 1)
        self.skip_projections = nn.ModuleList(
            SkipProjection(embed_dim, channels(level), factors[:level], kernel)
            for level in range(1, self.num_token_skips + 1)
        )
        self.decoder_stages = nn.ModuleList()
        in_ch = embed_dim
        for level in range(1, stages + 1):
            has_skip = level <= self.num_token_skips or level == stages
            self.decoder_stages.append(DecoderStage(in_ch, channels(level), factors[level - 1], kernel, has_skip))
            in_ch = channels(level)
        self.head = nn.Conv3d(feat, config.num_classes, kernel_size=1)

    def forward(self, image: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        """``grids``: the four encoder taps as (B, E, D', H', W'), shallowest first."""
        taps = list(reversed(grids[:-1]))  # deepest intermediate first -> level 1
        x = grids[-1]
        for level, stage in enumerate(self.decoder_stages, start=1):
            if level <= self.num_token_skips:
                skip = self.skip_projections[level - 1](taps[level - 1])
            elif level == self.stages:
                skip = self.input_stem(image)
            else:
                skip = None
            x = stage(x, skip)
        return self.head(x)
