"""``ctseg inflate``: 2D checkpoint -> 3D segmentation checkpoint, with a key report."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from inflation.checkpoint import save_checkpoint
from inflation.errors import InflationError
from inflation.inflate import config_for_checkpoint, inflate
from inflation.ops import DEPTH_RULES
from inflation.sources import from_file, from_timm_hub
from models.axes import as_triple
from models.config import ModelConfigError

log = logging.getLogger("ctseg.inflate")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inflate", help="inflate a 2D timm ViT checkpoint into a 3D segmentation checkpoint")
    p.add_argument("--backbone", required=True, help="timm model name, e.g. vit_small_patch16_224")
    p.add_argument("--weights", type=Path, help="local .safetensors/.pth/.bin of that timm model (else timm's hub)")
    p.add_argument("--rule", choices=DEPTH_RULES, default="center", help="how the patch kernel fills depth")
    p.add_argument("--patch", default="16,16,16", help="3D patch D,H,W (2.5D: D = ROI depth)")
    p.add_argument("--roi", default="96,96,96", help="window size D,H,W the model takes")
    p.add_argument("--num-classes", type=int, default=2, help="output classes including background")
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--feature-size", type=int, default=16, help="decoder width")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        patch = as_triple(args.patch, "--patch")
        roi = as_triple(args.roi, "--roi")
        checkpoint = from_file(args.weights, args.backbone) if args.weights else from_timm_hub(args.backbone)
        config = config_for_checkpoint(
            checkpoint, img_size=roi, patch_size=patch, num_classes=args.num_classes, in_chans=args.in_chans,
            feature_size=args.feature_size,
        )
        model, report = inflate(checkpoint, config, rule=args.rule)
    except (InflationError, ModelConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(args.out / "inflated.pt", model, meta={"inflation": report.to_dict()})
    (args.out / "inflation_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(report.summary())
    print(f"wrote {ckpt} ({config.mode} mode, ROI {list(roi)}, patch {list(patch)}, grid {list(config.grid_size)})")
    return 0
