"""Inference backends behind one interface: ONNX Runtime (CPU, CUDA, TensorRT) and OpenVINO (CPU), all reading
the bundle's one ``model.onnx``; torch-free.

Why several: on this project's CPU (AVX-512 with BF16 and VNNI, 2 cores) the same windows run 1.3-1.7x faster than
eager PyTorch through ONNX Runtime, about 2.1x through OpenVINO in fp32 and 3.0-3.8x through OpenVINO in bf16
(bench/README.md). On a GPU, ONNX Runtime's CUDA provider with the windows bound to preallocated device buffers
(IO binding), in fp16 where the bundle's parity check allows, and optionally TensorRT with an engine cache on disk.

Choosing (``choose``) is separate from opening (``open_backend``): the API process chooses at start-up, so a backend
or a precision asked for by name and not available here is a start-up error naming it, while the sessions are
opened where inference runs (each worker process). ``CTSEG_DEVICE=cuda`` is a preference: without CUDA the service
logs it and serves on the CPU. ``CTSEG_ENGINE=cuda`` or ``tensorrt`` is a demand: without CUDA it does not start.
Whether there is a GPU at all is models/gpu.py's answer (the CUDA driver's), never the provider list alone.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from models.bundle import Bundle, BundleError
from models.gpu import GpuPresence, gpus
from models.precision import EngineKind, Precision, PrecisionRecords

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
CPU_EP = "CPUExecutionProvider"
GPU_EPS = (CUDA_EP, TENSORRT_EP)


class DevicePreference(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class EngineUnavailable(RuntimeError):
    """An engine or a precision asked for by name cannot run here; raised at start-up."""


@dataclass(frozen=True)
class Hardware:
    """What this machine offers to inference, probed once per process."""

    ort_providers: tuple[str, ...]  # the providers that can run here: the GPU ones only where a GPU was found
    openvino_version: str | None
    openvino_cpu_caps: tuple[str, ...]  # OpenVINO's CPU OPTIMIZATION_CAPABILITIES, e.g. FP32, BF16, INT8
    gpu_missing: str | None = None  # onnxruntime-gpu's providers set aside: installed, but no GPU (the driver's why)

    @property
    def cuda(self) -> bool:
        return CUDA_EP in self.ort_providers

    @staticmethod
    def of(ort_providers: tuple[str, ...], openvino_version: str | None, openvino_cpu_caps: tuple[str, ...],
           gpu: GpuPresence) -> Hardware:
        """What onnxruntime and OpenVINO offer, less the GPU providers where the driver found no GPU: the CUDA
        image lists CUDAExecutionProvider on every host, and a session opened with it there fails."""
        listed = tuple(p for p in ort_providers if p in GPU_EPS)
        if gpu.found or not listed:
            return Hardware(ort_providers, openvino_version, openvino_cpu_caps)
        usable = tuple(p for p in ort_providers if p not in GPU_EPS)
        return Hardware(usable, openvino_version, openvino_cpu_caps, gpu.detail)

    @staticmethod
    @functools.cache
    def probe() -> "Hardware":
        import onnxruntime as ort

        version, caps = None, ()
        try:
            import openvino as ov

            version = ov.__version__
            caps = tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        except ImportError:
            pass
        return Hardware.of(tuple(ort.get_available_providers()), version, caps, gpus())


def torch_installed() -> bool:
    """Whether PyTorch could be imported, without importing it (the default server never does)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or deliberately blocked install
        return False


@functools.cache
def torch_cuda() -> bool:
    """Whether torch sees a GPU. Imports torch only where the driver found one: asked only for the torchscript
    engine (named, or CTSEG_DEVICE=cuda without onnxruntime's CUDA provider)."""
    if not torch_installed() or not gpus().found:
        return False
    import torch

    return bool(torch.cuda.is_available())


def available_engines(hw: Hardware) -> tuple[EngineKind, ...]:
    """The engines this machine can run (what ``ctseg check-precision`` measures)."""
    present = [EngineKind.ONNXRUNTIME]
    present += [EngineKind.OPENVINO] if hw.openvino_version else []
    present += [EngineKind.CUDA] if CUDA_EP in hw.ort_providers else []
    present += [EngineKind.TENSORRT] if TENSORRT_EP in hw.ort_providers else []
    present += [EngineKind.TORCHSCRIPT] if torch_installed() else []
    return tuple(present)


