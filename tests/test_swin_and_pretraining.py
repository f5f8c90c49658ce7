"""Swin UNETR (registry, the released self-supervised checkpoint format, the patch-merging trap, export), and the
two pre-training commands (pretrain-ssl, pretrain-vdt) feeding fine-tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers_torch import randomize_
from phantoms import make_phantom, write_dataset
from PIL import Image

from inflation.config import TrainConfig
from inflation.errors import WeightsFileError
from inflation.init import build_model
from models.config import MergingLayout, ModelConfigError
from models.nets import create_model
from models.nets.swin import MONAI_0_9_ORDER, PatchMergingMonai09
from models.registry import model_config

ROI = (32, 32, 64)  # Swin's smallest trainable ROI here: a bottleneck of 1 x 1 x 2
HEADS = {"norm.weight": (192,), "norm.bias": (192,), "rotation_head.weight": (4, 192), "rotation_head.bias": (4,),
         "contrastive_head.weight": (512, 192), "contrastive_head.bias": (512,),
         "convTrans3d.weight": (192, 1, 32, 32, 32), "convTrans3d.bias": (1,)}


def swin(**kw):
    return create_model(model_config("swin_unetr_f24", img_size=ROI, num_classes=3, feature_size=12, **kw))


def write_released_format(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint laid out like the released model_swinvit.pt (feature size 12 here to stay small)."""
    encoder = randomize_(swin(merging="monai-0.9").encoder, seed=5)
    state = {}
    for key, value in encoder.state_dict().items():
        released = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state["module." + released] = value.clone()
    for key, shape in HEADS.items():
        state["module." + key] = torch.randn(shape)
    torch.save({"state_dict": state, "epoch": 7, "optimizer": {"lr": 1e-4}}, path)
    return encoder.state_dict()


def fine_tune_config(dataset: Path, output: Path, model: dict, roi=ROI) -> TrainConfig:
    return TrainConfig.from_dict({
        "name": "t", "data": {"dataset": str(dataset), "labels": [{"name": "liver", "source": [1]},
                                                                  {"name": "spleen", "source": [2]}]},
        "model": model, "preprocess": {"spacing": [3, 3, 3], "roi": list(roi)}, "output": str(output)})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n_cases=2, seed=1)


# ------------------------------------------------------------------------------------------------ Swin UNETR
def test_registered_variants_and_the_roi_rule():
    for name, size in (("swin_unetr_f24", 24), ("swin_unetr_f36", 36), ("swin_unetr_f48", 48)):
        cfg = model_config(name)
        assert cfg.is_swin and cfg.encoder.feature_size == size and cfg.out_size == cfg.img_size
    with pytest.raises(ModelConfigError, match=r"divisible by 32 on every axis; axis W: got 80"):
        model_config("swin_unetr_f24", img_size=(64, 64, 80))
    with pytest.raises(ModelConfigError, match="feature_size must be divisible by 12"):
        model_config("swin_unetr_f24", feature_size=20)


def test_forward_backward_and_onnx_export_parity(tmp_path):
    from inflation.export import export_onnx, export_torchscript, parity

    model = randomize_(swin(), seed=1).train()
    x = torch.rand(2, 1, *ROI)
    out = model(x)
    assert out.shape == (2, 3, *ROI)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    model.eval()
    export_onnx(model, tmp_path / "model.onnx")
    export_torchscript(model, tmp_path / "model.ts")
    checks = parity(model, tmp_path, windows=3, seed=0)  # batch of 3: the batch axis is dynamic
    # random weights give near-tied logits: a 1e-5 logit difference may flip a voxel in 100,000
    assert checks["onnxruntime"]["max_abs_logit_diff"] < 1e-3 and checks["onnxruntime"]["argmax_agreement"] > 0.999


def test_monai_0_9_patch_merging_keeps_its_order_and_differs_from_monai_1_5():
    from monai.networks.nets.swin_unetr import PatchMerging

    torch.manual_seed(0)
    old, new = PatchMergingMonai09(4), PatchMerging(4)
    new.load_state_dict(old.state_dict())  # same names, same shapes: nothing tells the two apart
    x = torch.randn(1, 4, 6, 8, 4)
    expected = old.reduction(old.norm(torch.cat([x[:, i::2, j::2, k::2] for i, j, k in MONAI_0_9_ORDER], -1)))
    assert torch.equal(old(x), expected)
    assert MONAI_0_9_ORDER[4:6] == ((1, 0, 1), (0, 1, 0))  # the duplicated slices of MONAI 0.9-1.4
    assert not torch.allclose(old(x), new(x), atol=1e-3)


