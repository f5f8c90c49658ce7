"""Registered variants: build, forward, backward, shapes, and clear errors."""

from __future__ import annotations

import pytest
import torch

from helpers_torch import timm_model
from inflation.sources import encoder_config_from_timm
from models.config import ModelConfig, ModelConfigError
from models.nets import InputShapeError, create_model, list_models, model_config
from models.registry import UnknownModelError

SMALL_3D = dict(img_size=(32, 32, 32), patch_size=(16, 16, 16), num_classes=3)
SMALL_25D = dict(img_size=(5, 32, 32), patch_size=(5, 16, 16), num_classes=3)


def test_registry_has_three_widths_in_two_token_modes():
    names = list_models()
    for width in ("tiny", "small", "base"):
        assert f"vit3d_{width}_patch16" in names and f"vit25d_{width}_patch16" in names
    assert "beit25d_base_patch16" in names
    assert model_config("vit3d_small_patch16").mode == "3d"
    assert model_config("vit25d_small_patch16").mode == "2.5d"


SWIN_SMALL = {"img_size": (32, 32, 64), "num_classes": 3, "feature_size": 12}  # bottleneck 1 x 1 x 2


@pytest.mark.parametrize("name", list_models())
def test_every_variant_runs_forward_and_backward(name):
    kw = SWIN_SMALL if name.startswith("swin") else SMALL_25D if "25d" in name else SMALL_3D
    model = create_model(name, **kw)
    x = torch.randn(2, 1, *model.config.img_size)
    y = model(x)
    expected_depth = 1 if model.config.mode == "2.5d" else x.shape[2]
    assert y.shape == (2, 3, expected_depth, x.shape[3], x.shape[4])
    y.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("width", ["tiny", "small", "base"])
def test_registered_widths_mirror_timm_key_for_key(width):
    timm_vit = timm_model(f"vit_{width}_patch16_224")
    assert model_config(f"vit3d_{width}_patch16").encoder == encoder_config_from_timm(timm_vit)
    ours = create_model(f"vit3d_{width}_patch16", **SMALL_3D).encoder.state_dict()
    theirs = {k for k in timm_vit.state_dict() if not k.startswith("head.")}
    assert set(ours) == theirs


def test_beit_variant_mirrors_timm_beit():
    beit = timm_model("beit_base_patch16_224", img_size=32)
    assert model_config("beit25d_base_patch16").encoder == encoder_config_from_timm(beit)


def test_wrong_input_size_is_a_clear_error():
    model = create_model("vit3d_tiny_patch16", **SMALL_3D)
    with pytest.raises(InputShapeError, match=r"expected input \(B, 1, 32, 32, 32\).*got \(1, 1, 32, 32, 48\)"):
        model(torch.randn(1, 1, 32, 32, 48))


def test_config_rules_are_stated():
    with pytest.raises(ModelConfigError, match="axis H: ROI 40 is not a multiple of patch 16"):
        model_config("vit3d_tiny_patch16", img_size=(32, 40, 32))
    with pytest.raises(ModelConfigError, match="BEiT's relative position bias is two-dimensional"):
        model_config("beit25d_base_patch16", img_size=(32, 32, 32), patch_size=(16, 16, 16))
    with pytest.raises(ModelConfigError, match="in-plane patch size must be a power of two"):
        model_config("vit3d_tiny_patch16", img_size=(24, 24, 24), patch_size=(12, 12, 12))
    with pytest.raises(UnknownModelError, match="unknown model 'vit3d_huge'"):
        model_config("vit3d_huge")


def test_config_round_trips_through_dict():
    cfg = model_config("vit25d_small_patch16", num_classes=5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ModelConfigError, match="unknown model config fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
