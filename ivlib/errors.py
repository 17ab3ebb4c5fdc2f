"""The one exception type that reaches the user as a one-line message and exit code 2."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn


def program() -> str:
    """`ivlib` when run as the console script, else `iv.py` (the seed's entry point): the name every
    one-line error and interrupt message starts with."""
    return "ivlib" if Path(sys.argv[0]).name == "ivlib" else "iv.py"


class UsageError(Exception):
    """Bad input from the user (flags, config, data, paths).

    Raised anywhere in the library; the CLI prints it on one line and exits 2 without a
    traceback, so a sweep script can tell "fix your command" apart from a crash.
    """


class Parser(argparse.ArgumentParser):
    """argparse whose errors are `UsageError`s: one line and exit code 2, like every other bad input,
    instead of argparse's usage block. The main command and the subcommands all use it.

    A negative number is a value, not a flag, in every spelling a setting accepts (`-1e3`, `-inf`,
    `-nan`): argparse's own pattern knows `-1` and `-.5` only, so `--strength -inf` read as a flag
    with no value and failed with "expected at least one argument" instead of the range error."""

    NEGATIVE_NUMBER = re.compile(r"^-(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|inf(?:inity)?|nan)$", re.IGNORECASE)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE_NUMBER

    def _parse_optional(self, arg_string: str) -> Any:
        # before argparse's prefix matching, which reads `-nan` as `-n an`
        if self.NEGATIVE_NUMBER.match(arg_string) and not self._has_negative_number_optionals:
            return None
        return super()._parse_optional(arg_string)

    def _print_message(self, message: str, file: Any = None) -> None:
        if os.environ.get("RANK", "0") == "0":  # several processes (torchrun): --help once, from the main one
            super()._print_message(message, file)

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        accepted = usage if len(usage) <= 200 else f"see {self.prog} --help"  # the main command's is pages long
        raise UsageError(f"{message}; accepted: {accepted}")


class Terminated(Exception):
    """SIGTERM as an exception, so a killed sweep unwinds like Ctrl-C: files closed, message printed."""


def terminate(_signum: int, _frame: object) -> NoReturn:
    """The SIGTERM handler (of the entry point, then of a run): raise `Terminated`."""
    raise Terminated()
