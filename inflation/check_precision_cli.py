"""``ctseg check-precision BUNDLE --ct CT``: (re)run a bundle's bf16/fp16 parity check on a real CT and record it
in its manifest (what ``ctseg export --parity-ct`` does at export), e.g. for a bundle exported without one."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def check_precision(args: argparse.Namespace) -> str:
    from inflation.export import record_precision_checks

    manifest = record_precision_checks(args.bundle, args.ct)
    return "\n".join(
        f"{name}: argmax agreement {check['argmax_agreement']:.4%}, per-class Dice min "
        f"{min(check['per_class_dice'].values(), default=float('nan')):.4f} ({check['runtime']})"
        for name, check in manifest["precisions"].items()
    )


COMMAND = Command(
    "check-precision", help="check a bundle's bf16/fp16 against fp32 on a real CT; record it", action=check_precision,
    logger="ctseg.export", must_exist=("ct",), also_expected=(RuntimeError,),  # e.g. a runtime that fails on the CT
    arguments=(
        arg("bundle", type=Path),
        arg("--ct", type=Path, required=True, help="a real CT (NIfTI)"),
    ),
)
add_parser = COMMAND.add_parser
