"""``ctseg pretrain-2d CONFIG.yaml``: a 2D timm ViT pre-trained on CT slices, saved as an ordinary timm checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from inflation.config import ConfigError

log = logging.getLogger("ctseg.pretrain2d")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain-2d", help="pre-train a 2D timm ViT on labelled CT slices (then: ctseg inflate --weights)")
    p.add_argument("config", type=Path, help="pre-training config (YAML), e.g. configs/demo_pretrain2d.yaml")
    p.add_argument("--steps", type=int, help="override steps")
    p.add_argument("--output", type=Path, help="override the config's output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inflation.pretrain2d import Pretrain2DConfig, pretrain_2d

    try:
        cfg = Pretrain2DConfig.load(args.config)
        if args.steps:
            cfg.steps = args.steps
        if args.output:
            cfg.output = str(args.output)
        summary = pretrain_2d(cfg)
    except (ConfigError, ValueError, RuntimeError) as err:
        log.error("%s", err)
        return 2
    print(f"pre-trained {summary['backbone']} for {summary['steps']} steps in {summary['seconds']} s: "
          f"{Path(cfg.output) / summary['weights']}; loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
    return 0
