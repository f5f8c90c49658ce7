"""Precision records are keyed by (engine, precision) and name the runtime that made them: ``auto`` lowers precision
only where that exact pair passed; old manifests ({precision: check}) still load; ``ctseg check-precision`` measures
each engine present here, torch-free, and records what ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
from bundles import write_intensity_bundle
from common import DEMO_BUNDLE, REPO
from test_torch_free_serving import BLOCK_TORCH

from models.backends import (
    CPU_EP,
    CUDA_EP,
    Hardware,
    available_engines,
    choose,
    supported_precisions,
)
from models.bundle import MANIFEST, BundleError, load_bundle, write_manifest
from models.precision import REFERENCE, EngineKind, Precision, PrecisionCheck
from server.inference.engine import Engine

FIXTURE_CT = Path(__file__).resolve().parent / "fixtures" / "ct_abdomen_slab" / "ct.nii.gz"
HW = Hardware.probe()
OPENVINO_F16 = Hardware((CPU_EP,), "test", ("FP32", "BF16", "FP16"))  # a Xeon with AVX-512 FP16 / AMX
WITH_CUDA = Hardware((CUDA_EP, CPU_EP), None, ())


def record(runtime: str, agreement: float = 0.9999, **key: str) -> dict:
    """A manifest record as ``ctseg export`` wrote it (``key``: the first format's ``precision`` field)."""
    return {**key, "runtime": runtime, "windows": 12, "argmax_agreement": agreement,
            "per_class_dice": {"liver": 0.999}, "data": "a whole real CT: 12 windows", "passed": True}


def with_precisions(directory: Path, section: object) -> Path:
    write_intensity_bundle(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    write_manifest(directory, {**manifest, "precisions": section})
    return directory


def test_an_fp16_record_made_by_onnxruntime_does_not_let_auto_enable_openvino_f16_or_cuda_fp16(tmp_path):
    # the shipped demo bundle's own manifest: fp16 measured with ONNX Runtime's fp16 graph on a CPU
    demo = load_bundle(DEMO_BUNDLE, verify_checksums=False).precisions
    for hw, engine in ((OPENVINO_F16, EngineKind.OPENVINO), (WITH_CUDA, EngineKind.CUDA)):
        choice = choose("auto", "auto", "auto", {k: v for k, v in demo.items() if k[1] == Precision.FP16}, hw)
        assert (choice.engine, choice.precision) == (engine, Precision.FP32)
        assert f"never checked on {engine.value} (only on onnxruntime" in choice.reason
    # the same figures made by the engine itself do count
    ov_f16 = PrecisionCheck(EngineKind.OPENVINO, Precision.FP16, "openvino CPU f16", 12, 0.9999, {}, "a real CT")
    assert choose("auto", "auto", "cpu", {ov_f16.key: ov_f16}, OPENVINO_F16).precision == Precision.FP16
    # a real engine on this machine: whatever auto picks here, that record lowers nothing
    bundle = with_precisions(tmp_path / "b", {"onnxruntime": {"fp16": record("onnxruntime 1.x CPU fp16")}})
    engine = Engine.from_dir(bundle, threads=1, batch_size=1)
    assert engine.choice.precision == Precision.FP32
    assert engine.warm_up() >= 0


def test_an_old_format_manifest_loads_each_record_keyed_by_the_engine_its_runtime_names(tmp_path, caplog):
    old = {"bf16": record("openvino cpu bf16", precision="bf16"),
           "fp16": record("onnxruntime cuda, the fp16 graph of the CUDA engine", precision="fp16")}
    checks = load_bundle(with_precisions(tmp_path / "old", old)).precisions
    assert set(checks) == {(EngineKind.OPENVINO, Precision.BF16), (EngineKind.CUDA, Precision.FP16)}
    assert checks[EngineKind.CUDA, Precision.FP16].runtime.startswith("onnxruntime cuda")
    # a runtime that serves nothing (PyTorch): the bundle loads, the record is trusted for no engine
    torch_made = {"fp16": record("torch cpu float16", precision="fp16")}
    assert load_bundle(with_precisions(tmp_path / "torch", torch_made)).precisions == {}
    assert "names no engine that serves it" in caplog.text
    # the current format: "passed" is recomputed from the figures, unknown engines are named
    tampered = {"openvino": {"bf16": {**record("openvino CPU bf16", agreement=0.9), "passed": True}}}
    assert not load_bundle(with_precisions(tmp_path / "new", tampered)).precisions[EngineKind.OPENVINO,
                                                                                    Precision.BF16].passed
    with pytest.raises(BundleError, match="'tpu' is not an engine"):
        load_bundle(with_precisions(tmp_path / "tpu", {"tpu": {"fp16": record("tpu")}}))
    with pytest.raises(ValueError, match="reference"):
        PrecisionCheck(*REFERENCE, "onnxruntime", 1, 1.0, {}, "")


def test_check_precision_measures_each_engine_here_torch_free_and_records_it_keyed_by_engine(tmp_path):
    elsewhere = {"fp16": record("onnxruntime cuda, the fp16 graph of the CUDA engine", precision="fp16")}
    bundle = with_precisions(tmp_path / "bundle", elsewhere)
    before = (bundle / MANIFEST).read_bytes()

    def check_precision(*extra: str) -> subprocess.CompletedProcess:
        code = BLOCK_TORCH + f"""
from ctseg.cli import main
sys.exit(main(['check-precision', {str(bundle)!r}, '--ct', {str(FIXTURE_CT)!r}, *{list(extra)!r}]))
"""
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                              check=False)

    dry = check_precision("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (bundle / MANIFEST).read_bytes() == before and "not recorded" in dry.stdout

    done = check_precision()
    assert done.returncode == 0, done.stderr
    # torch is blocked in the command, so its torchscript engine is absent there
    here = {(e, p) for e in available_engines(HW) if e != EngineKind.TORCHSCRIPT
            for p in supported_precisions(e, HW)} - {REFERENCE}
    assert (EngineKind.OPENVINO, Precision.FP32) in here  # openvino is a base dependency
    section = json.loads((bundle / MANIFEST).read_text())["precisions"]
    assert set(section) <= {e.value for e in EngineKind}  # rewritten in the current format: engine -> precision
    checks = load_bundle(bundle).precisions  # checksums still hold
    assert here <= set(checks)
    for engine, precision in here:
        ran = checks[engine, precision]
        package = "openvino" if engine == EngineKind.OPENVINO else "onnxruntime"
        version = HW.openvino_version if engine == EngineKind.OPENVINO else onnxruntime.__version__
        assert ran.runtime.startswith(f"{package} {version} "), ran.runtime
        assert ran.windows > 0 and "whole real CT" in ran.data and "liver" in ran.per_class_dice
        assert f"{engine.value} {precision.value}: " in done.stdout
    if (EngineKind.CUDA, Precision.FP16) not in here:  # measured on another machine: kept
        assert checks[EngineKind.CUDA, Precision.FP16].runtime.startswith("onnxruntime cuda")
