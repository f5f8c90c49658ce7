"""``ctseg slices-to-images CONFIG.yaml --out DIR`` (inflation/slice_images.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("ctseg.slices")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slices-to-images", help="2D classification images (class/xxx.png) from the training part of "
                       "a labelled CT dataset, for pretrain-vdt")
    p.add_argument("config", type=Path, help="a training config (its data, labels, held-out part and preprocessing)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--min-pixels", type=int, default=200, help="smaller organ areas make a slice 'none'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inflation.config import ConfigError, TrainConfig
    from inflation.slice_images import slices_to_images

    try:
        counts = slices_to_images(TrainConfig.load(args.config), args.out, args.min_pixels)
    except (ConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(f"{sum(counts.values())} images in {len(counts)} classes under {args.out}")
    return 0