def test_released_checkpoint_maps_every_encoder_key_and_adopts_its_layout(tmp_path, dataset):
    path = tmp_path / "model_swinvit.pt"
    source = write_released_format(path)
    cfg = fine_tune_config(dataset, tmp_path / "out", {"name": "swin_unetr_f24", "overrides": {"feature_size": 12},
                                                       "init": "swin-ssl", "weights": str(path)})
    model, meta = build_model(cfg, num_classes=3)
    assert model.config.encoder.merging == MergingLayout.MONAI_0_9
    report = meta["init"]["report"]
    assert report["mapped"] == len(source) == 126 and report["missing"] == []
    assert sorted(k[len("module."):] for k in report["dropped"]) == sorted(HEADS)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, source[key]), key


def test_a_checkpoint_of_another_patch_merging_layout_is_refused(tmp_path, dataset):
    path = tmp_path / "model_swinvit.pt"
    write_released_format(path)
    cfg = fine_tune_config(dataset, tmp_path / "out", {"name": "swin_unetr_f24", "init": "swin-ssl", "weights": str(path),
                                                       "overrides": {"feature_size": 12, "merging": "monai-1.5"}})
    with pytest.raises(WeightsFileError, match="patch merging layout 'monai-0.9'.*asks for 'monai-1.5'.*different function"):
        build_model(cfg, num_classes=3)


def test_a_partial_or_foreign_checkpoint_is_refused(tmp_path, dataset):
    path = tmp_path / "partial.pt"
    write_released_format(path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if "layers4" not in k}
    torch.save(payload, path)
    model = {"name": "swin_unetr_f24", "overrides": {"feature_size": 12}, "init": "swin-ssl", "weights": str(path)}
    with pytest.raises(WeightsFileError, match="missing from the weights.*partial initialisation"):
        build_model(fine_tune_config(dataset, tmp_path / "o", model), num_classes=3)
    bigger = dict(model, overrides={"feature_size": 24})
    write_released_format(path)
    with pytest.raises(WeightsFileError, match="feature size 12, model feature size 24"):
        build_model(fine_tune_config(dataset, tmp_path / "o", bigger), num_classes=3)


# ------------------------------------------------------------------------------------------------ pretrain-ssl
@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory) -> tuple[Path, dict]:
    from inflation.pretrain_ssl import SslConfig, pretrain_ssl

    root = tmp_path_factory.mktemp("ssl")
    (root / "ct").mkdir()
    for i in range(2):
        image, _ = make_phantom(shape_xyz=(48, 48, 40), seed=i, noise=5.0)
        sitk.WriteImage(image, str(root / "ct" / f"case{i}.nii.gz"))
    cfg = SslConfig(name="t", data=str(root / "ct"), model="swin_unetr_f24", overrides={"feature_size": 12},
                    output=str(root / "out"))
    cfg.preprocess.spacing, cfg.preprocess.roi = [2.0, 2.0, 2.0], [32, 32, 32]
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 24, 2, 2e-3, 2
    cfg.train.mask_box, cfg.train.ckpt_every = 8, 12
    result = pretrain_ssl(cfg)
    return root / "out", result


def test_ssl_pretraining_learns_and_writes_a_checkpoint_with_its_layout(ssl_run):
    from inflation.checkpoint import read_checkpoint

    out, _ = ssl_run
    history = read_checkpoint(out / "ssl.pt")["meta"]["history"]
    first, last = (np.mean([h["inpainting"] for h in part]) for part in (history[:4], history[-4:]))
    assert last < first, (first, last)
    assert np.mean([h["loss"] for h in history[-6:]]) < np.mean([h["loss"] for h in history[:6]])
    payload = read_checkpoint(out / "ssl.pt")
    assert payload["meta"]["kind"] == "swin-ssl" and payload["model_config"]["encoder"]["merging"] == "monai-1.5"
    assert any((out / "tensorboard").iterdir()) and (out / "last.pt").is_file()


