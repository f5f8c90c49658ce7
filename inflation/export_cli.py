"""``ctseg export CHECKPOINT --out BUNDLE_DIR``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from inflation.errors import InflationError

log = logging.getLogger("ctseg.export")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained checkpoint as an ONNX/TorchScript model bundle")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--name", help="bundle name (default: the training config's name)")
    p.add_argument("--version", help="bundle version (default: the training config's version)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed logit difference vs PyTorch")
    p.add_argument("--parity-ct", type=Path, help="a real CT (NIfTI) whose windows check bf16/fp16 against fp32; "
                   "without it the service serves the bundle in fp32")
    p.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    from inflation.export import ExportError, export_bundle

    try:
        export_bundle(args.checkpoint, args.out, name=args.name, version=args.version, tolerance=args.tolerance,
                      parity_ct=args.parity_ct)
    except (ExportError, InflationError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(f"wrote bundle {args.out}")
    return 0

