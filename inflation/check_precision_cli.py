"""``ctseg check-precision BUNDLE --ct CT``: (re)run a bundle's bf16/fp16 parity check on a real CT and record it
in its manifest (what ``ctseg export --parity-ct`` does at export), e.g. for a bundle exported without one."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("ctseg.export")


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("check-precision", help="check a bundle's bf16/fp16 against fp32 on a real CT; record it")
    c.add_argument("bundle", type=Path)
    c.add_argument("--ct", type=Path, required=True, help="a real CT (NIfTI)")
    c.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from inflation.export import record_precision_checks
    from models.bundle import BundleError

    if not args.ct.is_file():
        log.error("%s: no such file", args.ct)
        return 2
    try:
        manifest = record_precision_checks(args.bundle, args.ct)
    except (BundleError, RuntimeError, ValueError) as err:
        log.error("%s", err)
        return 2
    for name, check in manifest["precisions"].items():
        print(f"{name}: argmax agreement {check['argmax_agreement']:.4%}, per-class Dice min "
              f"{min(check['per_class_dice'].values(), default=float('nan')):.4f} ({check['runtime']})")
    return 0
