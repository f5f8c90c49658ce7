"""One segmentation from input files to result files; shared by the job workers and ``ctseg predict``.

Every result is written durably (temporary name, fsync, rename, fsync of the folder: server/core/durable.py)
before this returns, so a job store that records the results afterwards never points at files a crash lost.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from server.core import durable
from server.core.bounds import DicomBounds
from server.core.options import SegOptions
from server.core.vocabulary import InputKind, Output, ResultFile, SegType
from server.imaging.dicom_reader import load_series
from server.imaging.key_image import build_key_image
from server.imaging.label_stats import label_statistics
from server.imaging.nifti import read_nifti, replace_non_finite
from server.imaging.preview import render_preview
from server.imaging.quality import LOW_MARGIN_LOGIT, assess, volumes_document
from server.imaging.seg import build_seg, seg_identity
from server.imaging.sop import SEG_STORAGE
from server.imaging.sr import build_sr
from server.inference.engine import Engine, Timings

ProgressFn = Callable[[int, int], None]


@dataclass
class PipelineResult:
    produced: list[ResultFile]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    quality_flags: list[str] = field(default_factory=list)  # QualityFlag values, each once (also in volumes.json)


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
    binary_fallback: bool = False,
) -> PipelineResult:
    """``inputs``: one NIfTI file, or the chosen DICOM series' files (see server/jobs/staging.py). DICOM outputs
    need DICOM input: that is decided at staging (server/jobs/model.py: ``settle_outputs``), not here.
    ``binary_fallback``: beside a LABELMAP SEG, the same segmentation as a BINARY SEG (``seg-binary.dcm``), for a
    DIMSE destination that refuses Label Map Segmentation Storage at association."""
    seg = seg or SegOptions()
    outputs = tuple(Output(o) for o in outputs)
    if kind == InputKind.NIFTI and any(o.needs_dicom for o in outputs):
        raise ValueError("DICOM outputs need DICOM input (staging should have refused this job)")
    # One seed for every object of the result: the SR and key image reference the SEG's UIDs, written or not.
    result_id = result_id or uuid.uuid4().hex
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
    labels, margins = engine.segment_scored(volume, progress, timings, low_margin=LOW_MARGIN_LOGIT)
    bundle = engine.bundle
    produced: list[ResultFile] = []
    durable.make_dirs(out_dir)

    def write(name: ResultFile, data: bytes, stage: str, encode_s: float) -> None:
        """Each DICOM object's encoding is its own stage, so a job's timings say what each output costs."""
        timings.add(stage, encode_s)
        t = time.perf_counter()
        durable.write_with(out_dir / name.value, lambda tmp: tmp.write_bytes(data))
        produced.append(name)
        timings.add("write", time.perf_counter() - t)

    if Output.NIFTI in outputs:
        t = time.perf_counter()
        image = labels.to_sitk()
        durable.write_with(out_dir / ResultFile.LABELMAP.value,
                           lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
        produced.append(ResultFile.LABELMAP)
        timings.add("write", time.perf_counter() - t)
    identity = seg_identity(series, bundle, seg, result_id) if series is not None else None
    if Output.DICOM_SEG in outputs and series is not None:
        t = time.perf_counter()
        data = build_seg(series, labels.array, bundle, seg.seg_type, seg.keep_empty_frames, seg.compression,
                         result_id=result_id)
        write(ResultFile.SEG, data, "encode", time.perf_counter() - t)
        if binary_fallback and seg.seg_type == SegType.LABELMAP:
            t = time.perf_counter()
            data = build_seg(series, labels.array, bundle, SegType.BINARY, seg.keep_empty_frames, seg.compression,
                             result_id=result_id)
            write(ResultFile.SEG_BINARY, data, "encode_binary", time.perf_counter() - t)
    if Output.RTSTRUCT in outputs and series is not None and identity is not None:
        # scikit-image's contouring: loaded only when asked
        from server.imaging.rtstruct import build_rtstruct

        t = time.perf_counter()
        data = build_rtstruct(series, labels.array, bundle, result_id=result_id,
                              seg_sop_instance_uid=identity.sop_instance_uid)
        write(ResultFile.RTSTRUCT, data, "encode_rtstruct", time.perf_counter() - t)
    t = time.perf_counter()
    stats = label_statistics(volume.array, labels.array, labels.geometry.spacing, bundle.label_names())
    report = assess(volume.array, stats, bundle, margins)
    notes += report.reasons
    timings.add("quality", time.perf_counter() - t)
    t = time.perf_counter()
    durable.write_bytes(out_dir / ResultFile.VOLUMES.value,
                        json.dumps(volumes_document(bundle, stats, report), indent=2).encode())
    preview = render_preview(volume, labels.array, bundle.labels)
    durable.write_bytes(out_dir / ResultFile.PREVIEW.value, preview)
    timings.add("postprocess", time.perf_counter() - t)
    if Output.SR in outputs and series is not None and identity is not None:
        t = time.perf_counter()
        data = build_sr(series, bundle, stats, report, identity, SEG_STORAGE[seg.seg_type])
        write(ResultFile.SR, data, "encode_sr", time.perf_counter() - t)
    if Output.SC in outputs and series is not None and identity is not None:
        t = time.perf_counter()
        data = build_key_image(series, preview, bundle, identity)
        write(ResultFile.SC, data, "encode_sc", time.perf_counter() - t)
    produced += [ResultFile.VOLUMES, ResultFile.PREVIEW]
    return PipelineResult(produced, timings.stages, notes, [f.value for f in report.all_flags()])
