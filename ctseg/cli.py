"""The ``ctseg`` command. Sub-commands import their package lazily, so ``ctseg serve`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (sub-command, module that defines add_parser)
COMMANDS = (
    ("pretrain-2d", "inflation.pretrain2d_cli"),
    ("pretrain-ssl", "inflation.pretrain_ssl_cli"),
    ("pretrain-vdt", "inflation.pretrain_vdt_cli"),
    ("slices-to-images", "inflation.slice_images_cli"),
    ("inflate", "inflation.cli"),
    ("train", "inflation.train_cli"),
    ("export", "inflation.export_cli"),
    ("check-precision", "inflation.check_precision_cli"),
    ("compare", "inflation.compare_cli"),
    ("serve", "server.cli"),
    ("predict", "server.predict_cli"),
    ("db", "server.db_cli"),
)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctseg", description="CT segmentation with inflated 2D ViTs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module in COMMANDS:
        if wanted not in (None, name) and wanted in {n for n, _ in COMMANDS}:
            sub.add_parser(name, help=f"see 'ctseg {name} --help'")
            continue
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as err:
            if err.name and (err.name == module or module.startswith(err.name + ".")):
                continue  # sub-command not built yet
            sub.add_parser(name, help=f"unavailable: {err.name} is not installed (pip install 'ctseg[train]')")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from models import logs  # no exception message (a path, a UID, a header value) reaches the log

    logs.install(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied module, naming source UIDs
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"'{args.command}' is unavailable in this install (missing dependencies)")
    try:
        return int(func(args) or 0)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in {"torch", "timm", "monai", "onnx", "safetensors", "tensorboard"}:
            logging.getLogger("ctseg").error(
                "'ctseg %s' needs %s, which this install lacks: pip install 'ctseg[train]'", args.command, err.name)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
