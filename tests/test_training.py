"""Training on a synthetic phantom dataset, resume, DDP through torchrun, and export to a bundle."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from inflation.checkpoint import read_checkpoint
from inflation.config import ConfigError, TrainConfig
from inflation.export import export_bundle
from models.bundle import BundleError, load_bundle
from phantoms import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(dataset: Path, output: Path, **train: object) -> dict:
    return {
        "name": "phantom-organs",
        "version": "0.0.1",
        "data": {
            "dataset": str(dataset),
            "labels": [{"name": "liver", "source": [1]}, {"name": "spleen", "source": [2]},
                       {"name": "kidney_left", "source": [3]}],
            "val_cases": 1,
        },
        "model": {"name": "vit3d_tiny_patch16",
                  "overrides": {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": [8, 8, 8], "feature_size": 8}},
        "preprocess": {"spacing": [3, 3, 3], "roi": [32, 32, 32]},
        "augment": {"rotate_prob": 0.2, "zoom_prob": 0.2},
        "train": {"steps": 200, "batch_size": 2, "crops_per_case": 2, "lr": 0.002, "warmup_steps": 10, "background_ratio": 0.5,
                  "val_every": 50, "ckpt_every": 50, **train},
        "output": str(output),
    }


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("phantoms"), n_cases=4, seed=0)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def ctseg(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctseg", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def trained(phantom_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    cfg = write_config(root / "cfg.yaml", tiny_config(phantom_dataset, root / "out"))
    proc = ctseg("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "out"


def test_tiny_model_learns_the_phantom_organs(trained: Path):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 200
    per_class = metrics["validation"]["per_class"]
    assert metrics["validation"]["mean_dice"] >= 0.9, per_class
    assert all(d is not None and d > 0.8 for d in per_class), per_class
    assert (trained / "final.pt").is_file() and any((trained / "tensorboard").iterdir())


def test_resume_continues_with_the_same_optimizer_and_scheduler(phantom_dataset: Path, tmp_path: Path):
    cfg = tiny_config(phantom_dataset, tmp_path / "out", steps=8, ckpt_every=4, val_every=100, warmup_steps=3)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    assert ctseg("train", str(path), "--max-steps", "4").returncode == 0
    first = read_checkpoint(tmp_path / "out" / "last.pt")
    assert first["step"] == 4 and first["scheduler"]["last_epoch"] == 4
    shutil.copy(tmp_path / "out" / "last.pt", tmp_path / "step4.pt")
    proc = ctseg("train", str(path), "--resume", str(tmp_path / "step4.pt"), "--max-steps", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = read_checkpoint(tmp_path / "out" / "last.pt")
    assert resumed["step"] == 5
    # Adam's step counters and the LR schedule go on from 4, not from a fresh start.
    assert all(int(s["step"]) == 5 for s in resumed["optimizer"]["state"].values())
    assert resumed["scheduler"]["last_epoch"] == 5
    assert resumed["scheduler"]["_last_lr"] != first["scheduler"]["_last_lr"]
    state4 = first["optimizer"]["state"][0]["exp_avg_sq"]
    state5 = resumed["optimizer"]["state"][0]["exp_avg_sq"]
    # v5 = 0.999 * v4 + 0.001 * g^2 >= 0.999 * v4: a reset optimizer would hold 0.001 * g^2 alone.
    assert torch.all(state5 >= 0.999 * state4 - 1e-12), "second moments were reset instead of continued"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_agree_on_the_weights(phantom_dataset: Path, tmp_path: Path):
    cfg = tiny_config(phantom_dataset, tmp_path / "out", steps=3, val_every=100, ckpt_every=100, batch_size=1)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ctseg", "train", str(path)]
    # gloo on the loopback interface only: with container bridges present it may otherwise pick an address the
    # other rank cannot reach and wait forever.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ddp_weights_agree"] is True and metrics["steps"] == 3


def test_export_parity_and_manifest(trained: Path, tmp_path: Path):
    bundle_dir = tmp_path / "bundle"
    manifest = export_bundle(trained / "final.pt", bundle_dir)
    for backend in ("onnxruntime", "torchscript"):
        assert manifest["parity"][backend]["max_abs_logit_diff"] < 1e-3
        assert manifest["parity"][backend]["argmax_agreement"] >= 0.999
    bundle = load_bundle(bundle_dir)
    assert bundle.name == "phantom-organs" and [l.name for l in bundle.labels] == ["liver", "spleen", "kidney_left"]
    assert bundle.labels[0].type.value == "10200004"  # SNOMED CT Liver from the built-in table
    assert bundle.model.img_size == (32, 32, 32) and bundle.preprocess.spacing == (3.0, 3.0, 3.0)
    assert manifest["metrics"]["mean_dice"] >= 0.9
    import onnx

    graph = onnx.load(str(bundle_dir / "model.onnx"))
    assert graph.opset_import[0].version >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch


def test_bundle_validation_errors(trained: Path, tmp_path: Path):
    good = tmp_path / "good"
    export_bundle(trained / "final.pt", good)

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(good, target)
        return target

    tampered = copy("tampered")
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="checksum mismatch for model.onnx"):
        load_bundle(tampered)

    no_field = copy("no_field")
    manifest = json.loads((no_field / "ctseg.json").read_text())
    del manifest["preprocess"]
    (no_field / "ctseg.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="missing field.*preprocess"):
        load_bundle(no_field)

    bad_labels = copy("bad_labels")
    manifest = json.loads((bad_labels / "ctseg.json").read_text())
    manifest["labels"] = manifest["labels"][:2]
    (bad_labels / "ctseg.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"labels must be numbered 1\.\.3"):
        load_bundle(bad_labels)

    missing_file = copy("missing_file")
    (missing_file / "model.ts").unlink()
    with pytest.raises(BundleError, match="model.ts is listed in ctseg.json but missing"):
        load_bundle(missing_file)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_config_errors_name_the_field(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"config.train: unknown field\(s\) \['stpes'\]"):
        TrainConfig.from_dict({"name": "x", "data": {"dataset": "d", "labels": [{"name": "liver", "source": [1]}]},
                               "train": {"stpes": 3}})
    bad = write_config(tmp_path / "bad.yaml", {"name": "x", "data": {"dataset": str(tmp_path), "labels": []}})
    proc = ctseg("train", str(bad))
    assert proc.returncode == 2 and "labels: a non-empty list" in proc.stderr and "Traceback" not in proc.stderr
