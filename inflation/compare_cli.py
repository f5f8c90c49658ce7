"""``ctseg compare CONFIG.yaml``: several initialisations trained alike, one table (inflation/compare.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from inflation.command import Command, arg


def compare_table(args: argparse.Namespace) -> str:
    from inflation.compare import compare, markdown

    return markdown(compare(args.config))


COMMAND = Command(
    "compare", help="train several initialisations on the same data and budget; one Dice table", action=compare_table,
    logger="ctseg.compare", must_exist=("config",), arguments=(
        arg("config", type=Path, help="a training config with a 'compare' section, e.g. configs/compare_demo.yaml"),
    ),
)
add_parser = COMMAND.add_parser
