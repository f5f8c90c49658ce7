"""``ctseg pretrain-vdt CONFIG.yaml [--resume CKPT]`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def pretrain(args: argparse.Namespace) -> str:
    from inflation.pretrain_vdt import VdtConfig, pretrain_vdt

    cfg = VdtConfig.load(args.config)
    if args.steps:
        cfg.train.steps = args.steps
    result = pretrain_vdt(cfg, resume=args.resume)
    return (f"pre-trained {result['steps']} steps in {result['seconds']} s; loss {result['first_loss']:.4f} -> "
            f"{result['last_loss']:.4f}; encoder in {Path(cfg.output) / 'vdt.pt'}")


COMMAND = Command(
    "pretrain-vdt",
    help="supervised 3D pre-training of a ViT encoder on 2D images (variable dimension transform)",
    action=pretrain, logger="ctseg.pretrain_vdt", arguments=(
        arg("config", type=Path, help="pre-training config (YAML), e.g. configs/pretrain_vdt_demo.yaml"),
        arg("--resume", type=Path, help="checkpoint to continue from (last.pt)"),
        arg("--steps", type=int, help="override train.steps"),
    ),
)
add_parser = COMMAND.add_parser
