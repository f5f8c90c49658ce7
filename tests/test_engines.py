"""Inference backends: each one available here against ONNX Runtime fp32 on a real CT; choosing engines and
precisions, and refusing named ones that cannot run; IO binding; the export-time parity check; GPU paths where a
GPU is present (reported as skipped, with the reason, where not)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from common import DEMO_BUNDLE, REPO

from models.backends import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    Choice,
    EngineKind,
    EngineUnavailable,
    Hardware,
    OrtBackend,
    choose,
    supported_precisions,
)
from models.bundle import load_bundle
from models.precision import MIN_AGREEMENT, MIN_CLASS_DICE, Precision, PrecisionCheck
from server.inference.engine import Engine

FIXTURE_CT = Path(__file__).resolve().parent / "fixtures" / "ct_abdomen_slab" / "ct.nii.gz"
HW = Hardware.probe()
CPU_ONLY = Hardware((CPU_EP,), None, ())
OPENVINO_BF16 = Hardware((CPU_EP,), "test", ("FP32", "BF16"))
WITH_CUDA = Hardware((TENSORRT_EP, CUDA_EP, CPU_EP), None, ())
no_cuda = pytest.mark.skipif(not HW.cuda, reason="no CUDA here: onnxruntime-gpu and a GPU are needed")


def check(engine: EngineKind, precision: Precision, agreement: float, dice: float = 1.0) -> PrecisionCheck:
    return PrecisionCheck(engine, precision, "test", 8, agreement, {"liver": dice}, "test windows")


def records(*checks: PrecisionCheck) -> dict:
    return {c.key: c for c in checks}


@pytest.fixture(scope="module")
def prepared():
    engine = Engine.from_dir(DEMO_BUNDLE, engine="onnxruntime", precision="fp32", threads=2)
    return engine.preprocessor.forward(sitk.ReadImage(str(FIXTURE_CT)), with_body=True)


@pytest.fixture(scope="module")
def reference(prepared):
    engine = Engine.from_dir(DEMO_BUNDLE, engine="onnxruntime", precision="fp32", threads=2)
    return engine.window(prepared.array, engine.predict_windows, body=prepared.body)


def available_cpu_combinations() -> list:
    combos = [("onnxruntime", "fp32")]
    if HW.openvino_version:
        combos += [("openvino", p.value) for p in supported_precisions(EngineKind.OPENVINO, HW)]
    return combos


@pytest.mark.parametrize("engine,precision", available_cpu_combinations())
def test_each_cpu_backend_matches_onnxruntime_fp32_on_a_real_ct(engine, precision, prepared, reference):
    served = Engine.from_dir(DEMO_BUNDLE, engine=engine, precision=precision, threads=2)
    assert served.choice.engine.value == engine and served.choice.precision.value == precision
    labels = served.window(prepared.array, served.predict_windows, body=prepared.body)
    assert (labels == reference).mean() >= MIN_AGREEMENT
    # Dice on the organs this 20-slice fixture holds whole enough to judge (the export check judges every class
    # over a whole CT; here a 400-voxel adrenal tip loses 2 % to one boundary voxel ring)
    for value in range(1, served.bundle.num_classes):
        p, q = reference == value, labels == value
        if p.sum() >= 2000:
            assert 2 * (p & q).sum() / (p.sum() + q.sum()) >= MIN_CLASS_DICE, value


def test_openvino_is_installed_and_auto_picks_it_on_cpu():
    # the base install ships OpenVINO (pyproject): auto must not silently fall back to the slower runtime
    assert HW.openvino_version, "openvino is a base dependency"
    choice = choose("auto", "fp32", "cpu", {})
    assert choice.engine == EngineKind.OPENVINO and choice.device == "cpu"


def test_named_engines_and_precisions_that_cannot_run_are_refused_naming_them():
    with pytest.raises(EngineUnavailable, match="CTSEG_ENGINE=cuda.*CUDAExecutionProvider"):
        choose("cuda", "auto", "auto", {}, CPU_ONLY)
    with pytest.raises(EngineUnavailable, match="CTSEG_ENGINE=tensorrt.*TensorrtExecutionProvider"):
        choose("tensorrt", "auto", "auto", {}, CPU_ONLY)
    with pytest.raises(EngineUnavailable, match="CTSEG_ENGINE=openvino.*not installed"):
        choose("openvino", "auto", "auto", {}, CPU_ONLY)
    with pytest.raises(EngineUnavailable, match="CTSEG_PRECISION=bf16.*onnxruntime.*available: fp32"):
        choose("onnxruntime", "bf16", "cpu", {}, OPENVINO_BF16)
    with pytest.raises(EngineUnavailable, match="CTSEG_PRECISION=fp16.*openvino"):
        choose("openvino", "fp16", "cpu", {}, OPENVINO_BF16)
    with pytest.raises(EngineUnavailable, match="CTSEG_DEVICE=cpu"):
        choose("cuda", "auto", "cpu", {}, WITH_CUDA)
    with pytest.raises(ValueError):
        choose("tpu", "auto", "auto", {}, CPU_ONLY)


def test_a_cuda_preference_falls_back_to_cpu_with_a_log_line(caplog):
    choice = choose("auto", "auto", "cuda", {}, CPU_ONLY)
    assert choice.engine == EngineKind.ONNXRUNTIME and choice.device == "cpu"
    assert "CUDA was asked for" in caplog.text and "serving on the CPU" in caplog.text
    assert choose("auto", "auto", "auto", {}, WITH_CUDA).engine == EngineKind.CUDA


def test_auto_precision_lowers_only_where_the_bundle_passed_the_parity_check():
    ov, cuda = EngineKind.OPENVINO, EngineKind.CUDA
    passed = records(check(ov, Precision.BF16, 0.9995), check(cuda, Precision.FP16, 0.9999))
    assert choose("auto", "auto", "cpu", passed, OPENVINO_BF16).precision == Precision.BF16
    assert choose("auto", "auto", "cpu", {}, OPENVINO_BF16).precision == Precision.FP32
    failed_agreement = records(check(ov, Precision.BF16, 0.990))
    failed_dice = records(check(ov, Precision.BF16, 0.9999, dice=0.95))
    for checks in (failed_agreement, failed_dice):
        choice = choose("auto", "auto", "cpu", checks, OPENVINO_BF16)
        assert choice.precision == Precision.FP32 and "failed" in choice.reason
    assert choose("auto", "auto", "cpu", passed, CPU_ONLY).precision == Precision.FP32  # no BF16 units
    assert choose("auto", "auto", "auto", passed, WITH_CUDA).precision == Precision.FP16
    # named: served as asked, with a warning when unchecked
    assert choose("openvino", "bf16", "cpu", {}, OPENVINO_BF16).precision == Precision.BF16


def test_io_binding_gives_the_plain_run_answer(tmp_path):
    bundle = load_bundle(DEMO_BUNDLE)
    choice = Choice(EngineKind.ONNXRUNTIME, Precision.FP32, "test")
    plain = OrtBackend(bundle, choice, threads=2, io_binding=False)
    bound = OrtBackend(bundle, choice, threads=2, io_binding=True)
    rng = np.random.default_rng(0)
    for n in (3, 1, 3):  # buffers per batch size, reused
        x = rng.random((n, 1, *bundle.model.img_size), dtype=np.float32)
        np.testing.assert_allclose(np.array(bound(x)), plain(x), atol=1e-5)
    assert sorted(bound._bound) == [1, 3]


# (CTSEG_ENGINE, CTSEG_PRECISION) pairs that some machines cannot run; onnxruntime fp16 none can (the CPU engine
# runs fp32 only), so at least one case is always left whatever this machine offers
REFUSAL_CANDIDATES = (("tensorrt", "auto"), ("cuda", "auto"), ("auto", "fp16"), ("auto", "bf16"),
                      ("openvino", "fp16"), ("openvino", "bf16"), ("onnxruntime", "fp16"))


def impossible_here() -> list[tuple[str, str, str]]:
    """(engine, precision, what the refusal names) for the candidates this machine cannot run, as detected by the
    chooser itself on the probed hardware (OpenVINO's CPU capabilities, onnxruntime's providers): never an
    assumption about the processor (OpenVINO serves f16 on a Xeon with AVX-512 FP16 / AMX-FP16, not on an AVX2
    EPYC)."""
    found = []
    for engine, precision in REFUSAL_CANDIDATES:
        try:
            choose(engine, precision, "auto", {}, HW)
        except EngineUnavailable as err:
            named = f"CTSEG_ENGINE={engine}" if f"CTSEG_ENGINE={engine}" in str(err) else f"CTSEG_PRECISION={precision}"
            found.append((engine, precision, named))
    return found


def serve_until_it_exits(env: dict[str, str], timeout: float = 60) -> tuple[int | None, str]:
    """Run ``ctseg serve``; (exit status, output). A server that starts after all is stopped at its first line
    about serving and answers (None, output): the test fails at once instead of waiting on a listening server.
    Its port is one this test holds, so even unnoticed it cannot listen; a timer is the last resort."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        proc = subprocess.Popen([sys.executable, "-m", "ctseg", "serve", "--port", str(held.getsockname()[1])],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        lines: list[str] = []
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if "Started server process" in line or "Waiting for application startup" in line:
                    proc.kill()
                    proc.wait()
                    return None, "".join(lines)
            return proc.wait(), "".join(lines)
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_serve_refuses_to_start_with_an_engine_it_cannot_run(tmp_path):
    env = {"CTSEG_BUNDLE_DIRS": str(DEMO_BUNDLE), "CTSEG_STORAGE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    cases = impossible_here()
    by_engine = [c for c in cases if c[2].startswith("CTSEG_ENGINE")][:1]  # one of each kind keeps it quick
    by_precision = [c for c in cases if c[2].startswith("CTSEG_PRECISION")][:1]
    assert by_precision, "onnxruntime fp16 is impossible everywhere"
    for engine, precision, named in by_engine + by_precision:
        status, output = serve_until_it_exits({**env, "CTSEG_ENGINE": engine, "CTSEG_PRECISION": precision})
        assert status == 2, f"CTSEG_ENGINE={engine} CTSEG_PRECISION={precision} is impossible here: {output}"
        assert named in output and "Traceback" not in output


def test_models_endpoint_says_which_engine_and_precision_serve(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.core.settings import Settings

    settings = Settings(bundle_dirs=[DEMO_BUNDLE], storage_dir=tmp_path, worker_mode="thread", engine="onnxruntime")
    with TestClient(create_app(settings)) as client:
        model = client.get("/v1/models").json()["models"][0]
    assert (model["engine"], model["precision"], model["device"]) == ("onnxruntime", "fp32", "cpu")
    assert model["precision_reason"]


def test_the_shipped_demo_bundle_carries_its_precision_checks():
    # its manifest has the first format ({precision: check}): each record counts for the engine its runtime names
    checks = load_bundle(DEMO_BUNDLE).precisions
    assert set(checks) == {(EngineKind.OPENVINO, Precision.BF16), (EngineKind.ONNXRUNTIME, Precision.FP16)}
    assert all("real CT" in c.data and c.passed for c in checks.values())


# ------------------------------------------------------------------------------------------------ GPU
@no_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_backend_matches_cpu_fp32(precision, prepared, reference):
    served = Engine.from_dir(DEMO_BUNDLE, engine="cuda", precision=precision)
    assert served.device == "cuda"
    labels = served.window(prepared.array, served.predict_windows, body=prepared.body)
    assert served.backend.io_binding
    assert (labels == reference).mean() >= MIN_AGREEMENT


@no_cuda
def test_tensorrt_backend_writes_its_engine_cache(tmp_path, prepared, reference):
    if TENSORRT_EP not in HW.ort_providers:
        pytest.skip("onnxruntime-gpu here has no TensorRT provider")
    served = Engine.from_dir(DEMO_BUNDLE, engine="tensorrt", precision="fp16", trt_cache_dir=tmp_path / "trt")
    labels = served.window(prepared.array, served.predict_windows, body=prepared.body)
    assert (labels == reference).mean() >= MIN_AGREEMENT
    assert any((tmp_path / "trt").iterdir())
