"""The parity check of each engine and precision against fp32, on a real CT (not uniform noise: random inputs give
near-tied logits whose argmax flips at any precision, and say nothing about a CT); torch-free, so that
``ctseg check-precision`` runs on a serving machine, where the engines that will serve are.

The whole CT goes through the sliding window through each engine present here (``available_engines``) at each
precision it can run here (``supported_precisions``, what the service's chooser asks), opened exactly as the
service opens it (``open_backend``). ONNX Runtime fp32 on the CPU is the reference; agreement is counted over the
body's voxels only (the air around a patient would pad it). Per-class Dice is taken over the whole CT, so small
organs are judged on all their voxels, not on a sample of windows. Each record is keyed by (engine, precision) and
names the runtime that ran it: the service trusts a record for that pair only. fp32 on the other engines is
recorded too (it shows each runtime reads the graph as the reference does), but never needed to serve fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from models.backends import (
    Backend,
    Choice,
    Hardware,
    available_engines,
    open_backend,
    supported_precisions,
)
from models.bundle import Bundle, load_bundle, write_manifest
from models.precision import (
    MIN_CLASS_VOXELS,
    REFERENCE,
    EngineKind,
    Precision,
    PrecisionCheck,
    PrecisionRecords,
    checks_section,
)
from models.preprocess import Preprocessor
from models.sliding_window import SlidingWindow

log = logging.getLogger("ctseg.export")
BATCH = 4


def compare(key: tuple[EngineKind, Precision], runtime: str, reference: np.ndarray, other: np.ndarray,
            bundle: Bundle, data: str, windows: int) -> PrecisionCheck:
    dice = {}
    for label in bundle.labels:
        p, q = reference == label.value, other == label.value
        if p.sum() >= MIN_CLASS_VOXELS:
            dice[label.name] = round(float(2 * (p & q).sum() / (p.sum() + q.sum())), 5)
    engine, precision = key
    return PrecisionCheck(engine, precision, runtime, windows, round(float((reference == other).mean()), 6), dice,
                          data)


def check_precisions(bundle: Bundle, ct_path: Path, threads: int = 0,
                     hw: Hardware | None = None) -> PrecisionRecords:
    """One record per (engine, precision) this machine can run, other than the reference."""
    hw = hw or Hardware.probe()
    prepared = Preprocessor(bundle.preprocess).forward(sitk.ReadImage(str(ct_path)), with_body=True)
    if not prepared.body.any():
        raise ValueError("the CT given (--ct) has no voxel above -500 HU; is it a CT in Hounsfield units?")
    cfg = bundle.model
    window = SlidingWindow(cfg.img_size, cfg.out_size, cfg.num_classes, overlap=0.25, batch_size=BATCH)

    def segment(fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return window(prepared.array, fn, body=prepared.body)[prepared.body]

    def backend(key: tuple[EngineKind, Precision]) -> Backend:
        return open_backend(bundle, Choice(*key, "precision check"), threads, BATCH)

    reference = segment(backend(REFERENCE))
    ran = window.last_stats["windows"] - window.last_stats["skipped"]
    data = f"a whole real CT: {ran} windows, {int(prepared.body.sum())} body voxels on the model grid"
    checks: PrecisionRecords = {}
    for engine in available_engines(hw):
        for precision in supported_precisions(engine, hw):
            if (engine, precision) == REFERENCE:
                continue
            run = backend((engine, precision))
            check = compare((engine, precision), run.runtime, reference, segment(run), bundle, data, ran)
            checks[check.key] = check
            log.info("%s %s (%s): argmax agreement %.4f%%, min class Dice %s over %d windows: %s", engine.value,
                     precision.value, check.runtime, 100 * check.argmax_agreement, check.min_class_dice,
                     check.windows, "passed" if check.passed else "FAILED")
    for precision in (Precision.BF16, Precision.FP16):
        if not any(p == precision for _, p in checks):
            log.warning("%s not checked: no engine here runs it (engines: %s)", precision.value,
                        ", ".join(e.value for e in available_engines(hw)))
    return checks


def record_precision_checks(bundle_dir: Path, ct_path: Path, write: bool = True) -> PrecisionRecords:
    """Check ``bundle_dir`` on ``ct_path`` and update its manifest's records: the pairs measured here replace their
    old records, the others (measured on another machine, e.g. the GPU host's) are kept. The manifest is not
    covered by a digest (``files`` holds those of the graphs, verified before and after), so the records live
    in it, where the service reads them; the old format is rewritten in the current one."""
    bundle = load_bundle(bundle_dir)
    checks = check_precisions(bundle, Path(ct_path))
    if write:
        manifest = dict(bundle.manifest)
        manifest["precisions"] = checks_section({**bundle.precisions, **checks})
        write_manifest(Path(bundle_dir), manifest)
        load_bundle(bundle_dir)
    return checks
