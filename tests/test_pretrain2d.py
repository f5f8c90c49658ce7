"""``ctseg pretrain-2d`` -> an ordinary timm checkpoint -> ``ctseg inflate --weights`` -> ``ctseg train`` from it."""

from __future__ import annotations

import json

import torch
import yaml

import models.nets._torchvision_compat  # noqa: F401  (before timm)
import timm
from inflation.checkpoint import read_checkpoint
from inflation.pretrain2d import Pretrain2DConfig, pretrain_2d
from phantoms import write_dataset
from test_training import ctseg, tiny_config, write_config

BACKBONE = "vit_tiny_patch16_224"
LABELS = [{"name": "liver", "source": [1]}, {"name": "spleen", "source": [2]}, {"name": "kidney_left", "source": [3]}]


def test_pretrain_2d_saves_a_timm_checkpoint_that_inflates_and_trains(tmp_path):
    dataset = write_dataset(tmp_path / "data", n_cases=2, seed=1)
    config = {"name": "tiny-2d", "backbone": BACKBONE, "img_size": 32, "spacing": [2.0, 2.0, 2.0],
              "data": {"dataset": str(dataset), "labels": LABELS, "holdout_slab": [0.4, 0.6]},
              "steps": 40, "batch_size": 8, "lr": 0.001, "warmup_steps": 5, "log_every": 10,
              "output": str(tmp_path / "pre")}
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = pretrain_2d(Pretrain2DConfig.load(path))
    assert summary["last_loss"] < summary["first_loss"]  # it learns
    assert len(summary["holdout_slice_dice"]) == 3  # measured on the held-out slab only
    weights = tmp_path / "pre" / "vit2d.pth"
    state = torch.load(weights, weights_only=True)
    # an ordinary timm checkpoint of the named architecture (the grid of its position embedding aside)
    timm.create_model(BACKBONE, pretrained=False, img_size=32, num_classes=0).load_state_dict(state, strict=True)
    assert json.loads((tmp_path / "pre" / "pretrain2d.json").read_text())["backbone"] == BACKBONE

    inflated = tmp_path / "inflated"
    proc = ctseg("inflate", "--backbone", BACKBONE, "--weights", str(weights), "--patch", "8,8,8", "--roi", "32,32,32",
                 "--num-classes", "4", "--feature-size", "8", "--rule", "average", "--out", str(inflated))
    assert proc.returncode == 0, proc.stderr
    assert "0 dropped, 0 missing" in proc.stdout
    encoder = {k: v for k, v in read_checkpoint(inflated / "inflated.pt")["state_dict"].items()}
    assert torch.equal(encoder["encoder.blocks.5.mlp.fc1.weight"], state["blocks.5.mlp.fc1.weight"])

    train_cfg = tiny_config(dataset, tmp_path / "run", steps=2, val_every=100, ckpt_every=100)
    train_cfg["data"]["val_cases"] = 0
    # relative to the config file (ctseg runs from the repository root): like the data and the output
    train_cfg["model"] = {"name": "vit3d_tiny_patch16", "init_checkpoint": "inflated/inflated.pt"}
    train_cfg["preprocess"] = {"spacing": [3, 3, 3], "roi": [32, 32, 32]}
    proc = ctseg("train", str(write_config(tmp_path / "train.yaml", train_cfg)))
    assert proc.returncode == 0, proc.stderr
    assert "encoder initialised from" in proc.stderr
