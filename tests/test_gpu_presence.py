"""The GPU-presence decision (models/gpu.py) and what the engine chooser makes of it (models/backends.py).

Runs without a GPU: the driver is the real libcuda.so.1 where one is installed, absent here, and a small C library
built by the test that exports the driver API's five calls, so the ctypes calls and every branch (no driver, not a
driver, cuInit refusing, devices found) run for real.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from common import require_tool

from models import gpu
from models.backends import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    EngineUnavailable,
    Hardware,
    choose,
)
from models.gpu import GpuPresence, probe_driver

# A stand-in for libcuda.so.1: the result of cuInit and the device count come from the environment.
FAKE_DRIVER = r"""
#include <stdlib.h>
#include <string.h>
static int env(const char *name, int fallback) { const char *v = getenv(name); return v ? atoi(v) : fallback; }
int cuInit(unsigned int flags) { return flags ? 1 : env("FAKE_CU_INIT", 0); }
int cuDeviceGetCount(int *count) { *count = env("FAKE_CU_DEVICES", 0); return 0; }
int cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
int cuDeviceGetName(char *name, int len, int device) { strncpy(name, "Fake GPU", len); return 0; }
int cuDriverGetVersion(int *version) { *version = 13000; return 0; }
int cuGetErrorName(int rc, const char **name) { *name = rc == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN"; return 0; }
"""


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = require_tool(shutil.which("cc") or shutil.which("gcc"), "a C compiler (gcc) to build a stand-in CUDA driver")
    root = tmp_path_factory.mktemp("driver")
    (root / "fake_cuda.c").write_text(FAKE_DRIVER)
    lib = root / "libcuda-fake.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(root / "fake_cuda.c")], check=True)
    return str(lib)


def test_this_machine_without_a_gpu_reports_none() -> None:
    """No NVIDIA device node, no GPU: whatever libcuda does here (absent on CI), the answer is "none" with a why."""
    if list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has an NVIDIA device node")
    presence = probe_driver()
    assert not presence.found and presence.devices == 0
    assert presence.detail


def test_a_missing_driver_is_no_device_not_an_error() -> None:
    presence = probe_driver("libcuda-that-is-not-installed.so.1")
    assert presence == GpuPresence(0, presence.detail)
    assert presence.detail.startswith("no NVIDIA driver here: libcuda-that-is-not-installed.so.1")


def test_a_library_that_is_not_a_cuda_driver() -> None:
    presence = probe_driver("libc.so.6")
    assert not presence.found
    assert "not a CUDA driver" in presence.detail


def test_a_driver_that_sees_no_device(fake_driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a host with the driver but no visible GPU (CUDA_VISIBLE_DEVICES="") answers: cuInit's error, named."""
    monkeypatch.setenv("FAKE_CU_INIT", "100")
    presence = probe_driver(fake_driver)
    assert not presence.found
    assert presence.detail == "cuInit failed: CUDA_ERROR_NO_DEVICE (100)"
    monkeypatch.setenv("FAKE_CU_INIT", "0")
    monkeypatch.setenv("FAKE_CU_DEVICES", "0")
    assert probe_driver(fake_driver) == GpuPresence(0, "the CUDA driver sees no device")


def test_a_driver_with_devices(fake_driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CU_INIT", "0")
    monkeypatch.setenv("FAKE_CU_DEVICES", "2")
    assert probe_driver(fake_driver) == GpuPresence(2, "Fake GPU, driver 13.0")


def test_the_answer_is_asked_and_logged_once(caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Once per process, and once per service: a spawned worker (which inherits the marker) logs it at DEBUG."""
    monkeypatch.delenv(gpu.LOGGED_ENV, raising=False)
    gpu.gpus.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="models.gpu"):
            first, second = gpu.gpus(), gpu.gpus()
            gpu.gpus.cache_clear()  # what a spawned worker process starts with: no answer, the marker inherited
            again = gpu.gpus()
    finally:
        gpu.gpus.cache_clear()
    assert first is second and again == first
    records = [r for r in caplog.records if r.name == "models.gpu"]
    assert [r.levelno for r in records] == [logging.INFO, logging.DEBUG]
    if not first.found:
        line = records[0].getMessage()
        assert line.startswith("no GPU found (") and line.endswith("): inference runs on the CPU")


NO_GPU = GpuPresence(0, "no NVIDIA driver here: libcuda.so.1: cannot open shared object file")
GPU_IMAGE_PROVIDERS = (TENSORRT_EP, CUDA_EP, CPU_EP)  # what onnxruntime-gpu lists on any host, GPU or not


def test_the_cuda_providers_without_a_gpu_are_set_aside() -> None:
    hw = Hardware.of(GPU_IMAGE_PROVIDERS, None, (), NO_GPU)
    assert hw.ort_providers == (CPU_EP,) and not hw.cuda
    assert hw.gpu_missing == NO_GPU.detail
    with_gpu = Hardware.of(GPU_IMAGE_PROVIDERS, None, (), GpuPresence(1, "Fake GPU, driver 13.0"))
    assert with_gpu.ort_providers == GPU_IMAGE_PROVIDERS and with_gpu.cuda and with_gpu.gpu_missing is None
    cpu_wheel = Hardware.of((CPU_EP,), None, (), NO_GPU)  # the CPU image: nothing set aside, nothing to say
    assert cpu_wheel.gpu_missing is None


def test_the_gpu_image_without_a_gpu_serves_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    hw = Hardware.of(GPU_IMAGE_PROVIDERS, None, (), NO_GPU)
    assert choose("auto", "auto", "auto", {}, hw).device == "cpu"
    with caplog.at_level(logging.WARNING, logger="models.backends"):
        choice = choose("auto", "auto", "cuda", {}, hw)  # docker-compose.gpu.yml's CTSEG_DEVICE=cuda
    assert choice.device == "cpu" and choice.engine.value == "onnxruntime"
    assert any("CTSEG_DEVICE=cuda) but no GPU was found" in r.getMessage() and "serving on the CPU" in r.getMessage()
               for r in caplog.records)
    for engine in ("cuda", "tensorrt"):
        with pytest.raises(EngineUnavailable, match=f"CTSEG_ENGINE={engine}: onnxruntime-gpu is installed but no GPU"):
            choose(engine, "auto", "auto", {}, hw)


def test_with_a_gpu_the_cuda_engine_is_chosen() -> None:
    hw = Hardware.of(GPU_IMAGE_PROVIDERS, None, (), GpuPresence(1, "Fake GPU, driver 13.0"))
    assert choose("auto", "auto", "auto", {}, hw).describe() == "cuda cuda fp32"
