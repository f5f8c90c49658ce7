"""The tensor rules of inflation, one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inflation.ops import (
    adapt_input_channels,
    inflate_kernel_depth,
    inflate_pos_embed,
    resample_grid_2d,
    resize_patch_kernel,
    resize_rel_pos_table,
)


def test_position_resampling_is_identity_when_grids_match():
    pos = torch.randn(1, 1 + 14 * 14, 24)
    out, how = inflate_pos_embed(pos, source_prefix=1, target_prefix=1, grid=(1, 14, 14))
    assert torch.equal(out, pos)
    assert "14x14 -> 14x14" in how


def test_position_tiling_is_constant_along_depth():
    pos = torch.randn(1, 1 + 14 * 14, 24)
    out, _ = inflate_pos_embed(pos, 1, 1, grid=(4, 6, 6))
    grid = out[:, 1:].reshape(1, 4, 6, 6, 24)
    for d in range(1, 4):
        assert torch.equal(grid[:, d], grid[:, 0])
    assert torch.equal(out[:, :1], pos[:, :1])  # class token's embedding kept
    expected_plane = F.interpolate(pos[:, 1:].reshape(1, 14, 14, 24).permute(0, 3, 1, 2), size=(6, 6),
                                   mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1)
    assert torch.allclose(grid[:, 0], expected_plane, atol=1e-6)


def test_position_prefix_tokens_dropped_or_padded_consistently():
    pos = torch.randn(1, 1 + 16, 8)
    dropped, _ = inflate_pos_embed(pos, 1, 0, grid=(2, 4, 4))
    assert dropped.shape == (1, 32, 8)
    padded, _ = inflate_pos_embed(pos, 1, 3, grid=(2, 4, 4))
    assert padded.shape == (1, 3 + 32, 8)
    assert torch.equal(padded[:, 0], pos[:, 0]) and torch.count_nonzero(padded[:, 1:3]) == 0


def test_non_square_position_grid_is_refused():
    with pytest.raises(ValueError, match="not a square grid"):
        inflate_pos_embed(torch.randn(1, 1 + 15, 8), 1, 1, grid=(1, 4, 4))


def test_rgb_to_grey_sums_kernels_so_grey_images_give_the_same_response():
    w = torch.randn(5, 3, 4, 4)
    grey = torch.randn(2, 1, 8, 8)
    assert torch.allclose(F.conv2d(grey, adapt_input_channels(w, 1), stride=4), F.conv2d(grey.repeat(1, 3, 1, 1), w, stride=4), atol=1e-5)


def test_n_channel_adaptation_preserves_response_magnitude():
    w = torch.randn(5, 3, 4, 4)
    out = adapt_input_channels(w, 4)
    assert out.shape == (5, 4, 4, 4)
    assert torch.allclose(out.sum(1), w.sum(1) * 0.75 + w[:, 0] * 0.75, atol=1e-6)


def test_depth_rules():
    w = torch.randn(6, 1, 4, 4)
    center = inflate_kernel_depth(w, 5, "center")
    assert torch.equal(center[:, :, 2], w) and torch.count_nonzero(center[:, :, [0, 1, 3, 4]]) == 0
    avg = inflate_kernel_depth(w, 4, "average")
    assert torch.allclose(avg.sum(2), w, atol=1e-6)
    with pytest.raises(ValueError, match="depth rule must be one of"):
        inflate_kernel_depth(w, 4, "middle")  # type: ignore[arg-type]


def test_patch_kernel_resize_keeps_tokens_for_resized_patches():
    w = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    big = resize_patch_kernel(w, (16, 16))
    assert big.shape == (7, 1, 16, 16)
    # FlexiViT's property (exact when the patch grows): a patch and its resized copy give the same token.
    x8 = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    x16 = F.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    tok_old = torch.einsum("bchw,echw->be", x8, w)
    tok_new = torch.einsum("bchw,echw->be", x16, big)
    assert torch.allclose(tok_old, tok_new, atol=1e-8)
    assert resize_patch_kernel(w, (8, 8)) is w
    assert resize_patch_kernel(big, (4, 4)).shape == (7, 1, 4, 4)  # shrinking: the least-squares solution


def test_rel_pos_table_identity_and_resize():
    table = torch.randn((2 * 4 - 1) ** 2 + 3, 2)
    assert torch.equal(resize_rel_pos_table(table, (4, 4)), table)
    bigger = resize_rel_pos_table(table, (6, 6))
    assert bigger.shape == ((2 * 6 - 1) ** 2 + 3, 2)
    assert torch.equal(bigger[-3:], table[-3:])


def test_grid_resampling_identity():
    g = torch.randn(1, 5, 5, 3)
    assert resample_grid_2d(g, (5, 5)) is g