def test_ssl_checkpoint_initialises_fine_tuning(ssl_run, tmp_path, dataset):
    from inflation.checkpoint import read_checkpoint

    out, _ = ssl_run
    base = {"name": "swin_unetr_f24", "overrides": {"feature_size": 12}}
    scratch, _ = build_model(fine_tune_config(dataset, tmp_path / "a", {**base, "init": "scratch"}), 3)
    tuned, meta = build_model(fine_tune_config(dataset, tmp_path / "b", {**base, "init": "swin-ssl",
                                                                         "weights": str(out / "ssl.pt")}), 3)
    saved = read_checkpoint(out / "ssl.pt")["state_dict"]
    assert meta["init"]["report"]["source"] == "ctseg pretrain-ssl"
    changed = 0
    for key, value in tuned.encoder.state_dict().items():
        assert torch.equal(value, saved["net.swinViT." + key]), key
        changed += not torch.equal(value, scratch.encoder.state_dict()[key])
    assert changed >= 100
    wrong = {**base, "init": "swin-ssl", "weights": str(out / "ssl.pt"),
             "overrides": {"feature_size": 12, "merging": "monai-0.9"}}
    with pytest.raises(WeightsFileError, match="trained with patch merging layout 'monai-1.5'"):
        build_model(fine_tune_config(dataset, tmp_path / "c", wrong), 3)


