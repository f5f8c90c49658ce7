"""Windows saved by the body mask in a clinical field of view, and what it costs.

The development CT is cropped close to the body; a scanner series is a 512x512 reconstruction over a 500 mm field
of view (air all around, plus the table). Here the CT is placed, unchanged, in such a field of view (air outside
its own extent; its own table, if in the crop, is kept), and run with and without skipping windows outside the body.
The labels must be identical; the figures are windows run and seconds.

    .venv/bin/python bench/body_mask.py [--fov-mm 500] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk
from _common import DEMO_BUNDLE, EXAMPLE_CT, median


def clinical_fov(image: sitk.Image, fov_mm: float, size: int = 512) -> sitk.Image:
    """``image`` resampled onto a size x size in-plane grid over fov_mm, centred on it, same slices; air outside."""
    spacing = fov_mm / size
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    out_spacing = (spacing, spacing, image.GetSpacing()[2])
    out_size = (size, size, image.GetSize()[2])
    half = np.array([(n - 1) / 2 * s for n, s in zip(out_size, out_spacing)])
    origin = np.array(centre) - direction @ half
    return sitk.Resample(image, out_size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), out_spacing,
                         image.GetDirection(), -1024, sitk.sitkInt16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(EXAMPLE_CT))
    ap.add_argument("--bundle", default=str(DEMO_BUNDLE))
    ap.add_argument("--fov-mm", type=float, default=500.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from server.inference.engine import Engine

    image = clinical_fov(sitk.ReadImage(args.input), args.fov_mm)
    engine = Engine.from_dir(args.bundle)
    engine.warm_up()
    t = time.perf_counter()
    prepared = engine.preprocessor.forward(image, with_body=True)
    with_mask_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.preprocessor.forward(image)
    mask_s = with_mask_s - (time.perf_counter() - t)
    body_fraction = float(prepared.body.mean())
    results, times = {}, {"all": [], "body": []}
    for _ in range(args.repeats):
        for name, body in (("all", None), ("body", prepared.body)):
            t = time.perf_counter()
            results[name] = engine.window(prepared.array, engine.predict_windows, body=body)
            times[name].append(time.perf_counter() - t)
            stats = dict(engine.window.last_stats)
            results[name + "_stats"] = stats
    same = np.array_equal(results["all"], results["body"])
    total, skipped = results["body_stats"]["windows"], results["body_stats"]["skipped"]
    print(f"{image.GetSize()} voxels over {args.fov_mm:.0f} mm -> model grid {prepared.array.shape}; "
          f"engine {engine.choice.describe()}; body {body_fraction:.1%} of the grid; body mask {mask_s:.2f} s")
    print(f"every window: {total} windows, {', '.join(f'{x:.2f}' for x in times['all'])} s; "
          f"body windows only: {total - skipped} ({skipped} skipped, {skipped / total:.0%}), "
          f"{', '.join(f'{x:.2f}' for x in times['body'])} s; labels identical: {same}")
    # windows a model with smaller windows would save on the same field of view (planning only, no inference)
    from models.preprocess import Preprocessor, PreprocessSpec
    from models.sliding_window import SlidingWindow

    for roi, spacing in (((96, 96, 96), (1.5, 1.5, 1.5)), ((64, 64, 64), (1.5, 1.5, 1.5)), ((96, 96, 96), (3.0, 3.0, 3.0))):
        prep = Preprocessor(PreprocessSpec(spacing=spacing, roi=roi)).forward(image, with_body=True)
        sw = SlidingWindow(roi, roi, 2, overlap=0.25)
        sw(prep.array, lambda b, roi=roi: np.zeros((len(b), 2, *roi), dtype=np.float32), body=prep.body)
        st = sw.last_stats
        print(f"ROI {roi} at {spacing[0]} mm ({roi[1] * spacing[1]:.0f} mm windows): {st['windows']} windows, "
              f"{st['skipped']} outside the body ({st['skipped'] / st['windows']:.0%})")
    print(f"SUMMARY body_mask windows={total} skipped={skipped} saved={skipped / total:.0%} "
          f"speedup={median(times['all']) / (median(times['body']) + mask_s):.2f}x (mask included) identical={same}")


if __name__ == "__main__":
    main()
