"""Quality flags: signs that a result may be wrong, so a reader can tell a failed segmentation from a good one.

Per label: on the scan's first or last slice or the image's in-plane border (the organ may continue outside the
scan: incomplete), a volume outside the bundle's reference range (``reference_volume_ml``), fragmented into
several pieces, many voxels where the model's two best classes were close (the low-margin share, from the sliding
window's logits). Per job: HU implausible (nothing reads as air or fat, air far under -1000 HU, or soft tissue off: typically a missing rescale)
and no structure of the model found at all. A flag never changes the result; it is written to volumes.json
(:func:`volumes_document`), the SR (server/imaging/sr.py), the job's API answer and ``/metrics``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.bundle import Bundle
from models.sliding_window import MarginCounts
from server.core.vocabulary import QualityFlag
from server.imaging.label_stats import LabelStats

log = logging.getLogger(__name__)

# Logit gap under which a voxel counts as low-margin: between two classes a softmax of 0.73 against 0.27.
LOW_MARGIN_LOGIT = 1.0
LOW_MARGIN_SHARE = 0.25  # a label with more of its voxels low-margin than this is flagged
FRAGMENT_SHARE = 0.9  # several components and the largest holds less than this share: fragmented
# The 1st percentile of the non-padding voxels: air (-1000) in almost every scan, fat (-100) in the others.
LOWEST_HU = (-1150.0, -50.0)  # above: nothing reads as air or fat (e.g. +1024 without RescaleIntercept)
SOFT_TISSUE_HU = (-200.0, 250.0)  # the median of the voxels above -500 HU (fat, muscle, organs)
PADDING_BELOW_HU = -1500.0  # values under this are the scanner's padding outside the reconstruction circle
BODY_ABOVE_HU = -500.0


@dataclass(frozen=True)
class LabelQuality:
    flags: tuple[QualityFlag, ...]
    low_margin_share: float | None  # None: no voxel, or the engine gives no margins (torchscript)
    reference_ml: tuple[float, float] | None


@dataclass(frozen=True)
class QualityReport:
    """Flags of one result and the figures behind the per-job ones."""

    labels: dict[int, LabelQuality]
    flags: tuple[QualityFlag, ...]  # per job
    air_hu: float | None
    soft_tissue_hu: float | None
    reasons: tuple[str, ...] = field(default=())  # one sentence per job flag: become the job's notes

    def all_flags(self) -> list[QualityFlag]:
        """Each flag once, per-job and per-label, in the enum's order (what ``/metrics`` counts per job)."""
        seen = set(self.flags) | {f for q in self.labels.values() for f in q.flags}
        return [f for f in QualityFlag if f in seen]


