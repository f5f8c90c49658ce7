"""``ctseg check-precision BUNDLE --ct CT``: run a bundle through each engine present on this machine at each
precision it can run here, against fp32 on a real CT, and record the figures in the bundle's manifest keyed by
(engine, precision) (what ``ctseg export --parity-ct`` does at export). Run it on the machine that will serve: the
service lowers precision only for a pair measured on it. Torch-free, so it runs where the service runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def check_precision(args: argparse.Namespace) -> str:
    from inflation.precision_check import record_precision_checks

    checks = record_precision_checks(args.bundle, args.ct, write=not args.dry_run)
    lines = [f"{engine.value} {precision.value}: {'passed' if check.passed else 'FAILED'}, argmax agreement "
             f"{check.argmax_agreement:.4%}, per-class Dice min "
             f"{check.min_class_dice if check.min_class_dice is not None else float('nan'):.4f} ({check.runtime})"
             for (engine, precision), check in checks.items()]
    return "\n".join([*lines, "not recorded (--dry-run)" if args.dry_run else "recorded in the bundle's ctseg.json"])


COMMAND = Command(
    "check-precision", help="check a bundle on each engine and precision here against fp32 on a real CT; record it",
    action=check_precision, logger="ctseg.export", must_exist=("ct",),
    also_expected=(RuntimeError,),  # e.g. a runtime that fails on the CT
    arguments=(
        arg("bundle", type=Path),
        arg("--ct", type=Path, required=True, help="a real CT (NIfTI)"),
        arg("--dry-run", action="store_true", help="print the figures; leave the bundle as it is"),
    ),
)
add_parser = COMMAND.add_parser
