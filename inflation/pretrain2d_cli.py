"""``ctseg pretrain-2d CONFIG.yaml``: a 2D timm ViT pre-trained on CT slices, saved as an ordinary timm checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def pretrain(args: argparse.Namespace) -> str:
    from inflation.pretrain2d import Pretrain2DConfig, pretrain_2d

    cfg = Pretrain2DConfig.load(args.config)
    if args.steps:
        cfg.steps = args.steps
    if args.output:
        cfg.output = str(args.output)
    summary = pretrain_2d(cfg)
    return (f"pre-trained {summary['backbone']} for {summary['steps']} steps in {summary['seconds']} s: "
            f"{Path(cfg.output) / summary['weights']}; loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")


COMMAND = Command(
    "pretrain-2d", help="pre-train a 2D timm ViT on labelled CT slices (then: ctseg inflate --weights)",
    action=pretrain, logger="ctseg.pretrain2d", also_expected=(RuntimeError,), arguments=(
        arg("config", type=Path, help="pre-training config (YAML), e.g. configs/demo_pretrain2d.yaml"),
        arg("--steps", type=int, help="override steps"),
        arg("--output", type=Path, help="override the config's output directory"),
    ),
)
add_parser = COMMAND.add_parser