# ------------------------------------------------------------------------------------------------ pretrain-vdt
def write_image_folder(root: Path, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for kind in ("discs", "stripes"):
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            size = int(rng.integers(36, 90))
            y, x = np.mgrid[:size, :size]
            shape = ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2) if kind == "discs" else (x // 5) % 2 == 0
            a = (shape * 180 + rng.integers(0, 60, shape.shape)).astype(np.uint8)
            image = Image.fromarray(a, "L") if i % 2 else Image.fromarray(np.stack([a, a[::-1], a.T], -1), "RGB")
            image.save(root / kind / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def vdt_run(tmp_path_factory) -> tuple[Path, dict]:
    from inflation.pretrain_vdt import VdtConfig, pretrain_vdt

    root = tmp_path_factory.mktemp("vdt")
    cfg = VdtConfig(name="t", data=str(write_image_folder(root / "images")), model="vit25d_tiny_patch16",
                    overrides={"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": [5, 8, 8], "feature_size": 8},
                    image_size=32, output=str(root / "out"))
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 40, 8, 2e-3, 3
    return root / "out", pretrain_vdt(cfg)


def test_vdt_volume_is_the_shuffled_channels_centred_in_depth(tmp_path):
    from inflation.pretrain_vdt import vdt_volume

    a = np.zeros((8, 8, 3), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 50, 100, 150
    Image.fromarray(a, "RGB").save(tmp_path / "x.png")
    orders = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = vdt_volume(tmp_path / "x.png", 8, 5, gen)
        assert v.shape == (1, 5, 8, 8) and v[0, 0].abs().sum() == 0 and v[0, 4].abs().sum() == 0
        orders.add(tuple(round(float(v[0, d, 0, 0]) * 255) for d in (1, 2, 3)))
    assert len(orders) > 1 and all(sorted(o) == [50, 100, 150] for o in orders)


def test_vdt_pretraining_learns_and_initialises_a_vit_encoder(vdt_run, tmp_path, dataset):
    from inflation.checkpoint import read_checkpoint

    out, result = vdt_run
    assert result["last_loss"] < result["first_loss"]
    payload = read_checkpoint(out / "vdt.pt")
    assert payload["meta"]["kind"] == "vdt" and payload["meta"]["vdt"]["depth"] == 5
    base = {"name": "vit25d_tiny_patch16",
            "overrides": {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": [5, 8, 8], "feature_size": 8}}
    roi = (5, 48, 48)  # another in-plane grid than pre-training's 4 x 4: the position embedding is resampled
    scratch, _ = build_model(fine_tune_config(dataset, tmp_path / "a", {**base, "init": "scratch"}, roi), 3)
    tuned, meta = build_model(fine_tune_config(dataset, tmp_path / "b", {**base, "init": "vdt",
                                                                         "weights": str(out / "vdt.pt")}, roi), 3)
    report = meta["init"]["report"]
    assert any(line.startswith("pos_embed") for line in report["adapted"]) and report["loaded"] > 10
    saved = payload["state_dict"]
    for key, value in tuned.encoder.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(value, saved["encoder." + key]), key
    assert not torch.equal(tuned.encoder.blocks[0].attn.qkv.weight, scratch.encoder.blocks[0].attn.qkv.weight)


def test_ssl_and_vdt_resume_from_their_last_checkpoint(ssl_run, vdt_run, tmp_path):
    from inflation.checkpoint import read_checkpoint
    from inflation.pretrain_ssl import SslConfig, pretrain_ssl
    from inflation.pretrain_vdt import VdtConfig, pretrain_vdt

    ssl_out, _ = ssl_run
    cfg = SslConfig(name="t", data=str(ssl_out.parent / "ct"), model="swin_unetr_f24", overrides={"feature_size": 12},
                    output=str(tmp_path / "ssl"))
    cfg.preprocess.spacing, cfg.preprocess.roi = [2.0, 2.0, 2.0], [32, 32, 32]
    cfg.train.steps, cfg.train.mask_box = 26, 8
    assert pretrain_ssl(cfg, resume=ssl_out / "last.pt")["steps"] == 26
    assert len(read_checkpoint(tmp_path / "ssl" / "ssl.pt")["meta"]["history"]) == 26
    vdt_out, _ = vdt_run
    saved = read_checkpoint(vdt_out / "vdt.pt")
    vcfg = VdtConfig(name="t", data=str(vdt_out.parent / "images"), model="vit25d_tiny_patch16",
                     overrides={"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": [5, 8, 8], "feature_size": 8},
                     image_size=32, output=str(tmp_path / "vdt"))
    vcfg.train.steps = saved["step"] + 2
    assert pretrain_vdt(vcfg, resume=vdt_out / "last.pt")["steps"] == saved["step"] + 2


def test_training_config_class_weights_are_checked_by_label_name(dataset, tmp_path):
    from inflation.config import ConfigError
    from inflation.data import output_labels
    from inflation.train import per_class

    cfg = fine_tune_config(dataset, tmp_path, {"name": "vit3d_tiny_patch16"})
    labels = output_labels(cfg.data.labels)
    assert per_class({"spleen": 3}, labels, "class_weights") == [1.0, 3.0]
    with pytest.raises(ConfigError, match=r"class_ratios names \['kidney'\], which are not among the labels"):
        per_class({"kidney": 2}, labels, "class_ratios")
    with pytest.raises(ConfigError, match="must be positive"):
        per_class({"liver": 0}, labels, "class_weights")


def test_slices_to_images_cuts_a_classification_folder_from_the_training_part(dataset, tmp_path):
    from inflation.slice_images import slices_to_images

    cfg = fine_tune_config(dataset, tmp_path, {"name": "vit3d_tiny_patch16"})
    cfg.data.val_cases = 1
    counts = slices_to_images(cfg, tmp_path / "images", min_pixels=20)
    assert {"liver", "none"} <= set(counts) and sum(counts.values()) > 10
    first = next((tmp_path / "images" / "liver").iterdir())
    with Image.open(first) as im:
        assert im.mode == "RGB"
    from inflation.data import discover

    validation = discover(cfg.data.dataset)[-1].case_id  # val_cases: 1 holds out the last case
    made = {p.stem.rsplit("_", 1)[0] for p in (tmp_path / "images").rglob("*.png")}
    assert validation not in made and made


def test_vdt_pretraining_runs_under_torchrun_on_two_cpu_processes(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    import yaml

    from inflation.checkpoint import read_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"name": "t", "data": str(write_image_folder(tmp_path / "images", per_class=4)),
              "model": "vit25d_tiny_patch16", "image_size": 32, "output": str(tmp_path / "out"),
              "overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": [5, 8, 8], "feature_size": 8},
              "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "ctseg", "pretrain-vdt", str(tmp_path / "cfg.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_checkpoint(tmp_path / "out" / "vdt.pt")["step"] == 3


def test_unreadable_pretraining_inputs_are_config_errors_naming_the_file(tmp_path):
    from inflation.config import ConfigError
    from inflation.pretrain_ssl import unlabelled_volumes
    from inflation.pretrain_vdt import vdt_volume
    from models.preprocess import PreprocessSpec

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ConfigError, match=r"broken.png is not a readable image"):
        vdt_volume(tmp_path / "broken.png", 8, 5, torch.Generator())
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "scan.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ConfigError, match=r"scan.nii.gz could not be read as a CT"):
        unlabelled_volumes(tmp_path / "ct", PreprocessSpec(spacing=(2.0, 2.0, 2.0), roi=(32, 32, 32)))
