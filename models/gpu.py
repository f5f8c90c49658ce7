"""Whether this machine has a CUDA GPU: the one place that decides it (models/backends.py asks, for every engine).

Why the driver is asked: onnxruntime-gpu lists ``CUDAExecutionProvider`` wherever its wheels are installed, GPU or
not, and the CUDA image runs on hosts without one; ``torch.cuda.is_available()`` would import torch into the
torch-free server. The CUDA driver API answers without either: ``libcuda.so.1`` (installed with the NVIDIA driver,
mounted into a container by the NVIDIA container toolkit), ``cuInit`` then ``cuDeviceGetCount``. It honours
``CUDA_VISIBLE_DEVICES`` as every CUDA program does. ``cuInit`` opens no context, and ctseg's worker processes are
spawned, not forked, so asking in the API process costs them nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

DRIVER_LIBRARY = "libcuda.so.1"
CUDA_SUCCESS = 0
LOGGED_ENV = "CTSEG_GPU_PRESENCE_LOGGED"  # set once this process has logged the answer; its children inherit it


@dataclass(frozen=True)
class GpuPresence:
    """What the CUDA driver reported: the devices it sees, and the driver (or why no device is usable)."""

    devices: int
    detail: str  # "NVIDIA H200, driver 13.0", or why none: "no NVIDIA driver here: ...", "cuInit failed: ..."

    def __post_init__(self) -> None:
        if self.devices < 0:
            raise ValueError(f"a device count cannot be negative ({self.devices})")

    @property
    def found(self) -> bool:
        return self.devices > 0


def probe_driver(library: str = DRIVER_LIBRARY) -> GpuPresence:
    """Ask the CUDA driver in ``library`` how many devices it sees. Never raises: a missing or unusable driver is
    "no device", with the reason (this runs at every start-up, on machines with no NVIDIA driver at all)."""
    try:
        lib = ctypes.CDLL(library)
    except OSError as err:
        return GpuPresence(0, f"no NVIDIA driver here: {err}")  # err names the library
    try:
        cu_init, cu_count = lib.cuInit, lib.cuDeviceGetCount
    except AttributeError:
        return GpuPresence(0, f"{library} is not a CUDA driver (no cuInit/cuDeviceGetCount)")
    cu_init.argtypes, cu_init.restype = [ctypes.c_uint], ctypes.c_int
    cu_count.argtypes, cu_count.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
    rc = cu_init(0)
    if rc != CUDA_SUCCESS:
        return GpuPresence(0, f"cuInit failed: {_error_name(lib, rc)}")
    count = ctypes.c_int(0)
    rc = cu_count(ctypes.byref(count))
    if rc != CUDA_SUCCESS:
        return GpuPresence(0, f"cuDeviceGetCount failed: {_error_name(lib, rc)}")
    if count.value <= 0:
        return GpuPresence(0, "the CUDA driver sees no device")
    return GpuPresence(count.value, f"{_device_name(lib)}, driver {_driver_version(lib)}")


def _error_name(lib: ctypes.CDLL, rc: int) -> str:
    """``CUDA_ERROR_NO_DEVICE (100)``: the driver's own name for a result code, where it has one."""
    name = ctypes.c_char_p()
    try:
        fn = lib.cuGetErrorName
        fn.argtypes, fn.restype = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)], ctypes.c_int
        if fn(rc, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
            return f"{name.value.decode(errors='replace')} ({rc})"
    except AttributeError:
        pass
    return f"CUDA error {rc}"


def _device_name(lib: ctypes.CDLL) -> str:
    """Device 0's name (the one ONNX Runtime's ``device_id`` 0 runs on)."""
    device, buf = ctypes.c_int(0), ctypes.create_string_buffer(256)
    try:
        get, name = lib.cuDeviceGet, lib.cuDeviceGetName
        get.argtypes, get.restype = [ctypes.POINTER(ctypes.c_int), ctypes.c_int], ctypes.c_int
        name.argtypes, name.restype = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int], ctypes.c_int
        if get(ctypes.byref(device), 0) == CUDA_SUCCESS and name(buf, len(buf), device.value) == CUDA_SUCCESS:
            return buf.value.decode(errors="replace") or "unnamed device"
    except AttributeError:
        pass
    return "unnamed device"


def _driver_version(lib: ctypes.CDLL) -> str:
    """The CUDA version the driver supports, "13.0" (the CUDA wheels' major version must not exceed it)."""
    version = ctypes.c_int(0)
    try:
        fn = lib.cuDriverGetVersion
        fn.argtypes, fn.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
        if fn(ctypes.byref(version)) == CUDA_SUCCESS:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except AttributeError:
        pass
    return "of unknown version"


@functools.cache
def gpus() -> GpuPresence:
    """This process's answer, asked once: every engine decision reads it. Logged once per service: the worker
    processes the API process spawns ask again (their own driver state) but inherit ``LOGGED_ENV`` and stay quiet."""
    presence = probe_driver()
    level = logging.DEBUG if os.environ.get(LOGGED_ENV) else logging.INFO
    if presence.found:
        log.log(level, "GPU found: %d CUDA device(s), %s", presence.devices, presence.detail)
    else:
        log.log(level, "no GPU found (%s): inference runs on the CPU", presence.detail)
    os.environ[LOGGED_ENV] = "1"
    return presence
