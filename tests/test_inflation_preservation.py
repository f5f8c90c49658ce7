"""Function preservation: an inflated encoder computes what the 2D model computes on the matching slice."""

from __future__ import annotations

import pytest
import torch

from helpers_torch import timm_model, tiny_beit, tiny_vit
from inflation.inflate import config_for_checkpoint, inflate
from inflation.sources import Checkpoint2D, encoder_config_from_timm

TOL = 1e-5  # compared in float64, so the bound is about the mapping and not float32 rounding order of two kernels


def checkpoint_of(model: torch.nn.Module, name: str) -> Checkpoint2D:
    proj = model.patch_embed.proj
    return Checkpoint2D(name, dict(model.state_dict()), encoder_config_from_timm(model, name), proj.in_channels,
                        tuple(proj.kernel_size), "memory")


def slice_for(volume: torch.Tensor, start: int, depth: int, rule: str) -> torch.Tensor:
    """(B, 1, D, H, W) -> the 2D RGB image the inflated kernel sees for depth patch [start, start+depth)."""
    chunk = volume[:, :, start:start + depth]
    plane = chunk[:, :, depth // 2] if rule == "center" else chunk.mean(dim=2)
    return plane.repeat(1, 3, 1, 1)  # grey -> RGB; the inflated kernel summed the RGB kernels


def timm_tokens_2d(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Embedding tokens of a timm 2D model (patch embed + prefix + position)."""
    x = model.patch_embed(image)
    if hasattr(model, "_pos_embed"):
        return model._pos_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    return x + model.pos_embed if model.pos_embed is not None else x


VIT_CASES = [
    ("tiny-vit", lambda: tiny_vit(32, 8), 8),
    ("tiny-vit-reg-tokens", lambda: tiny_vit(32, 8, reg_tokens=2), 8),
    ("tiny-vit-no-embed-class", lambda: tiny_vit(32, 8, no_embed_class=True, class_token=True), 8),
    ("vit_tiny_patch16_224", lambda: timm_model("vit_tiny_patch16_224", img_size=64), 16),
    ("deit_tiny_patch16_224", lambda: timm_model("deit_tiny_patch16_224", img_size=64), 16),
]


@pytest.mark.parametrize("rule", ["center", "average"])
@pytest.mark.parametrize("case", VIT_CASES, ids=[c[0] for c in VIT_CASES])
def test_full_3d_tokens_equal_2d_tokens_of_each_depth_patch(case, rule):
    name, make, patch = case
    model2d = make()
    img = model2d.patch_embed.img_size[0]
    pd = patch // 2  # several depth tokens: depth patch smaller than the window depth
    config = config_for_checkpoint(checkpoint_of(model2d, name), img_size=(4 * pd, img, img), patch_size=(pd, patch, patch))
    assert config.mode == "3d" and config.grid_size[0] == 4
    model3d, report = inflate(checkpoint_of(model2d, name), config, rule=rule)
    assert {c.key for c in report.adapted} == {"patch_embed.proj.weight", "pos_embed"}
    model2d.double(), model3d.double()
    volume = torch.randn(2, 1, *config.img_size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        tokens3d = model3d.encoder.embed(volume)
        prefix = model3d.encoder.num_prefix_tokens
        per_plane = config.grid_size[1] * config.grid_size[2]
        for d in range(config.grid_size[0]):
            tokens2d = timm_tokens_2d(model2d, slice_for(volume, d * pd, pd, rule))
            start = prefix + d * per_plane
            diff_patch = (tokens3d[:, start:start + per_plane] - tokens2d[:, prefix:]).abs().max().item()
            diff_prefix = (tokens3d[:, :prefix] - tokens2d[:, :prefix]).abs().max().item() if prefix else 0.0
            assert diff_patch <= TOL, f"depth patch {d}: max abs diff {diff_patch}"
            assert diff_prefix <= TOL


@pytest.mark.parametrize("rule", ["center", "average"])
@pytest.mark.parametrize("case", VIT_CASES, ids=[c[0] for c in VIT_CASES])
def test_2p5d_encoder_equals_2d_model_on_centre_or_mean_slice(case, rule):
    name, make, patch = case
    model2d = make()
    img = model2d.patch_embed.img_size[0]
    config = config_for_checkpoint(checkpoint_of(model2d, name), img_size=(5, img, img), patch_size=(5, patch, patch))
    assert config.mode == "2.5d"
    model3d, _ = inflate(checkpoint_of(model2d, name), config, rule=rule)
    model3d.eval().double(), model2d.double()
    volume = torch.randn(2, 1, *config.img_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ours = model3d.encoder.forward_features(volume)
        theirs = model2d.forward_features(slice_for(volume, 0, 5, rule))
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff}"


@pytest.mark.parametrize("rule", ["center", "average"])
def test_beit_2p5d_encoder_equals_2d_beit(rule):
    model2d = tiny_beit(32, 8)
    config = config_for_checkpoint(checkpoint_of(model2d, "beit-tiny"), img_size=(5, 32, 32), patch_size=(5, 8, 8))
    model3d, report = inflate(checkpoint_of(model2d, "beit-tiny"), config, rule=rule)
    assert any(c.key.endswith("relative_position_bias_table") for c in report.adapted)
    model3d.eval().double(), model2d.double()
    volume = torch.randn(2, 1, 5, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        diff = (model3d.encoder.forward_features(volume) - model2d.forward_features(slice_for(volume, 0, 5, rule))).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff}"


def test_real_beit_base_architecture_inflates_to_2p5d():
    model2d = timm_model("beit_base_patch16_224", img_size=64)
    config = config_for_checkpoint(checkpoint_of(model2d, "beit_base_patch16_224"), img_size=(5, 64, 64), patch_size=(5, 16, 16))
    model3d, report = inflate(checkpoint_of(model2d, "beit_base_patch16_224"), config, rule="center")
    assert not report.missing
    model3d.eval().double(), model2d.double()
    volume = torch.randn(1, 1, 5, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        diff = (model3d.encoder.forward_features(volume) - model2d.forward_features(slice_for(volume, 0, 5, "center"))).abs().max().item()
    assert diff <= TOL


def test_preservation_fails_when_the_rule_is_wrong():
    """The comparison can fail: inflating with 'average' does not reproduce the centre slice."""
    model2d = tiny_vit(32, 8)
    config = config_for_checkpoint(checkpoint_of(model2d, "t"), img_size=(5, 32, 32), patch_size=(5, 8, 8))
    model3d, _ = inflate(checkpoint_of(model2d, "t"), config, rule="average")
    volume = torch.randn(1, 1, 5, 32, 32)
    with torch.no_grad():
        diff = (model3d.encoder.forward_features(volume) - model2d.forward_features(slice_for(volume, 0, 5, "center"))).abs().max().item()
    assert diff > 1e-2
