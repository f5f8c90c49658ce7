"""Tensor rules that turn 2D ViT weights into 3D ones. Pure functions, each shape-checked."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

DepthRule = Literal["center", "average"]
DEPTH_RULES: tuple[str, ...] = ("center", "average")


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(E, C, kh, kw) -> (E, in_chans, kh, kw). One channel: the sum of the kernels (a grey image replicated to
    RGB gives the same response). n channels: the kernels repeated cyclically, scaled by C/n (timm's rule)."""
    source = weight.shape[1]
    if in_chans == source:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_chans / source)
    return weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (source / in_chans)


def _resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Matrix B with B @ x.flatten() == bilinear-resize(x).flatten() for any old-sized x."""
    basis = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, old[0], old[1])
    resized = F.interpolate(basis, size=new, mode="bilinear", align_corners=False, antialias=False)
    return resized.reshape(old[0] * old[1], -1).T


def resize_patch_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Change the in-plane patch size of (E, C, kh, kw) kernels so tokens keep their meaning.

    FlexiViT's pseudo-inverse resize: the new kernel w' solves <x, w> = <resize(x), w'>, i.e. a patch and its
    resized copy give the same token.
    """
    old = (weight.shape[-2], weight.shape[-1])
    if old == tuple(size):
        return weight
    b = _resize_matrix(old, size)  # (new, old)
    pinv = torch.linalg.pinv(b.T)  # (new, old)
    flat = weight.reshape(-1, old[0] * old[1]).to(torch.float64)
    out = flat @ pinv.T
    return out.reshape(*weight.shape[:-2], *size).to(weight.dtype)


def inflate_kernel_depth(weight: torch.Tensor, depth: int, rule: DepthRule) -> torch.Tensor:
    """(E, C, kh, kw) -> (E, C, depth, kh, kw).

    ``center``: the 2D kernel in plane ``depth // 2``, zeros elsewhere (TransSeg's default): each depth patch's
    token equals the 2D token of its centre slice. ``average``: repeated along depth and divided by ``depth``
    (I3D): the token equals the 2D token of the mean slice.
    """
    if rule == "center":
        out = weight.new_zeros(weight.shape[0], weight.shape[1], depth, *weight.shape[2:])
        out[:, :, depth // 2] = weight
        return out
    if rule == "average":
        return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    raise ValueError(f"depth rule must be one of {DEPTH_RULES}; got {rule!r}")


def resample_grid_2d(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, H0, W0, E) -> (1, H, W, E) by float32 bicubic interpolation; the identity when the sizes match."""
    if tuple(grid.shape[1:3]) == tuple(size):
        return grid
    dtype = grid.dtype
    x = grid.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=size[0] < grid.shape[1])
    return x.permute(0, 2, 3, 1).to(dtype)


def inflate_pos_embed(
    pos_embed: torch.Tensor, source_prefix: int, target_prefix: int, grid: tuple[int, int, int]
) -> tuple[torch.Tensor, str]:
    """(1, P0 + H0*W0, E) -> (1, P + D'*H'*W', E): the 2D grid resampled in-plane, then tiled along depth.

    Prefix-token embeddings are kept when the target has the same prefix, dropped when it has none, and
    zero-padded when it has more. Returns the tensor and a one-line account of what was done.
    """
    n_patches = pos_embed.shape[1] - source_prefix
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"2D position embedding of {n_patches} patch tokens is not a square grid")
    dim = pos_embed.shape[-1]
    d, h, w = grid
    plane = resample_grid_2d(pos_embed[:, source_prefix:].reshape(1, side, side, dim), (h, w))
    tiled = plane.unsqueeze(1).expand(1, d, h, w, dim).reshape(1, d * h * w, dim)
    prefix = pos_embed[:, :source_prefix]
    if target_prefix == 0:
        prefix = prefix[:, :0]
    elif target_prefix > source_prefix:
        prefix = torch.cat([prefix, prefix.new_zeros(1, target_prefix - source_prefix, dim)], dim=1)
    elif target_prefix < source_prefix:
        prefix = prefix[:, :target_prefix]
    how = f"grid {side}x{side} -> {h}x{w} (bicubic), tiled x{d} along depth; prefix {source_prefix} -> {target_prefix}"
    return torch.cat([prefix, tiled], dim=1).contiguous(), how


def resize_rel_pos_table(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """BEiT relative position bias table ((2Wh-1)(2Ww-1)+3, heads) -> the table for a new (Wh, Ww) window.

    The 2D part is resampled bicubically; the three class-token entries are kept.
    """
    extra = 3
    spatial = table.shape[0] - extra
    side = math.isqrt(spatial)
    if side * side != spatial:
        raise ValueError(f"relative position table of {table.shape[0]} rows is not (2W-1)^2 + 3")
    new = (2 * window[0] - 1, 2 * window[1] - 1)
    heads = table.shape[1]
    grid = table[:spatial].reshape(1, side, side, heads)
    resized = resample_grid_2d(grid, new).reshape(new[0] * new[1], heads)
    return torch.cat([resized, table[spatial:]], dim=0).contiguous()
