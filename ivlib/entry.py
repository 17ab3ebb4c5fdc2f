"""The commands' entry point (`iv.py`, the `ivlib` console script, `python -m ivlib`): an interrupt
at any moment, the seconds of importing torch and transformers included, ends in one line and the
documented exit code (130 for SIGINT, 143 for SIGTERM), never a traceback.

This module imports nothing heavy, so the handlers are in place before torch starts loading; the
command itself (`ivlib.cli`) is imported inside them.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from .errors import Terminated, program, terminate

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def interrupted(name: str, when: str) -> int:
    """Print the one line of an interrupt outside a run; the exit code."""
    print(f"{program()}: interrupted ({name}) {when}; nothing written", file=sys.stderr, flush=True)
    return EXIT_CODES[name]


def main(argv: list[str] | None = None) -> int:
    """The command's exit code. As a process's own command (`argv` None: iv.py, `python -m ivlib`, the
    console script), a process of a data-parallel launch ends here instead, once its command returned
    (`distributed.leave`: a finished run must not crash at interpreter exit); called with an argv, from
    code that runs several commands, it returns as with one process."""
    code = _command(argv)
    distributed = sys.modules.get("ivlib.distributed")  # loaded with the command; absent: no group to leave
    if argv is None and distributed is not None and distributed.active():
        distributed.leave(code)
    return code


def _command(argv: list[str] | None) -> int:
    with contextlib.suppress(ValueError):  # not the main thread: signals are not ours to handle
        signal.signal(signal.SIGTERM, terminate)
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
