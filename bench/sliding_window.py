"""Sliding-window inference: MONAI's sliding_window_inference on the eager PyTorch model vs the ctseg engine.

Same bundle, same preprocessed volume, same ROI, overlap and Gaussian weighting; runs alternate, several
repeats, the median ratio is reported with argmax agreement and per-class Dice between the two outputs.

    .venv/bin/python bench/sliding_window.py [--input CT.nii.gz] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk
from _common import DEMO_BUNDLE, EXAMPLE_CT, agreement_and_dice, eager_model, median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(DEMO_BUNDLE))
    ap.add_argument("--input", default=str(EXAMPLE_CT))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="threads for both (0: all cores)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()

    import os

    import torch
    from monai.inferers import sliding_window_inference

    from server.engine import Engine

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    engine = Engine.from_dir(args.bundle, device=args.device, threads=threads, overlap=args.overlap, batch_size=args.batch)
    engine.warm_up()
    bundle = engine.bundle
    device = torch.device(args.device)
    model = eager_model(bundle).to(device)
    prepared = engine.preprocessor.forward(sitk.ReadImage(args.input))
    volume = prepared.array
    cfg = bundle.model
    print(f"input {args.input}: model grid {volume.shape}, ROI {cfg.img_size}, overlap {args.overlap}, batch {args.batch}, "
          f"threads {threads}, device {args.device}")

    def run_monai() -> np.ndarray:
        x = torch.from_numpy(volume)[None, None].to(device)
        with torch.no_grad():
            logits = sliding_window_inference(x, cfg.img_size, args.batch, model, overlap=args.overlap, mode="gaussian",
                                              sigma_scale=0.125)
        return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)

    def run_ctseg() -> np.ndarray:
        return engine.window(volume, engine.predict_windows)

    with torch.no_grad():
        model(torch.zeros(1, 1, *cfg.img_size, device=device))  # warm-up
    times: dict[str, list[float]] = {"monai": [], "ctseg": []}
    outs: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in (("monai", run_monai), ("ctseg", run_ctseg)):
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    a, b = outs["monai"], outs["ctseg"]
    agreement, dices = agreement_and_dice(a, b, cfg.num_classes)
    ratio = median(times["monai"]) / median(times["ctseg"])
    stats = engine.window.last_stats
    print(f"monai eager: {', '.join(f'{t:.2f}' for t in times['monai'])} s; ctseg: "
          f"{', '.join(f'{t:.2f}' for t in times['ctseg'])} s ({stats['windows']} windows, {stats['skipped']} air-only skipped)")
    print(f"per-class Dice ctseg vs monai: {', '.join(f'{d:.4f}' for d in dices)}")
    print(f"SUMMARY sliding_window device={args.device} speedup_vs_monai_eager={ratio:.2f}x "
          f"monai_s={median(times['monai']):.2f} ctseg_s={median(times['ctseg']):.2f} "
          f"argmax_agreement={agreement:.4%} min_class_dice={min(dices) if dices else float('nan'):.4f}")


if __name__ == "__main__":
    main()
