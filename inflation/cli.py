"""``ctseg inflate``: 2D checkpoint -> 3D segmentation checkpoint, with a key report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inflation.command import Command, arg
from inflation.ops import DEPTH_RULES  # the --rule choices; imports torch, as before


def inflate_to(args: argparse.Namespace) -> str:
    from inflation.checkpoint import save_checkpoint
    from inflation.inflate import config_for_checkpoint, inflate
    from inflation.sources import from_file, from_timm_hub
    from models.axes import as_triple

    patch = as_triple(args.patch, "--patch")
    roi = as_triple(args.roi, "--roi")
    checkpoint = from_file(args.weights, args.backbone) if args.weights else from_timm_hub(args.backbone)
    config = config_for_checkpoint(
        checkpoint, img_size=roi, patch_size=patch, num_classes=args.num_classes, in_chans=args.in_chans,
        feature_size=args.feature_size,
    )
    model, report = inflate(checkpoint, config, rule=args.rule)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(args.out / "inflated.pt", model, meta={"inflation": report.to_dict()})
    (args.out / "inflation_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return (f"{report.summary()}\n"
            f"wrote {ckpt} ({config.mode} mode, ROI {list(roi)}, patch {list(patch)}, grid {list(config.grid_size)})")


COMMAND = Command(
    "inflate", help="inflate a 2D timm ViT checkpoint into a 3D segmentation checkpoint", action=inflate_to,
    logger="ctseg.inflate", arguments=(
        arg("--backbone", required=True, help="timm model name, e.g. vit_small_patch16_224"),
        arg("--weights", type=Path, help="local .safetensors/.pth/.bin of that timm model (else timm's hub)"),
        arg("--rule", choices=DEPTH_RULES, default="center", help="how the patch kernel fills depth"),
        arg("--patch", default="16,16,16", help="3D patch D,H,W (2.5D: D = ROI depth)"),
        arg("--roi", default="96,96,96", help="window size D,H,W the model takes"),
        arg("--num-classes", type=int, default=2, help="output classes including background"),
        arg("--in-chans", type=int, default=1),
        arg("--feature-size", type=int, default=16, help="decoder width"),
        arg("--out", type=Path, required=True, help="output directory"),
    ),
)
add_parser = COMMAND.add_parser
