"""``ctseg pretrain-ssl CONFIG.yaml [--resume CKPT]`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def pretrain(args: argparse.Namespace) -> str:
    from inflation.pretrain_ssl import SslConfig, pretrain_ssl

    cfg = SslConfig.load(args.config)
    if args.steps:
        cfg.train.steps = args.steps
    result = pretrain_ssl(cfg, resume=args.resume)
    return (f"pre-trained {result['steps']} steps in {result['seconds']} s; loss {result['first_loss']:.4f} -> "
            f"{result['last_loss']:.4f}; encoder in {Path(cfg.output) / 'ssl.pt'}")


COMMAND = Command(
    "pretrain-ssl", help="self-supervised pre-training of a Swin UNETR encoder on unlabelled CT", action=pretrain,
    logger="ctseg.pretrain_ssl", arguments=(
        arg("config", type=Path, help="pre-training config (YAML), e.g. configs/pretrain_ssl_demo.yaml"),
        arg("--resume", type=Path, help="checkpoint to continue from (last.pt)"),
        arg("--steps", type=int, help="override train.steps"),
    ),
)
add_parser = COMMAND.add_parser
