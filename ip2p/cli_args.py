"""Argument parsing shared by the dataclass-driven scripts (inference.py, evaluate.py)."""

from __future__ import annotations

import argparse

from transformers import HfArgumentParser

from ip2p.errors import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the usage examples' line breaks; show each flag's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return f"{action.help} (default: %(default)s)"


class UserErrorParser(HfArgumentParser):
    """Bad flags are user errors: one line and exit code 2, also when main() runs in-process."""

    def __init__(self, dataclass_type, script: str, **kwargs):
        super().__init__(dataclass_type, formatter_class=HelpFormatter, **kwargs)
        self.script = script

    def error(self, message: str):
        raise UserError(f"{message} (see python {self.script} --help)")

    def parse(self, argv: list[str] | None):
        """The filled dataclass; unknown flags are a UserError too."""
        args, unknown = self.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args
