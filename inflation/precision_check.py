"""The export-time parity check of lower precisions, on a real CT (not uniform noise: random inputs give
near-tied logits whose argmax flips at any precision, and say nothing about a CT).

The whole CT goes through the sliding window at each precision, as the service would run it; fp32 through ONNX
Runtime on the CPU is the reference, and agreement is counted over the body's voxels only (the air around a patient
would pad it). Per-class Dice is taken over the whole CT, so small organs are judged on all their voxels, not on a
sample of windows. bf16 runs through OpenVINO where this CPU has BF16 units; fp16 runs the fp16 graph the CUDA
engine builds (``models.backends.float16_graph``), on CUDA where there is one, else through ONNX Runtime on the CPU.
A precision this machine cannot run is not recorded: the service then never lowers to it by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from models.backends import (
    CPU_EP,
    CUDA_EP,
    Choice,
    EngineKind,
    Hardware,
    OpenVinoBackend,
    float16_graph,
)
from models.bundle import Bundle
from models.precision import MIN_CLASS_VOXELS, Precision, PrecisionCheck
from models.preprocess import Preprocessor
from models.sliding_window import SlidingWindow

log = logging.getLogger("ctseg.export")
BATCH = 4


def compare(precision: Precision, runtime: str, reference: np.ndarray, other: np.ndarray, bundle: Bundle,
            data: str, windows: int) -> PrecisionCheck:
    dice = {}
    for label in bundle.labels:
        p, q = reference == label.value, other == label.value
        if p.sum() >= MIN_CLASS_VOXELS:
            dice[label.name] = round(float(2 * (p & q).sum() / (p.sum() + q.sum())), 5)
    return PrecisionCheck(precision, runtime, windows, round(float((reference == other).mean()), 6), dice, data)


def check_precisions(bundle: Bundle, ct_path: Path) -> dict[Precision, PrecisionCheck]:
    import onnxruntime as ort

    prepared = Preprocessor(bundle.preprocess).forward(sitk.ReadImage(str(ct_path)), with_body=True)
    if not prepared.body.any():
        raise ValueError(f"{ct_path.name}: no voxel above -500 HU; is it a CT in Hounsfield units?")
    cfg = bundle.model
    window = SlidingWindow(cfg.img_size, cfg.out_size, cfg.num_classes, overlap=0.25, batch_size=BATCH)

    def segment(fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return window(prepared.array, fn, body=prepared.body)[prepared.body]

    fp32 = ort.InferenceSession(str(bundle.onnx_path), providers=[CPU_EP])
    reference = segment(lambda b: fp32.run(None, {fp32.get_inputs()[0].name: b})[0])
    ran = window.last_stats["windows"] - window.last_stats["skipped"]
    data = f"a whole real CT: {ran} windows, {int(prepared.body.sum())} body voxels on the model grid"
    hw = Hardware.probe()
    checks: dict[Precision, PrecisionCheck] = {}
    if "BF16" in hw.openvino_cpu_caps:
        backend = OpenVinoBackend(bundle, Choice(EngineKind.OPENVINO, Precision.BF16, "export check"), 0, BATCH)
        checks[Precision.BF16] = compare(Precision.BF16, "openvino cpu bf16", reference, segment(backend), bundle, data, ran)
    else:
        log.warning("bf16 not checked: %s", "this CPU has no BF16 units" if hw.openvino_version else
                    "openvino is not installed")
    on_cuda = CUDA_EP in hw.ort_providers
    fp16 = ort.InferenceSession(float16_graph(bundle.onnx_path), providers=[CUDA_EP, CPU_EP] if on_cuda else [CPU_EP])
    runtime = "onnxruntime " + ("cuda" if on_cuda else "cpu") + ", the fp16 graph of the CUDA engine"
    checks[Precision.FP16] = compare(Precision.FP16, runtime, reference,
                                     segment(lambda b: fp16.run(None, {fp16.get_inputs()[0].name: b})[0]), bundle,
                                     data, ran)
    for check in checks.values():
        log.info("precision %s (%s): argmax agreement %.4f%%, min class Dice %s over %d windows: %s",
                 check.precision.value, check.runtime, 100 * check.argmax_agreement, check.min_class_dice,
                 check.windows, "passed" if check.passed else "FAILED")
    return checks
