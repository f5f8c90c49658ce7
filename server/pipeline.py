"""One segmentation from input files to result files; shared by the job workers and ``ctseg predict``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.dicom_input import load_series
from server.dicom_seg import SegOptions, build_seg
from server.engine import Engine, Timings
from server.nifti_io import label_volumes, read_nifti, replace_non_finite, write_nifti
from server.preview import render_preview
from server.vocabulary import InputKind, Output

ProgressFn = Callable[[int, int], None]


@dataclass
class PipelineResult:
    produced: list[str]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)


def run_pipeline(
    engine: Engine,
    kind: InputKind,
    inputs: list[Path],
    out_dir: Path,
    outputs: list[str],
    series_uid: str | None = None,
    seg: SegOptions | None = None,
    progress: ProgressFn | None = None,
    display_name: str = "the input",
    result_id: str | None = None,
) -> PipelineResult:
    """``inputs``: one NIfTI file, or the chosen DICOM series' files (see server/staging.py).
    Writes labelmap.nii.gz, seg.dcm, volumes.json, preview.png."""
    seg = seg or SegOptions()
    timings = Timings()
    notes: list[str] = []
    t = time.perf_counter()
    series = None
    if kind == InputKind.NIFTI:
        volume, repaired = replace_non_finite(read_nifti(inputs[0], display_name), inputs[0])
        notes += [repaired] if repaired else []
    else:
        series = load_series([(p.name, p) for p in inputs], series_uid, {engine.bundle.modality})
        volume = series.volume
        notes += series.notes
    timings.add("decode", time.perf_counter() - t)
    labels = engine.segment(volume, progress, timings)
    produced: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if Output.NIFTI in outputs:
        t = time.perf_counter()
        write_nifti(labels, out_dir / "labelmap.nii.gz")
        produced.append("labelmap.nii.gz")
        timings.add("write", time.perf_counter() - t)
    if Output.DICOM_SEG in outputs:
        if series is None:
            notes.append("no DICOM-SEG: the input was NIfTI, which has no source instances to reference")
        else:
            t = time.perf_counter()
            data = build_seg(series, labels.array, engine.bundle, seg.seg_type, seg.keep_empty_frames, seg.compression,
                             result_id=result_id)
            timings.add("encode", time.perf_counter() - t)
            t = time.perf_counter()
            (out_dir / "seg.dcm").write_bytes(data)
            produced.append("seg.dcm")
            timings.add("write", time.perf_counter() - t)
    t = time.perf_counter()
    volumes = label_volumes(labels.array, labels.geometry.spacing, engine.bundle.label_names())
    (out_dir / "volumes.json").write_text(json.dumps({"model": engine.bundle.name, "labels": volumes}, indent=2))
    (out_dir / "preview.png").write_bytes(render_preview(volume, labels.array, engine.bundle.labels))
    produced += ["volumes.json", "preview.png"]
    timings.add("postprocess", time.perf_counter() - t)
    return PipelineResult(produced, timings.stages, notes)
