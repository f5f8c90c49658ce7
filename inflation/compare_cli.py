"""``ctseg compare CONFIG.yaml``: several initialisations trained alike, one table (inflation/compare.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("ctseg.compare")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train several initialisations on the same data and budget; one Dice table")
    p.add_argument("config", type=Path, help="a training config with a 'compare' section, e.g. configs/compare_demo.yaml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inflation.compare import compare, markdown
    from inflation.config import ConfigError
    from inflation.errors import InflationError

    if not args.config.is_file():
        log.error("%s: no such file", args.config)
        return 2
    try:
        table = compare(args.config)
    except (ConfigError, InflationError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(markdown(table))
    return 0
