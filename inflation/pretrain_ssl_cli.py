"""``ctseg pretrain-ssl CONFIG.yaml [--resume CKPT]`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("ctseg.pretrain_ssl")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain-ssl", help="self-supervised pre-training of a Swin UNETR encoder on unlabelled CT")
    p.add_argument("config", type=Path, help="pre-training config (YAML), e.g. configs/pretrain_ssl_demo.yaml")
    p.add_argument("--resume", type=Path, help="checkpoint to continue from (last.pt)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inflation.config import ConfigError
    from inflation.errors import InflationError
    from inflation.pretrain_ssl import SslConfig, pretrain_ssl

    try:
        cfg = SslConfig.load(args.config)
        if args.steps:
            cfg.train.steps = args.steps
        result = pretrain_ssl(cfg, resume=args.resume)
    except (ConfigError, InflationError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(f"pre-trained {result['steps']} steps in {result['seconds']} s; loss {result['first_loss']:.4f} -> "
          f"{result['last_loss']:.4f}; encoder in {Path(cfg.output) / 'ssl.pt'}")
    return 0
