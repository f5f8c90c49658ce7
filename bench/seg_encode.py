"""DICOM-SEG encoding: ctseg's writer vs a plain highdicom ``Segmentation(...)`` BINARY call, default options.

A generated 512x512xN CT series (pydicom, in memory) and a label map with 20 labels (ellipsoids).

    .venv/bin/python bench/seg_encode.py [--slices 300] [--labels 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import time

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from _common import median
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from bundles import labels_only_bundle
from dicom_factory import series_from_image
from models.volume import Volume
from server.imaging.dicom_reader import DicomSeries, plan_series
from server.imaging.seg import build_seg


def make_inputs(slices: int, n_labels: int):
    rng = np.random.default_rng(0)
    image = sitk.Image(512, 512, slices, sitk.sitkInt16)
    image.SetSpacing((0.8, 0.8, 1.5))
    datasets = series_from_image(image)
    zz, yy, xx = np.ogrid[:slices, :512, :512]
    labels = np.zeros((slices, 512, 512), np.uint8)
    for k in range(1, n_labels + 1):
        c = rng.uniform([0.2 * slices, 100, 100], [0.8 * slices, 412, 412])
        r = rng.uniform([0.05 * slices, 20, 20], [0.15 * slices, 60, 60])
        labels[((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1] = k
    return datasets, labels


def plain_highdicom(datasets, labels, bundle) -> bytes:
    algo = hd.AlgorithmIdentificationSequence(name="bench", family=codes.cid7162.ArtificialIntelligence, version="1")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=l.value, segment_label=l.name,
            segmented_property_category=hd.sr.CodedConcept(l.category.value, l.category.scheme, l.category.meaning),
            segmented_property_type=hd.sr.CodedConcept(l.type.value, l.type.scheme, l.type.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
        ) for l in bundle.labels
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=99,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="bench", manufacturer_model_name="bench",
        software_versions="1", device_serial_number="1",
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    datasets, labels = make_inputs(args.slices, args.labels)
    plan = plan_series(datasets)
    series = DicomSeries(datasets[0].SeriesInstanceUID, datasets[0].StudyInstanceUID, datasets[0].FrameOfReferenceUID,
                         "CT", "bench", datasets, Volume(np.zeros(plan.geometry.shape, np.int16), plan.geometry))
    bundle = labels_only_bundle(args.labels)
    runs = {
        "highdicom BINARY (defaults)": lambda: plain_highdicom(datasets, labels, bundle),
        "ctseg BINARY": lambda: build_seg(series, labels, bundle, "BINARY"),
        "ctseg LABELMAP": lambda: build_seg(series, labels, bundle, "LABELMAP"),
    }
    # Warm-up on a small series: highdicom loads its standard tables once per process (~1 s), not per call.
    small_ds, small_labels = make_inputs(4, 2)
    plain_highdicom(small_ds, small_labels, labels_only_bundle(2))
    times: dict[str, list[float]] = {k: [] for k in runs}
    sizes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            sizes[name] = len(fn())
            times[name].append(time.perf_counter() - t)
    base = median(times["highdicom BINARY (defaults)"])
    for name in runs:
        print(f"{name:28s} {median(times[name]):7.2f} s  {sizes[name] / 1e6:8.1f} MB  ratio vs highdicom {base / median(times[name]):.2f}x")
    print(f"SUMMARY seg_encode slices={args.slices} labels={args.labels} highdicom_s={base:.2f} "
          f"ctseg_binary_s={median(times['ctseg BINARY']):.2f} ctseg_labelmap_s={median(times['ctseg LABELMAP']):.2f} "
          f"speedup_binary={base / median(times['ctseg BINARY']):.2f}x speedup_labelmap={base / median(times['ctseg LABELMAP']):.2f}x")


if __name__ == "__main__":
    main()