def supported_precisions(kind: EngineKind, hw: Hardware) -> tuple[Precision, ...]:
    """The precisions ``kind`` can run on this hardware, fp32 first: the one place that decides what is possible
    (the chooser, the parity check and the tests all ask it)."""
    if kind == EngineKind.OPENVINO:
        lower = [p for p, cap in ((Precision.BF16, "BF16"), (Precision.FP16, "FP16")) if cap in hw.openvino_cpu_caps]
        return (Precision.FP32, *lower)
    if kind in (EngineKind.CUDA, EngineKind.TENSORRT):
        return Precision.FP32, Precision.FP16
    if kind == EngineKind.TORCHSCRIPT and torch_cuda():
        return Precision.FP32, Precision.BF16, Precision.FP16  # autocast on the GPU (the CPU's lower path: OpenVINO)
    return (Precision.FP32,)


@dataclass(frozen=True)
class Choice:
    """The engine, precision and device serving one bundle, and why."""

    engine: EngineKind
    precision: Precision
    reason: str
    on_gpu: bool = False  # the torchscript engine's device (the ONNX Runtime engines' is their provider)

    @property
    def device(self) -> str:
        return "cuda" if self.engine in (EngineKind.CUDA, EngineKind.TENSORRT) or self.on_gpu else "cpu"

    def describe(self) -> str:
        return f"{self.engine.value} {self.device} {self.precision.value}"


def choose(engine: EngineKind | str, precision: Precision | str, device: DevicePreference | str,
           checks: PrecisionRecords, hw: Hardware | None = None) -> Choice:
    """Pick the engine and precision for one bundle; raises :class:`EngineUnavailable` for a named one absent here.

    ``auto`` lowers precision only where the bundle's record of that exact (engine, precision) passed."""
    engine, precision, device = EngineKind(engine), Precision(precision), DevicePreference(device)
    hw = hw or Hardware.probe()
    if engine in (EngineKind.CUDA, EngineKind.TENSORRT):
        if device == DevicePreference.CPU:
            raise EngineUnavailable(f"CTSEG_ENGINE={engine.value} runs on a GPU but CTSEG_DEVICE=cpu")
        needed = CUDA_EP if engine == EngineKind.CUDA else TENSORRT_EP
        if needed not in hw.ort_providers and hw.gpu_missing:
            raise EngineUnavailable(f"CTSEG_ENGINE={engine.value}: onnxruntime-gpu is installed but no GPU was "
                                    f"found ({hw.gpu_missing})")
        if needed not in hw.ort_providers:
            raise EngineUnavailable(
                f"CTSEG_ENGINE={engine.value}: onnxruntime has no {needed} here (providers: "
                f"{', '.join(hw.ort_providers)}); install onnxruntime-gpu (the 'gpu' extra) on a machine with CUDA"
                + (" and TensorRT" if engine == EngineKind.TENSORRT else ""))
    if engine == EngineKind.OPENVINO and hw.openvino_version is None:
        raise EngineUnavailable("CTSEG_ENGINE=openvino: the openvino package is not installed")
    if engine == EngineKind.TORCHSCRIPT and not torch_installed():
        raise EngineUnavailable("CTSEG_ENGINE=torchscript: PyTorch is not installed (pip install 'ctseg[torchscript]')")
    if engine == EngineKind.AUTO:
        if device != DevicePreference.CPU and hw.cuda:
            engine = EngineKind.CUDA
        elif device == DevicePreference.CUDA and torch_cuda():
            engine = EngineKind.TORCHSCRIPT  # a GPU that torch sees but onnxruntime does not (no onnxruntime-gpu)
        else:
            if device == DevicePreference.CUDA:
                why = ("no GPU was found (models.gpu says why)" if hw.gpu_missing else "onnxruntime has no CUDA "
                       "provider here (install the 'gpu' extra on a machine with CUDA)")
                log.warning("CUDA was asked for (CTSEG_DEVICE=cuda) but %s; serving on the CPU", why)
            engine = EngineKind.OPENVINO if hw.openvino_version else EngineKind.ONNXRUNTIME
    on_gpu = engine == EngineKind.TORCHSCRIPT and device != DevicePreference.CPU and torch_cuda()
    supported = supported_precisions(engine, hw) if engine != EngineKind.TORCHSCRIPT or on_gpu else (Precision.FP32,)
    if precision != Precision.AUTO:
        if precision not in supported:
            raise EngineUnavailable(
                f"CTSEG_PRECISION={precision.value} is not available with engine {engine.value} on this machine "
                f"(available: {', '.join(p.value for p in supported)})")
        check = checks.get((engine, precision))
        if precision != Precision.FP32 and not (check and check.passed):
            log.warning("precision %s asked for by name on %s, which the bundle's records do not vouch for: %s",
                        precision.value, engine.value, _not_passed(checks, engine, precision))
        return Choice(engine, precision, "asked for", on_gpu)
    for lower in supported[1:]:
        check = checks.get((engine, lower))
        if check and check.passed:
            return Choice(engine, lower, f"{lower.value} passed the bundle's parity check on {engine.value} "
                                         f"({check.runtime}: argmax agreement {check.argmax_agreement:.4%}, "
                                         f"min class Dice {check.min_class_dice})", on_gpu)
    why = "; ".join(f"{p.value}: {_not_passed(checks, engine, p)}" for p in supported[1:])
    return Choice(engine, Precision.FP32, why or f"{engine.value} runs fp32 only here", on_gpu)


