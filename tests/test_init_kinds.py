"""Every way to start fine-tuning, and the 2.5D and BEiT models, through the whole product: ``train`` a few steps
-> ``export`` (ONNX with parity, fixed ROI, dynamic batch) -> the unchanged server -> a label map on the input
grid. Plus ``ctseg compare`` end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from fastapi.testclient import TestClient
from helpers_torch import timm_model
from phantoms import make_phantom, write_dataset
from test_swin_and_pretraining import vdt_run, write_image_folder, write_released_format  # noqa: F401

from inflation.config import TrainConfig
from inflation.export import export_bundle
from inflation.train import train
from models.bundle import load_bundle
from server.app import create_app
from server.core.settings import Settings

TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2, "feature_size": 8}
LABELS = [{"name": "liver", "source": [1]}, {"name": "spleen", "source": [2]}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n_cases=2, seed=2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, vdt_run) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("weights")
    timm_file = root / "vit_tiny.pth"
    torch.save({"model": timm_model("vit_tiny_patch16_224").state_dict()}, timm_file)
    write_released_format(root / "model_swinvit.pt")
    return {"timm": timm_file, "swin": root / "model_swinvit.pt", "vdt": vdt_run[0] / "vdt.pt"}


def config(kind: str, dataset: Path, out: Path, weights: dict[str, Path], scratch_ckpt: Path | None = None) -> dict:
    model: dict
    roi: list[int] = [32, 32, 32]
    if kind == "scratch":
        model = {"name": "vit3d_tiny_patch16", "overrides": {**TINY_VIT, "patch_size": [8, 8, 8]}, "init": "scratch"}
    elif kind == "checkpoint":
        model = {"name": "vit3d_tiny_patch16", "overrides": {**TINY_VIT, "patch_size": [8, 8, 8]},
                 "init": "checkpoint", "init_checkpoint": str(scratch_ckpt)}
    elif kind == "inflate":
        model = {"name": "vit3d_tiny_patch16", "overrides": {"patch_size": [16, 16, 16], "feature_size": 8},
                 "init": "inflate", "backbone": "vit_tiny_patch16_224", "weights": str(weights["timm"]), "rule": "average"}
    elif kind == "swin-ssl":
        model = {"name": "swin_unetr_f24", "overrides": {"feature_size": 12}, "init": "swin-ssl",
                 "weights": str(weights["swin"])}
        roi = [32, 32, 64]
    elif kind == "vdt-2.5d":
        model = {"name": "vit25d_tiny_patch16", "overrides": {**TINY_VIT, "patch_size": [5, 8, 8]}, "init": "vdt",
                 "weights": str(weights["vdt"])}
        roi = [5, 32, 32]
    elif kind == "beit-2.5d":
        model = {"name": "beit25d_base_patch16", "overrides": {**TINY_VIT, "patch_size": [5, 8, 8]}, "init": "scratch"}
        roi = [5, 32, 32]
    else:
        raise AssertionError(kind)
    return {"name": f"t-{kind}", "data": {"dataset": str(dataset), "labels": LABELS, "val_cases": 1},
            "model": model, "preprocess": {"spacing": [3, 3, 3], "roi": roi},
            "augment": {"rotate_prob": 0.0, "zoom_prob": 0.0},
            "train": {"steps": 2, "batch_size": 1, "crops_per_case": 1, "val_every": 2, "ckpt_every": 2,
                      "warmup_steps": 1}, "output": str(out)}


@pytest.fixture(scope="module")
def scratch_run(dataset, tmp_path_factory, weights) -> Path:
    out = tmp_path_factory.mktemp("scratch")
    train(TrainConfig.from_dict(config("scratch", dataset, out / "run", weights)))
    return out / "run" / "final.pt"


@pytest.mark.parametrize("kind", ["scratch", "checkpoint", "inflate", "swin-ssl", "vdt-2.5d", "beit-2.5d"])
def test_train_export_serve(kind, dataset, weights, scratch_run, tmp_path):
    cfg = TrainConfig.from_dict(config(kind, dataset, tmp_path / "run", weights, scratch_run))
    result = train(cfg)
    assert result["steps"] == 2
    manifest = export_bundle(tmp_path / "run" / "final.pt", tmp_path / "bundle")
    assert manifest["init"]["kind"] == cfg.model.init
    assert manifest["parity"]["onnxruntime"]["max_abs_logit_diff"] < 1e-3
    bundle = load_bundle(tmp_path / "bundle")
    assert list(bundle.model.img_size) == cfg.preprocess.roi

    image, _ = make_phantom(shape_xyz=(44, 40, 30), spacing_xyz=(2.2, 2.0, 2.5), orientation="ras", seed=4)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    settings = Settings(bundle_dirs=[tmp_path / "bundle"], storage_dir=tmp_path / "storage", worker_mode="thread")
    with TestClient(create_app(settings)) as client:
        files = [("files", ("ct.nii.gz", (tmp_path / "ct.nii.gz").read_bytes(), "application/octet-stream"))]
        r = client.post("/v1/segmentations", files=files, params={"wait": "true"})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["state"] == "succeeded", job
        labelmap = client.get(f"/v1/segmentations/{job['id']}/labelmap.nii.gz")
        assert labelmap.status_code == 200
    (tmp_path / "out.nii.gz").write_bytes(labelmap.content)
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert out.GetSize() == image.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1, 2}


def test_compare_writes_its_table(dataset, weights, tmp_path):
    from inflation.compare import compare

    base = config("scratch", dataset, tmp_path / "cmp", weights)
    base["train"] = {**base["train"], "steps": 4, "val_every": 2}
    base["compare"] = {"threshold": 0.01, "runs": [
        {"name": "scratch", "model": {"init": "scratch"}},
        {"name": "inflated", "model": config("inflate", dataset, tmp_path, weights)["model"]},
        {"name": "vdt", "model": config("vdt-2.5d", dataset, tmp_path, weights)["model"],
         "preprocess": {"roi": [5, 32, 32]}},
    ]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(base))
    table = compare(path)
    assert [r["name"] for r in table["runs"]] == ["scratch", "inflated", "vdt"]
    for row in table["runs"]:
        assert row["steps"] == 4 and row["seconds"] > 0 and set(row["per_class"]) == {"liver", "spleen"}
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["runs"][1]["init"] == "inflate"
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| run | init | model | liver | spleen | mean Dice | steps to 0.01 | wall time |" in md
    assert (tmp_path / "cmp" / "vdt" / "config.yaml").is_file()
