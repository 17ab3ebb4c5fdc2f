"""Several iv.py commands in one data-parallel launch, for tests/test_distributed.py: one torchrun
start (interpreter, torch and transformers imports, process group) instead of one per command,
which on 2 CPU cores is most of the cost. Each command runs through `ivlib.cli.main`, as iv.py does.

    python -m torch.distributed.run --nproc-per-node 2 tests/dp_driver.py CASES.json OUT_DIR

CASES.json maps a case name to its argv, or to {rank: argv} where the processes are given different
input (what one process alone sees); each command's stdout and stderr go to
OUT_DIR/<name>.<rank>.out and .err, its exit code to OUT_DIR/<name>.<rank>.rc.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from ivlib import distributed as dist
from ivlib.cli import main


def how_far(out: Path, stderr: str) -> str:
    """For a failed launch's assertion, short enough not to be cut: which cases each process finished,
    whether it got through all of them (then it died at its exit), and the launcher's lines that say
    how a process ended."""
    finished = {r: sorted(p.name.split(".")[0] for p in out.glob(f"*.{r}.rc")) for r in ("0", "1")}
    through = sorted(p.name for p in out.glob("all-cases.*.done"))
    said = [
        line.strip()
        for line in stderr.splitlines()
        if any(k in line for k in ("terminate", "what()", "Signal", "rror"))
    ]
    return f"finished {finished}; through all: {through}; stderr says: {said[-8:]}"


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    out, rank = Path(sys.argv[2]), os.environ.get("RANK", "0")
    for name, argv in cases.items():
        with (
            open(out / f"{name}.{rank}.out", "w") as stdout,
            open(out / f"{name}.{rank}.err", "w") as stderr,
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            rc = main(argv[rank] if isinstance(argv, dict) else argv)
        (out / f"{name}.{rank}.rc").write_text(str(rc))
    (out / f"all-cases.{rank}.done").write_text("")  # a process that fails after this failed at its exit
    dist.leave(0)  # as ivlib.entry ends a launched iv.py
