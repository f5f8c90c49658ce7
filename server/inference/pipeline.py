"""One segmentation from input files to result files; shared by the job workers and ``ctseg predict``.

Every result is written durably (temporary name, fsync, rename, fsync of the folder: server/core/durable.py)
before this returns, so a job store that records the results afterwards never points at files a crash lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from server.core import durable
from server.core.bounds import DicomBounds
from server.core.options import SegOptions
from server.core.vocabulary import InputKind, Output, ResultFile
from server.imaging.dicom_reader import load_series
from server.imaging.nifti import label_volumes, read_nifti, replace_non_finite
from server.imaging.preview import render_preview
from server.imaging.seg import build_seg
from server.inference.engine import Engine, Timings

ProgressFn = Callable[[int, int], None]


@dataclass
class PipelineResult:
    produced: list[ResultFile]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)


def run_pipeline(
    engine: Engine,
    kind: InputKind,
    inputs: list[Path],
    out_dir: Path,
    outputs: tuple[Output, ...] | list[Output],
    series_uid: str | None = None,
    seg: SegOptions | None = None,
    progress: ProgressFn | None = None,
    display_name: str = "the input",
    result_id: str | None = None,
    bounds: DicomBounds | None = None,
) -> PipelineResult:
    """``inputs``: one NIfTI file, or the chosen DICOM series' files (see server/jobs/staging.py). A SEG needs
    DICOM input: that is decided at staging (server/jobs/model.py: ``settle_outputs``), not here."""
    seg = seg or SegOptions()
    if kind == InputKind.NIFTI and Output.DICOM_SEG in outputs:
        raise ValueError("a DICOM-SEG needs DICOM input (staging should have refused this job)")
    timings = Timings()
    notes: list[str] = []
    t = time.perf_counter()
    series = None
    if kind == InputKind.NIFTI:
        volume, repaired = replace_non_finite(read_nifti(inputs[0], display_name), inputs[0])
        notes += [repaired] if repaired else []
    else:
        # the bounds staging checked: a limit raised in the settings holds here too
        series = load_series([(p.name, p) for p in inputs], series_uid, {engine.bundle.modality}, bounds=bounds)
        volume = series.volume
        notes += series.notes
    timings.add("decode", time.perf_counter() - t)
    labels = engine.segment(volume, progress, timings)
    produced: list[ResultFile] = []
    durable.make_dirs(out_dir)
    if Output.NIFTI in outputs:
        t = time.perf_counter()
        image = labels.to_sitk()
        durable.write_with(out_dir / ResultFile.LABELMAP.value,
                           lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
        produced.append(ResultFile.LABELMAP)
        timings.add("write", time.perf_counter() - t)
    if Output.DICOM_SEG in outputs and series is not None:
        t = time.perf_counter()
        data = build_seg(series, labels.array, engine.bundle, seg.seg_type, seg.keep_empty_frames, seg.compression,
                         result_id=result_id)
        timings.add("encode", time.perf_counter() - t)
        t = time.perf_counter()
        durable.write_bytes(out_dir / ResultFile.SEG.value, data)
        produced.append(ResultFile.SEG)
        timings.add("write", time.perf_counter() - t)
    t = time.perf_counter()
    volumes = label_volumes(labels.array, labels.geometry.spacing, engine.bundle.label_names())
    durable.write_bytes(out_dir / ResultFile.VOLUMES.value,
                        json.dumps({"model": engine.bundle.name, "labels": volumes}, indent=2).encode())
    durable.write_bytes(out_dir / ResultFile.PREVIEW.value, render_preview(volume, labels.array, engine.bundle.labels))
    produced += [ResultFile.VOLUMES, ResultFile.PREVIEW]
    timings.add("postprocess", time.perf_counter() - t)
    return PipelineResult(produced, timings.stages, notes)
