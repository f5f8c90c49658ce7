"""2D weights from memory, local files and timm's hub path all give the same inflated tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers_torch import timm_model
from inflation.checkpoint import load_checkpoint
from inflation.errors import IncompatibleWeightsError, ShapeMismatchError, UnsupportedBackboneError, WeightsFileError
from inflation.inflate import config_for_checkpoint, inflate
from inflation.sources import from_file, from_state_dict, from_timm_hub

BACKBONE = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def vit_tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path, Path]:
    model = timm_model(BACKBONE)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("weights")
    st = root / "vit_tiny.safetensors"
    save_file(sd, str(st))
    pth = root / "vit_tiny.pth"
    torch.save({"model": sd}, pth)  # the common {'model': ...} container
    binf = root / "pytorch_model.bin"
    torch.save({"module." + k: v for k, v in sd.items()}, binf)  # DDP prefix
    return sd, st, pth, binf


def _inflated(ckpt):
    config = config_for_checkpoint(ckpt, img_size=(32, 64, 64), patch_size=(16, 16, 16), num_classes=3)
    model, report = inflate(ckpt, config, rule="center")
    return model.encoder.state_dict(), report


def test_local_files_and_hub_path_give_the_same_tensors_as_memory(vit_tiny_weights):
    sd, st, pth, binf = vit_tiny_weights
    reference, report = _inflated(from_state_dict(sd, BACKBONE))
    assert not report.missing and "head.weight" in report.dropped
    sources = [from_file(st, BACKBONE), from_file(pth, BACKBONE), from_file(binf, BACKBONE),
               from_timm_hub(BACKBONE, pretrained_cfg_overlay=dict(file=str(st)))]
    for source in sources:
        got, _ = _inflated(source)
        assert got.keys() == reference.keys()
        for key in reference:
            assert torch.equal(got[key], reference[key]), f"{source.origin}: {key} differs"
    assert sources[-1].origin.startswith("timm:")


def test_shape_mismatch_names_the_key_and_both_shapes(vit_tiny_weights):
    sd, *_ = vit_tiny_weights
    broken = dict(sd)
    broken["blocks.3.mlp.fc1.weight"] = torch.zeros(10, 192)
    ckpt = from_state_dict(broken, BACKBONE)
    config = config_for_checkpoint(ckpt, img_size=(32, 64, 64), patch_size=(16, 16, 16))
    with pytest.raises(ShapeMismatchError, match=r"'blocks\.3\.mlp\.fc1\.weight'.*\[10, 192\].*\[768, 192\]"):
        inflate(ckpt, config)


def test_missing_encoder_keys_are_an_error_in_strict_mode(vit_tiny_weights):
    sd, *_ = vit_tiny_weights
    partial = {k: v for k, v in sd.items() if not k.startswith("blocks.11.")}
    ckpt = from_state_dict(partial, BACKBONE)
    config = config_for_checkpoint(ckpt, img_size=(32, 64, 64), patch_size=(16, 16, 16))
    with pytest.raises(IncompatibleWeightsError, match=r"lacks encoder weights: blocks\.11\."):
        inflate(ckpt, config)
    _, report = inflate(ckpt, config, strict=False)
    assert any(k.startswith("blocks.11.") for k in report.missing)


def test_checkpoint_for_a_different_width_is_refused(vit_tiny_weights):
    sd, *_ = vit_tiny_weights
    with pytest.raises(ShapeMismatchError, match="cls_token|pos_embed|patch_embed"):
        ckpt = from_state_dict(sd, "vit_small_patch16_224")
        inflate(ckpt, config_for_checkpoint(ckpt, img_size=(32, 64, 64), patch_size=(16, 16, 16)))


def test_bad_files_and_backbones_have_clear_errors(tmp_path):
    with pytest.raises(WeightsFileError, match="weights file not found"):
        from_file(tmp_path / "nope.safetensors", BACKBONE)
    bad = tmp_path / "weights.txt"
    bad.write_text("x")
    with pytest.raises(WeightsFileError, match="unknown weights file type '.txt'"):
        from_file(bad, BACKBONE)
    corrupt = tmp_path / "weights.pth"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(WeightsFileError, match="cannot read weights"):
        from_file(corrupt, BACKBONE)
    with pytest.raises(UnsupportedBackboneError, match="unknown timm model 'vit_nonexistent'"):
        from_state_dict({}, "vit_nonexistent")
    with pytest.raises(UnsupportedBackboneError, match="ResNet is not supported"):
        from_state_dict({}, "resnet18")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctseg", *args], capture_output=True, text=True, timeout=300)


def test_cli_inflates_a_local_vit_small_checkpoint(tmp_path):
    model = timm_model("vit_small_patch16_224")
    weights = tmp_path / "vit_small_patch16_224.safetensors"
    save_file(model.state_dict(), str(weights))
    out = tmp_path / "out"
    proc = _run_cli("inflate", "--backbone", "vit_small_patch16_224", "--weights", str(weights), "--rule", "center",
                    "--patch", "16,16,16", "--roi", "32,64,64", "--num-classes", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "adapted patch_embed.proj.weight: [384, 3, 16, 16] -> [384, 1, 16, 16, 16]" in proc.stdout
    assert "dropped head.weight" in proc.stdout
    net, payload = load_checkpoint(out / "inflated.pt")
    assert net.config.num_classes == 4 and net.config.img_size == (32, 64, 64)
    assert torch.equal(net.encoder.state_dict()["blocks.5.attn.qkv.weight"], model.state_dict()["blocks.5.attn.qkv.weight"])
    assert payload["meta"]["inflation"]["rule"] == "center"
    assert (out / "inflation_report.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--roi", "90,96,96"], "ROI must be a multiple of the patch size"),
        (["--patch", "16,abc,16"], "--patch must be numbers like"),
        (["--weights", "/nonexistent/w.safetensors"], "weights file not found"),
        (["--backbone", "resnet18"], "ResNet is not supported"),
    ],
)
def test_cli_bad_arguments_exit_non_zero_with_a_message(tmp_path, args, message):
    base = {"--backbone": "vit_tiny_patch16_224", "--out": str(tmp_path / "o"), "--weights": None}
    pairs = dict(zip(args[::2], args[1::2]))
    base.update(pairs)
    if base["--weights"] is None:
        weights = tmp_path / "w.safetensors"
        save_file(timm_model("vit_tiny_patch16_224").state_dict(), str(weights))
        base["--weights"] = str(weights)
    argv = ["inflate"] + [x for k, v in base.items() for x in (k, v)]
    proc = _run_cli(*argv)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