def _not_passed(checks: PrecisionRecords, engine: EngineKind, precision: Precision) -> str:
    """Why (engine, precision) is not trusted, naming the engines whose records do not count for it."""
    if (engine, precision) in checks:
        return f"failed the parity check on {engine.value}"
    elsewhere = sorted(e.value for e, p in checks if p == precision)
    return (f"never checked on {engine.value}" + (f" (only on {', '.join(elsewhere)}, which does not count for it)"
                                                  if elsewhere else "") + "; run 'ctseg check-precision' here")


class Backend(ABC):
    """Runs a batch of windows. The returned logits may be a view of the backend's own buffer: valid until the
    next call (the sliding window consumes them at once)."""

    choice: Choice
    runtime: str  # what runs the windows, with its version: what a parity record made with this backend names

    @abstractmethod
    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class OrtBackend(Backend):
    """ONNX Runtime: CPU, CUDA or TensorRT. With ``io_binding``, the input and output live in preallocated
    buffers on the session's device (one pair per batch size seen), bound once: no allocation per call, and on a
    GPU the logits are copied back once per batch."""

    def __init__(self, bundle: Bundle, choice: Choice, threads: int, trt_cache_dir: Path | None = None,
                 io_binding: bool | None = None) -> None:
        import onnxruntime as ort

        self.choice = choice
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        model: str | bytes = str(bundle.onnx_path)
        providers: list = [CPU_EP]
        if choice.engine == EngineKind.CUDA:
            providers = [(CUDA_EP, {"device_id": 0}), CPU_EP]
            if choice.precision == Precision.FP16:
                model = float16_graph(bundle.onnx_path)
        elif choice.engine == EngineKind.TENSORRT:
            trt = {"device_id": 0, "trt_fp16_enable": choice.precision == Precision.FP16}
            if trt_cache_dir is not None:
                trt_cache_dir.mkdir(parents=True, exist_ok=True)
                trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache_dir),
                        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(trt_cache_dir)}
            providers = [(TENSORRT_EP, trt), (CUDA_EP, {"device_id": 0}), CPU_EP]
        self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        active = self.session.get_providers()
        if choice.device == "cuda" and CUDA_EP not in active:
            raise EngineUnavailable(f"{choice.engine.value}: the session opened without CUDA (providers {active})")
        self.runtime = f"onnxruntime {ort.__version__} {active[0]} {choice.precision.value}"
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.device_type = "cuda" if choice.device == "cuda" else "cpu"
        self.io_binding = choice.device == "cuda" if io_binding is None else io_binding
        self.out_shape = (bundle.model.num_classes, *bundle.model.out_size)
        self._bound: dict[int, tuple] = {}
        log.info("model %s %s: %s (providers %s, IO binding %s)", bundle.name, bundle.version, choice.describe(),
                 active, "on" if self.io_binding else "off")

    def _binding(self, n: int, sample_shape: tuple[int, ...]) -> tuple:
        import onnxruntime as ort

        if n not in self._bound:
            x = ort.OrtValue.ortvalue_from_shape_and_type((n, *sample_shape), np.float32, self.device_type, 0)
            y = ort.OrtValue.ortvalue_from_shape_and_type((n, *self.out_shape), np.float32, self.device_type, 0)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(self.input_name, x)
            binding.bind_ortvalue_output(self.output_name, y)
            self._bound[n] = (binding, x, y)
        return self._bound[n]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        binding, x, y = self._binding(len(batch), batch.shape[1:])
        x.update_inplace(np.ascontiguousarray(batch))
        self.session.run_with_iobinding(binding)
        return y.numpy()


