"""``ctseg train CONFIG.yaml [--resume CKPT]`` (also under ``torchrun`` for several GPUs or nodes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def fine_tune(args: argparse.Namespace) -> str | None:
    from inflation.config import TrainConfig
    from inflation.train import train

    cfg = TrainConfig.load(args.config)
    if args.output:
        cfg.output = str(args.output)
    if args.steps:
        cfg.train.steps = args.steps
    result = train(cfg, resume=args.resume, max_steps=args.max_steps)
    if not result:
        return None
    return (f"trained {result['steps']} steps in {result['seconds']} s; validation: "
            f"{(result.get('validation') or {}).get('mean_dice')}")


COMMAND = Command(
    "train", help="fine-tune an (inflated) model on labelled CT", action=fine_tune, logger="ctseg.train", arguments=(
        arg("config", type=Path, help="training config (YAML), see configs/"),
        arg("--resume", type=Path, help="checkpoint to continue from (optimizer, scheduler, step)"),
        arg("--output", type=Path, help="override the config's output directory"),
        arg("--steps", type=int, help="override train.steps"),
        arg("--max-steps", type=int, help="stop after this many steps this run (schedule unchanged)"),
    ),
)
add_parser = COMMAND.add_parser
