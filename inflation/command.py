"""The one skeleton of the ``ctseg`` training-side sub-commands (the ``inflation/*_cli.py`` modules).

Each of those modules declares a :class:`Command`: name, help, arguments, the files that must exist and an action,
a function of the parsed arguments that imports its heavy module (torch, timm, MONAI) only when it runs and returns
the text to print. :meth:`Command.run` reports the project's expected errors as one logged line and exit status 2,
never a stack trace; anything else is a bug and keeps its traceback.

This module imports nothing heavy, so that declaring a command (and ``ctseg serve``) never imports torch.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inflation.errors import ExportError

# What a sub-command reports as "ERROR <message>" and exit status 2. ConfigError, InflationError,
# models.config.ModelConfigError and models.bundle.BundleError are all ValueErrors; ExportError is a RuntimeError.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, ExportError)


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call: its flags (or positional name) and keyword options."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    """``arg("--steps", type=int, help=...)``: an argument, spelled as for ``ArgumentParser.add_argument``."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    # the work: parsed arguments -> the text to print on success (None or "": print nothing); imports lazily
    action: Callable[[argparse.Namespace], str | None]
    arguments: tuple[Arg, ...] = ()
    must_exist: tuple[str, ...] = ()  # argument names (dest) of files checked before the action runs
    logger: str = "ctseg"
    also_expected: tuple[type[Exception], ...] = ()  # further errors this command reports like EXPECTED_ERRORS

    def add_parser(self, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Registers the sub-command (what ``ctseg/cli.py`` calls as ``module.add_parser(sub)``)."""
        parser = sub.add_parser(self.name, help=self.help)
        for a in self.arguments:
            parser.add_argument(*a.flags, **a.options)
        parser.set_defaults(func=self.run)
        return parser

    def run(self, args: argparse.Namespace) -> int:
        log = logging.getLogger(self.logger)
        for dest in self.must_exist:
            path = Path(getattr(args, dest))
            if not path.is_file():
                log.error("%s: no such file", path)
                return 2
        try:
            text = self.action(args)
        except EXPECTED_ERRORS + self.also_expected as err:
            log.error("%s", err)
            return 2
        if text:
            print(text)
        return 0
