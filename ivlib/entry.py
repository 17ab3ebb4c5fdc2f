"""The commands' entry point (`iv.py`, the `ivlib` console script, `python -m ivlib`): an interrupt
at any moment, the seconds of importing torch and transformers included, ends in one line and the
documented exit code (130 for SIGINT, 143 for SIGTERM), never a traceback.

This module imports nothing heavy, so the handlers are in place before torch starts loading; the
command itself (`ivlib.cli`) is imported inside them.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from .errors import Terminated

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def _program() -> str:
    return "ivlib" if Path(sys.argv[0]).name == "ivlib" else "iv.py"


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def interrupted(name: str, when: str) -> int:
    """Print the one line of an interrupt outside a run; the exit code."""
    print(f"{_program()}: interrupted ({name}) {when}; nothing written", file=sys.stderr, flush=True)
    return EXIT_CODES[name]


def main(argv: list[str] | None = None) -> int:
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals are not ours to handle
        pass
    try:
        from .cli import main as command
    except KeyboardInterrupt:
        return interrupted("SIGINT", "during start-up")
    except Terminated:
        return interrupted("SIGTERM", "during start-up")
    try:
        return command(argv)  # handles interrupts during a run itself (what was written, --resume)
    except KeyboardInterrupt:  # the moments outside its handlers (an analysis command's imports...)
        return interrupted("SIGINT", "outside a run")
    except Terminated:
        return interrupted("SIGTERM", "outside a run")
