"""bench/gpu_check.sh, the one prepared GPU run, in its dry-run mode: the same code on the CPU at tiny sizes, so the
script a GPU session runs (with minutes of device time and no second chance) has run in CI first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_table_in_its_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["matmul"][0]["tflops"] > 0
    engines = {(r["model"].split()[0], r["engine"], r["precision"]) for r in report["inference"]}
    assert ("demo-abdomen-ct", "ctseg torchscript", "fp32") in engines
    assert ("vit3d_tiny", "monai sliding_window_inference, eager", "fp32") in engines
    assert ("vit3d_tiny", "ctseg torchscript", "bf16") in engines
    fp32 = [r for r in report["inference"] if r["engine"] == "ctseg torchscript" and r["precision"] == "fp32"]
    assert all(r["argmax_agreement"] >= 0.995 for r in fp32), fp32  # the engine computes what MONAI computes
    assert report["encoder"][0]["tflops"] > 0
    (single, ddp) = report["training"]
    assert single["steps_per_s"] > 0 and ddp.get("world_size") == 1, ddp  # torchrun's path ran
