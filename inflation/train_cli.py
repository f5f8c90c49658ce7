"""``ctseg train CONFIG.yaml [--resume CKPT]`` (also under ``torchrun`` for several GPUs or nodes)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from inflation.config import ConfigError, TrainConfig
from inflation.errors import InflationError

log = logging.getLogger("ctseg.train")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune an (inflated) model on labelled CT")
    p.add_argument("config", type=Path, help="training config (YAML), see configs/")
    p.add_argument("--resume", type=Path, help="checkpoint to continue from (optimizer, scheduler, step)")
    p.add_argument("--output", type=Path, help="override the config's output directory")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--max-steps", type=int, help="stop after this many steps this run (schedule unchanged)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inflation.train import train

    try:
        cfg = TrainConfig.load(args.config)
        if args.output:
            cfg.output = str(args.output)
        if args.steps:
            cfg.train.steps = args.steps
        result = train(cfg, resume=args.resume, max_steps=args.max_steps)
    except (ConfigError, InflationError, ValueError) as err:
        log.error("%s", err)
        return 2
    if result:
        print(f"trained {result['steps']} steps in {result['seconds']} s; validation: "
              f"{(result.get('validation') or {}).get('mean_dice')}")
    return 0
