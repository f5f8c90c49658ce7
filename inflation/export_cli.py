"""``ctseg export CHECKPOINT --out BUNDLE_DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def export(args: argparse.Namespace) -> str:
    from inflation.export import export_bundle

    export_bundle(args.checkpoint, args.out, name=args.name, version=args.version, tolerance=args.tolerance,
                  parity_ct=args.parity_ct)
    return f"wrote bundle {args.out}"


COMMAND = Command(
    "export", help="export a trained checkpoint as an ONNX/TorchScript model bundle", action=export,
    logger="ctseg.export", arguments=(
        arg("checkpoint", type=Path),
        arg("--out", type=Path, required=True, help="bundle directory to write"),
        arg("--name", help="bundle name (default: the training config's name)"),
        arg("--version", help="bundle version (default: the training config's version)"),
        arg("--tolerance", type=float, default=1e-3, help="largest allowed logit difference vs PyTorch"),
        arg("--parity-ct", type=Path, help="a real CT (NIfTI) whose windows check bf16/fp16 against fp32; "
            "without it the service serves the bundle in fp32"),
    ),
)
add_parser = COMMAND.add_parser
