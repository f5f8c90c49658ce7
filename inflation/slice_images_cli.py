"""``ctseg slices-to-images CONFIG.yaml --out DIR`` (inflation/slice_images.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def slices(args: argparse.Namespace) -> str:
    from inflation.config import TrainConfig
    from inflation.slice_images import slices_to_images

    counts = slices_to_images(TrainConfig.load(args.config), args.out, args.min_pixels)
    return f"{sum(counts.values())} images in {len(counts)} classes under {args.out}"


COMMAND = Command(
    "slices-to-images",
    help="2D classification images (class/xxx.png) from the training part of a labelled CT dataset, for pretrain-vdt",
    action=slices, logger="ctseg.slices", arguments=(
        arg("config", type=Path, help="a training config (its data, labels, held-out part and preprocessing)"),
        arg("--out", type=Path, required=True),
        arg("--min-pixels", type=int, default=200, help="smaller organ areas make a slice 'none'"),
    ),
)
add_parser = COMMAND.add_parser