def hu_check(ct: np.ndarray) -> tuple[float | None, float | None, list[str]]:
    """(air HU, soft-tissue HU, problems) from a strided sample of the volume (a view: no copy of the scan)."""
    steps = [max(1, n // 64) for n in ct.shape]
    sample = np.asarray(ct[::steps[0], ::steps[1], ::steps[2]], dtype=np.float32).ravel()
    sample = sample[sample >= PADDING_BELOW_HU]
    if sample.size == 0:
        return None, None, ["every voxel reads under -1500 HU: the pixel values are not Hounsfield units"]
    air = float(np.percentile(sample, 1))
    body = sample[sample > BODY_ABOVE_HU]
    soft = float(np.median(body)) if body.size else None
    problems = []
    if air < LOWEST_HU[0]:
        problems.append(f"air reads {air:.0f} HU where about -1000 HU is expected: the rescale "
                        "(RescaleSlope/RescaleIntercept) may be wrong")
    elif air > LOWEST_HU[1]:
        problems.append(f"nothing reads as air (about -1000 HU) or fat (about -100 HU): the lowest values read "
                        f"{air:.0f} HU; the pixel values may lack their rescale (RescaleIntercept) or not be "
                        "Hounsfield units")
    if soft is not None and not SOFT_TISSUE_HU[0] <= soft <= SOFT_TISSUE_HU[1]:
        problems.append(f"soft tissue reads {soft:.0f} HU where {SOFT_TISSUE_HU[0]:.0f} to {SOFT_TISSUE_HU[1]:.0f} "
                        "HU is expected: the pixel values may lack their rescale or not be Hounsfield units")
    return air, soft, problems


def assess(ct: np.ndarray, stats: dict[int, LabelStats], bundle: Bundle,
           margins: MarginCounts | None = None) -> QualityReport:
    """The flags of one result: ``stats`` from server/imaging/label_stats.py on ``ct``'s grid."""
    depth = ct.shape[0]
    labels: dict[int, LabelQuality] = {}
    for value, s in stats.items():
        flags: list[QualityFlag] = []
        reference = bundle.reference_volumes.get(value)
        share = margins.share(value) if margins is not None and s.voxels else None
        if s.voxels:
            if s.first_slice == 0 or s.last_slice == depth - 1:
                flags.append(QualityFlag.TOUCHES_SCAN_END)
            if s.touches_in_plane_edge:
                flags.append(QualityFlag.TOUCHES_FOV_EDGE)
            if reference is not None and s.ml < reference[0]:
                flags.append(QualityFlag.VOLUME_BELOW_REFERENCE)
            if reference is not None and s.ml > reference[1]:
                flags.append(QualityFlag.VOLUME_ABOVE_REFERENCE)
            if s.components > 1 and (s.largest_share or 0.0) < FRAGMENT_SHARE:
                flags.append(QualityFlag.FRAGMENTED)
            if share is not None and share > LOW_MARGIN_SHARE:
                flags.append(QualityFlag.LOW_MARGIN)
        labels[value] = LabelQuality(tuple(flags), share, reference)
    air, soft, problems = hu_check(ct)
    job: list[QualityFlag] = [QualityFlag.HU_IMPLAUSIBLE] if problems else []
    reasons = [f"quality: {p}" for p in problems]
    if not any(s.voxels for s in stats.values()):
        job.append(QualityFlag.NO_STRUCTURE_FOUND)
        reasons.append(f"quality: none of the model's structures was found: the field of view may not hold the "
                       f"anatomy {bundle.name} segments")
    return QualityReport(labels, tuple(job), air, soft, tuple(reasons))


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def volumes_document(bundle: Bundle, stats: dict[int, LabelStats], report: QualityReport) -> dict:
    """volumes.json: per label its volume, HU, pieces and flags; the job's own flags and HU figures."""
    labels = {}
    for value, s in stats.items():
        q = report.labels[value]
        labels[s.name] = {
            "value": value, "voxels": s.voxels, "ml": s.ml, "hu_mean": _round(s.hu_mean, 1),
            "hu_sd": _round(s.hu_sd, 1), "components": s.components,
            "low_margin_share": _round(q.low_margin_share, 4),
            "reference_ml": list(q.reference_ml) if q.reference_ml is not None else None,
            "flags": [f.value for f in q.flags],
        }
    return {"model": bundle.name, "model_version": bundle.version, "labels": labels,
            "quality": {"flags": [f.value for f in report.flags], "air_hu": _round(report.air_hu, 1),
                        "soft_tissue_hu": _round(report.soft_tissue_hu, 1), "low_margin_logit": LOW_MARGIN_LOGIT}}


@dataclass(frozen=True)
class StoredFlags:
    """The flags of a finished job as volumes.json holds them (the job store keeps no copy)."""

    job: tuple[QualityFlag, ...]
    labels: dict[str, tuple[QualityFlag, ...]]  # only labels with a flag

    def all_flags(self) -> list[QualityFlag]:
        seen = set(self.job) | {f for flags in self.labels.values() for f in flags}
        return [f for f in QualityFlag if f in seen]


def read_flags(path: Path) -> StoredFlags | None:
    """From a volumes.json; None when it is missing or predates flags (a job of an older version)."""
    try:
        doc = json.loads(path.read_text())
        quality = doc["quality"]
        labels = {name: tuple(QualityFlag(f) for f in item.get("flags", ())) for name, item in doc["labels"].items()}
        return StoredFlags(tuple(QualityFlag(f) for f in quality["flags"]), {k: v for k, v in labels.items() if v})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.debug("no quality flags in %s: %s", path.name, err)
        return None
