"""The volumes as a DICOM SR a PACS can show: TID 1500 (Measurement Report) with highdicom's ``sr`` module.

One Volumetric ROI group (TID 1411) per label found, referencing the SEG instance and segment that hold it (the
segment number is the label value, as server/imaging/seg.py numbers them) and carrying the segment's Tracking UID:
the volume in mL (the same rounded figure as volumes.json), mean and standard deviation of the HU inside, and the
label's quality flags as qualitative evaluations. The job's own flags (HU implausible, nothing found) go in one
TID 1501 group of their own. The observer is a device: ctseg's algorithm, the bundle's name and version.

Identifiers derive from the SEG's identity (server/imaging/seg.py ``seg_identity``, seeded by the result), so the
SR references the SEG's SOP Instance UID even when the SEG itself was not asked for, and a resend keeps its UIDs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import ctseg
from models.bundle import Bundle
from server.core.vocabulary import QualityFlag
from server.imaging.dicom_reader import DicomSeries
from server.imaging.label_stats import LabelStats
from server.imaging.quality import QualityReport
from server.imaging.seg import SegIdentity, _code

MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
LOCAL_SCHEME = "99CTSEG"  # a local coding scheme (PS3.16 8.2: designators beginning "99")
QUALITY_FLAG = hd.sr.CodedConcept("QUALITYFLAG", LOCAL_SCHEME, "Segmentation quality flag")
# Code values are at most 16 characters (SH); meanings are the sentence a viewer shows.
FLAG_CODES: dict[QualityFlag, hd.sr.CodedConcept] = {
    QualityFlag.TOUCHES_SCAN_END: hd.sr.CodedConcept(
        "SCANEND", LOCAL_SCHEME, "Touches the first or last slice: may be incomplete"),
    QualityFlag.TOUCHES_FOV_EDGE: hd.sr.CodedConcept(
        "FOVEDGE", LOCAL_SCHEME, "Touches the field-of-view edge: may be incomplete"),
    QualityFlag.VOLUME_BELOW_REFERENCE: hd.sr.CodedConcept(
        "VOLLOW", LOCAL_SCHEME, "Volume below the model's reference range"),
    QualityFlag.VOLUME_ABOVE_REFERENCE: hd.sr.CodedConcept(
        "VOLHIGH", LOCAL_SCHEME, "Volume above the model's reference range"),
    QualityFlag.FRAGMENTED: hd.sr.CodedConcept(
        "FRAGMENTED", LOCAL_SCHEME, "Fragmented into several connected components"),
    QualityFlag.LOW_MARGIN: hd.sr.CodedConcept(
        "LOWMARGIN", LOCAL_SCHEME, "Many voxels where the model was uncertain"),
    QualityFlag.HU_IMPLAUSIBLE: hd.sr.CodedConcept(
        "HUIMPLAUSIBLE", LOCAL_SCHEME, "Implausible HU values: missing rescale?"),
    QualityFlag.NO_STRUCTURE_FOUND: hd.sr.CodedConcept(
        "NOSTRUCTURE", LOCAL_SCHEME, "None of the model's structures found"),
}
SR_SERIES_OFFSET = 1000  # the SR's series number: the SEG's (9000 + source's) plus this


@dataclass(frozen=True)
class SrIdentity:
    series_uid: str
    sop_instance_uid: str
    series_number: int


def sr_identity(seg: SegIdentity) -> SrIdentity:
    """Derived from the SEG's identity: one result, one SR, stable across resends."""
    return SrIdentity(generate_uid(entropy_srcs=[seg.sop_instance_uid, "sr", "series"]),
                      generate_uid(entropy_srcs=[seg.sop_instance_uid, "sr", "instance"]),
                      seg.series_number + SR_SERIES_OFFSET)


def _seg_evidence(series: DicomSeries, seg: SegIdentity, seg_sop_class_uid: str) -> Dataset:
    """What the SR's evidence lists for the SEG (its UIDs; the SEG need not have been written)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = seg_sop_class_uid, seg.sop_instance_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series.study_uid, seg.series_uid
    return ds


def _qualitative(flags: tuple[QualityFlag, ...]) -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(QUALITY_FLAG, FLAG_CODES[f]) for f in flags]


def _hu(value: float, derivation: object, label_uid: str, name: str) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=round(value, 1),
                             unit=codes.UCUM.HounsfieldUnit, derivation=derivation,
                             tracking_identifier=hd.sr.TrackingIdentifier(uid=label_uid, identifier=name))


def build_sr(series: DicomSeries, bundle: Bundle, stats: dict[int, LabelStats], report: QualityReport,
             seg: SegIdentity, seg_sop_class_uid: str) -> bytes:
    """A Comprehensive 3D SR of one result. ``seg``: the identity of the result's SEG (written or not) whose
    segments the groups reference; ``seg_sop_class_uid``: its class (Segmentation or Label Map Segmentation)."""
    algorithm = hd.sr.AlgorithmIdentification(name=bundle.name[:64], version=bundle.version[:64])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["ctseg device", bundle.name, bundle.version]),
            name=f"{bundle.name} {bundle.version}"[:64], manufacturer_name="ctseg", model_name=bundle.name[:64],
            serial_number=ctseg.__version__[:64]))
    context = hd.sr.ObservationContext(observer_device_context=device)
    source = hd.sr.SourceSeriesForSegmentation(series.series_uid)
    by_value = {label.value: label for label in bundle.labels}
    groups: list = []
    for value, s in sorted(stats.items()):
        if not s.voxels:
            continue  # an absent structure has no segment frames to reference and nothing to measure
        label = by_value[value]
        tracking_uid = seg.tracking_uid(label)  # the SEG segment's Tracking UID: one finding, two objects
        tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label.name[:64])
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=s.ml, unit=MILLILITER,
                                          tracking_identifier=tracking, algorithm_id=algorithm)]
        if s.hu_mean is not None and s.hu_sd is not None:
            measurements += [_hu(s.hu_mean, codes.SCT.Mean, tracking_uid, label.name[:64]),
                             _hu(s.hu_sd, codes.SCT.StandardDeviation, tracking_uid, label.name[:64])]
        sites = [hd.sr.FindingSite(_code(label.type), laterality=_code(label.modifier))] if label.modifier else None
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(seg_sop_class_uid, seg.sop_instance_uid, value,
                                                       source_series=source),
            finding_type=_code(label.type), algorithm_id=algorithm, finding_sites=sites,
            measurements=measurements, qualitative_evaluations=_qualitative(report.labels[value].flags) or None,
        ))
    if report.flags:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[seg.sop_instance_uid, "sr", "job quality"]),
                identifier="whole scan quality"),
            algorithm_id=algorithm, qualitative_evaluations=_qualitative(report.flags)))
    content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                      imaging_measurements=groups or None)
    identity = sr_identity(seg)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*series.datasets, _seg_evidence(series, seg, seg_sop_class_uid)],
        content=content[0], series_instance_uid=identity.series_uid, series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid, instance_number=1, manufacturer="ctseg",
        is_complete=True, is_final=False, is_verified=False,
        series_description=f"ctseg {bundle.name} {bundle.version} volumes"[:64],
    )
    scheme = Dataset()  # the local scheme the flag codes use, named for a reader (SOP Common module)
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "ctseg segmentation quality flags"
    scheme.CodingSchemeResponsibleOrganization = "ctseg"
    sr.CodingSchemeIdentificationSequence = [*sr.get("CodingSchemeIdentificationSequence", []), scheme]
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