def float16_graph(onnx_path: Path) -> bytes:
    """The bundle's graph with fp16 weights and arithmetic, fp32 at its input and output (so the windows and the
    logits keep their dtype). Built in memory with onnxruntime's own converter: the bundle stays one ONNX file. The
    parity check (inflation/precision_check.py) runs it through the CUDA engine itself, never as a proxy for another."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True).SerializeToString()


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU, compiled for a static batch (faster kernels than a dynamic shape; a short last batch is
    padded), at the chosen inference precision (bf16 runs on the CPU's AVX-512 BF16 / AMX units)."""

    def __init__(self, bundle: Bundle, choice: Choice, threads: int, batch_size: int) -> None:
        import openvino as ov

        self.choice = choice
        cfg = bundle.model
        core = ov.Core()
        model = core.read_model(str(bundle.onnx_path))
        model.reshape({model.inputs[0]: ov.PartialShape([batch_size, cfg.in_chans, *cfg.img_size])})
        hint = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.FP16: "f16"}[choice.precision]
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.runtime = f"openvino {ov.__version__} CPU {hint}"
        self.batch_size = batch_size
        self._padded = np.zeros((batch_size, cfg.in_chans, *cfg.img_size), dtype=np.float32)
        log.info("model %s %s: %s (OpenVINO %s, static batch %d)", bundle.name, bundle.version, choice.describe(),
                 ov.__version__, batch_size)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if n > self.batch_size:
            raise ValueError(f"batch of {n} windows exceeds the compiled batch {self.batch_size}")
        if n < self.batch_size:
            self._padded[:n] = batch
            self._padded[n:] = 0
            batch = self._padded
        self.request.infer({0: batch}, share_inputs=True)
        return self.request.get_output_tensor(0).data[:n]


def open_backend(bundle: Bundle, choice: Choice, threads: int, batch_size: int,
                 trt_cache_dir: Path | None = None) -> Backend:
    """The backend for ``choice``; a graph the runtime cannot read is a :class:`BundleError` naming the bundle."""
    try:
        if choice.engine == EngineKind.OPENVINO:
            return OpenVinoBackend(bundle, choice, threads, batch_size)
        if choice.engine == EngineKind.TORCHSCRIPT:
            from models.torch_engine import TorchScriptBackend  # torch: only for this engine

            return TorchScriptBackend(bundle, choice, threads, batch_size, "cuda" if choice.on_gpu else "cpu")
        return OrtBackend(bundle, choice, threads, trt_cache_dir)
    except EngineUnavailable:
        raise
    except Exception as err:  # each runtime has its own exception types; all mean "this graph cannot run here"
        reason = next((line.strip() for line in str(err).splitlines() if "nable to read" in line), None)
        reason = reason or str(err).strip().splitlines()[0][:300]
        raise BundleError(f"bundle {bundle.name!r}: model.onnx could not be opened by {choice.engine.value} "
                          f"({type(err).__name__}: {reason})") from None
